"""Lowering: derive each rank's communication from a compute-only schedule.

The result, a `Program`, is what the runtime executes: per rank, the compute
actions in schedule order with `SEND_*` and `RECV_*` actions inserted.

When sends are issued and receives posted, and why a valid program cannot deadlock:
docs/decisions.md, "Send/recv semantics".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from pipefold.schedule.deps import message_source
from pipefold.schedule.ir import Action, Op, Schedule

__all__ = ["Program", "Message", "fuse_adjacent_split_backward", "lower", "messages_of"]


@dataclass(frozen=True, slots=True)
class Message:
    """A tensor crossing ranks: `send` on `src` ships what `recv` on `dst` posts for."""

    src: int
    dst: int
    send: Action
    recv: Action


@dataclass(frozen=True)
class Program:
    """Per-rank instruction lists: compute actions plus derived SEND/RECV actions."""

    schedule: Schedule
    instructions: tuple[tuple[Action, ...], ...]

    def peer_of(self, action: Action) -> int:
        """The other rank of a communication action."""
        placement = self.schedule.placement
        if action.op in (Op.SEND_F, Op.RECV_B):
            return placement[action.stage + 1]
        if action.op in (Op.RECV_F, Op.SEND_B):
            return placement[action.stage - 1]
        raise ValueError(f"{action} is not a communication action")


def _outgoing(action: Action, schedule: Schedule) -> tuple[Action, int] | None:
    """The SEND that must follow compute `action`, with its destination rank, if any."""
    here = schedule.rank_of(action.stage)
    if action.op is Op.F and action.stage < schedule.num_stages - 1:
        peer = schedule.rank_of(action.stage + 1)
        if peer != here:
            return Action(Op.SEND_F, action.stage, action.microbatch), peer
    if action.op.is_backward and action.stage > 0:
        peer = schedule.rank_of(action.stage - 1)
        if peer != here:
            return Action(Op.SEND_B, action.stage, action.microbatch), peer
    return None


def _incoming(action: Action) -> Action:
    """The RECV that feeds compute `action` (caller checked that one is needed)."""
    op = Op.RECV_F if action.op is Op.F else Op.RECV_B
    return Action(op, action.stage, action.microbatch)


def messages_of(schedule: Schedule) -> list[Message]:
    """Every cross-rank message, in the order each sender issues them."""
    found = []
    for rank, _, action in schedule.iter_actions():
        outgoing = _outgoing(action, schedule)
        if outgoing is None:
            continue
        send, peer = outgoing
        consumer_op = Op.F if send.op is Op.SEND_F else Op.B
        consumer_stage = send.stage + 1 if send.op is Op.SEND_F else send.stage - 1
        recv = _incoming(Action(consumer_op, consumer_stage, send.microbatch))
        found.append(Message(rank, peer, send, recv))
    return found


def lower(schedule: Schedule, *, lookahead: int = 1) -> Program:
    """Insert SEND/RECV actions (see docs/decisions.md, "Send/recv semantics").

    `lookahead` is how many compute actions before its consumer a receive is
    posted (0 = right before the consumer).
    """
    # Position (index among the receiver's compute actions) before which each receive is
    # posted: `lookahead` actions early, then pulled earlier so that, per sender, posts
    # happen in send order.
    consumer_index: dict[Action, int] = {}
    for _, position, action in schedule.iter_actions():
        if message_source(action, schedule) is not None:
            consumer_index[_incoming(action)] = position

    by_pair: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for message in messages_of(schedule):
        by_pair[(message.src, message.dst)].append(message.recv)

    post_before: dict[Action, int] = {}
    for receives in by_pair.values():
        earliest_later = None
        for recv in reversed(receives):
            wanted = max(consumer_index[recv] - lookahead, 0)
            if earliest_later is not None:
                wanted = min(wanted, earliest_later)
            post_before[recv] = wanted
            earliest_later = wanted

    posts_at: dict[int, dict[int, list[Action]]] = defaultdict(lambda: defaultdict(list))
    for (_, dst), receives in by_pair.items():
        for recv in receives:  # send order, so FIFO per pair survives the grouping
            posts_at[dst][post_before[recv]].append(recv)

    instructions = []
    for rank, row in enumerate(schedule.actions):
        program: list[Action] = []
        for position, action in enumerate(row):
            program.extend(posts_at[rank].get(position, ()))
            program.append(action)
            outgoing = _outgoing(action, schedule)
            if outgoing is not None:
                program.append(outgoing[0])
        instructions.append(tuple(program))
    return Program(schedule, tuple(instructions))


def fuse_adjacent_split_backward(schedule: Schedule) -> Schedule:
    """Replace `I(s, m)` directly followed by `W(s, m)` on a rank by one `B(s, m)`.

    Splitting a backward pays only when another rank waits for the input gradient
    that `I` ships early, and costs something everywhere: on CPU, `I` + `W` measured
    1.2-1.6x `B` (the weight half re-enters the graph, one autograd call per parameter
    group). So a pair is fused when it is adjacent in the rank's order (nothing runs
    between them, so no bubble was being filled) and stage s's input gradient goes to
    no other rank (s is the first stage, or stage s-1 sits on the same rank). The
    result has the same dependencies, so it stays valid; every other action keeps its
    place. Returns `schedule` itself when nothing fuses.
    """
    def fusible(stage: int) -> bool:
        return stage == 0 or schedule.rank_of(stage - 1) == schedule.rank_of(stage)

    rows = []
    changed = False
    for row in schedule.actions:
        fused: list[Action] = []
        position = 0
        while position < len(row):
            action = row[position]
            following = row[position + 1] if position + 1 < len(row) else None
            if (
                action.op is Op.I
                and following == Action(Op.W, action.stage, action.microbatch)
                and fusible(action.stage)
            ):
                fused.append(Action(Op.B, action.stage, action.microbatch))
                position += 2
                changed = True
                continue
            fused.append(action)
            position += 1
        rows.append(tuple(fused))
    if not changed:
        return schedule
    return replace(schedule, actions=tuple(rows))
