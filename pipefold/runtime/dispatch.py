"""The executor's dispatch table: one entry per action of a rank's program, each a handler with
its peer and hooks bound, so the step's loop only calls (pipefold/runtime/executor.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipefold.runtime.executor_parts import (
    StageHooks,
    after,
    before,
    compute_then_send,
    consumer_names,
    first_forward_and_last_backward,
)
from pipefold.schedule import Action, Op, Program

Handler = Callable[[Action], None]
Entry = tuple[Handler, Action, bool, int]
"""(handler, action, whether it is a compute action the loop times, its progress code)."""


@dataclass(frozen=True)
class DispatchTables:
    peers: dict[Action, int]
    """The peer rank of each message action."""
    plain: tuple[Entry, ...]
    """One entry per action, in program order (fault injection and `benchmarks/hop_ab.py` need
    one handler per action)."""
    fused: tuple[Entry, ...]
    """The same, with each compute action whose output's send comes next running that send
    from inside its handler, and the send's own entry dropped."""
    fused_codes: tuple[int, ...]
    """Progress codes of the fused compute actions (their end is stamped before the send)."""


def dispatch_tables(
    program: Program,
    rank: int,
    handlers: Mapping[Op, Callable[..., None]],
    messages: Mapping[Op, Callable[..., None]],
    *,
    wrap_gather: Callable[[Handler], Handler] | None = None,
    gather_indices: frozenset[int] = frozenset(),
    stage_hooks: StageHooks | None = None,
) -> DispatchTables:
    """The tables for `rank`'s actions. `handlers`: compute (and sharding) handlers by op;
    `messages`: message handlers by op, called with `peer=` (a receive also with `what=`, the
    action that will wait for it). `wrap_gather` wraps the actions at `gather_indices` (those
    that wait for a full-sharding gather); `stage_hooks` runs its hooks before a
    stage's first forward and after its last backward."""
    actions = program.instructions[rank]
    firsts, lasts = (
        first_forward_and_last_backward(actions, stage_hooks.stages) if stage_hooks is not None else ({}, {})
    )

    def wrapped(index: int, action: Action, handler: Handler) -> Handler:
        if wrap_gather is not None and index in gather_indices:
            handler = wrap_gather(handler)
        if stage_hooks is not None and index == firsts.get(action.stage):
            handler = before(stage_hooks.before_first_forward, handler)
        if stage_hooks is not None and index == lasts.get(action.stage):
            handler = after(stage_hooks.after_last_backward, handler)
        return handler

    peers: dict[Action, int] = {}
    consumers = consumer_names(actions)
    # A compute action whose output's send comes next sends from inside its handler, right
    # after the compute and before its bookkeeping, and the send's own entry is dropped:
    # the peer waiting for it gets it a loop turn and the bookkeeping sooner
    # (docs/decisions.md, "sends from the compute handler").
    senders_next = compute_then_send(actions)
    plain: list[Entry] = []
    fused: list[Entry] = []
    for index, action in enumerate(actions):
        handler: Handler
        if action.op.is_message:
            # Peer (and a receive's consumer name) bound here, so the loop neither hashes
            # actions nor formats names.
            peer = peers[action] = program.peer_of(action)
            if action.op in (Op.RECV_F, Op.RECV_B):
                what = consumers.get((action.op, action.stage, action.microbatch), str(action))
                handler = functools.partial(messages[action.op], peer=peer, what=what)
            else:
                handler = functools.partial(messages[action.op], peer=peer)
        else:
            handler = handlers[action.op]
        entry = (wrapped(index, action, handler), action, not action.op.is_message, index + 1)
        plain.append(entry)
        if index in senders_next:
            send = functools.partial(
                handlers[action.op], send_to=program.peer_of(actions[index + 1]), code=index + 1
            )
            fused.append((wrapped(index, action, send), action, True, index + 1))
        elif index - 1 not in senders_next:
            fused.append(entry)
    fused_codes = tuple(index + 1 for index in sorted(senders_next))
    return DispatchTables(peers, tuple(plain), tuple(fused), fused_codes)
