"""The executor: walk this rank's lowered program, one handler per op.

The executor holds no schedule logic. `pipefold.schedule.lower` decides the order of
every compute and communication action; the executor dispatches each through the
handler table `{Op.F: ..., Op.B: ..., ...}` and keeps the per-(stage, micro-batch)
values the handlers hand each other. A compute action followed by the send of its output
(every send `lower` places) runs as one handler call that sends right after the compute
(docs/decisions.md, "sends from the compute handler"). The dispatch list (handler, action,
timed) is built once at construction, so the per-action loop does no lookups and allocates
nothing beyond the tensors; it stores each compute action's start and end stamps into
arrays made at construction (the timeline's events are built after the loop), and a
message handler calls the peer's send or receive function resolved once per step.

Values kept per (stage, micro-batch), in `[stage][microbatch]` tables:
- the stage's input leaves and outputs from F, until its B (or I);
- a value handed over in memory to the next stage on this rank (F) or the previous
  stage on this rank (input gradients of B/I);
- posted receives, until the consuming action waits for them;
- the weight-gradient state between I and W.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipefold.errors import BoundaryMismatch, PipelineError
from pipefold.runtime.backward import (
    GroupCache,
    WeightGradState,
    backward_full,
    backward_input,
    backward_weight,
)
from pipefold.runtime.dispatch import dispatch_tables
from pipefold.runtime.executor_parts import (
    Grads,
    LossFn,
    MessageTraffic,
    ShardingActions,
    StageHooks,
    Stamp,
    StepInputs,
    StepRecord,
    collection_paused,
    matches,
    scaled_losses,
    seed_tensor,
    seed_value,
)
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.memory import ActivationCounter
from pipefold.runtime.progress import Progress
from pipefold.runtime.receive_buffers import ReceiveBuffers
from pipefold.runtime.sent_outputs import release_sent
from pipefold.runtime.stage import Stage, as_leaves
from pipefold.runtime.step_gather import EVENT_FIELDS, op_code
from pipefold.runtime.transport.comm import P2P, Transfer
from pipefold.schedule import Action, Op, Program
from pipefold.schedule.shard import gather_waits

__all__ = [
    "Executor",
    "ShardingActions",
    "StageHooks",
    "StepInputs",
    "StepRecord",
]


class Executor:
    """Runs `program.instructions[rank]` over the local `stages` once per `run`."""

    def __init__(
        self,
        program: Program,
        rank: int,
        stages: dict[int, Stage],
        *,
        loss_fn: LossFn,
        device: torch.device,
        p2p: P2P | None,
        watchdog: Watchdog | None,
        counter: ActivationCounter | None,
        step_fn: Callable[[int, int], None] | None = None,
        progress: Progress | None = None,
        stage_hooks: StageHooks | None = None,
        sharding: ShardingActions | None = None,
    ) -> None:
        schedule = program.schedule
        self.rank = rank
        self._stages = stages
        self._loss_fn = loss_fn
        self._device = device
        self._p2p = p2p
        self._watchdog = watchdog
        self._counter = counter
        self._step_fn = step_fn
        self._progress = progress if progress is not None else Progress(None, rank=0, num_ranks=1)
        self._progress.instructions = program.instructions
        self._num_stages = schedule.num_stages
        self._num_microbatches = schedule.num_microbatches
        self._last_stage_here = (schedule.num_stages - 1) in stages
        self._next_local = [
            s + 1 < schedule.num_stages and schedule.placement[s + 1] == rank
            for s in range(schedule.num_stages)
        ]
        self._prev_local = [s > 0 and schedule.placement[s - 1] == rank for s in range(schedule.num_stages)]
        self._in_layer = [0] * schedule.num_stages
        self._out_layer = [0] * schedule.num_stages
        for s, stage in stages.items():
            self._in_layer[s] = stage.layer_indices.start - 1
            self._out_layer[s] = stage.layer_indices.stop - 1

        handlers: dict[Op, Callable[..., None]] = {
            Op.F: self._forward,
            Op.B: self._backward,
            Op.I: self._backward_input,
            Op.W: self._backward_weight,
            Op.STEP: self._step,
        }
        messages: dict[Op, Callable[..., None]] = {
            Op.SEND_F: self._send_forward,
            Op.RECV_F: self._recv_forward,
            Op.SEND_B: self._send_backward,
            Op.RECV_B: self._recv_backward,
        }
        waits_for_gather: frozenset[int] = frozenset()
        if sharding is not None:
            # Each swaps the stage's parameters or their gradients: W's readiness memo ends.
            handlers[Op.UNSHARD] = self._then_forget(lambda action: sharding.unshard(action.stage))
            handlers[Op.RESHARD] = self._then_forget(lambda action: sharding.reshard(action.stage))
            handlers[Op.REDUCE_GRAD] = self._then_forget(
                lambda action: sharding.reduce_grad(action.stage)
            )
            waits_for_gather = frozenset(gather_waits(program.instructions[rank]))
        elif any(action.op.is_sharding for action in program.instructions[rank]):
            raise PipelineError(
                f"rank {self.rank}: the program holds sharding actions (UNSHARD, RESHARD, REDUCE_GRAD) "
                "but the pipeline shards nothing; build it with ParallelOptions(shard='full')"
            )
        gather = None if sharding is None else functools.partial(self._after_gather, sharding.wait_gathered)
        tables = dispatch_tables(
            program, rank, handlers, messages, wrap_gather=gather,
            gather_indices=waits_for_gather, stage_hooks=stage_hooks,
        )
        self._peers = tables.peers
        self._messages = tuple(
            (action, self._peers[action]) for action in program.instructions[rank] if action.op.is_message
        )
        self._traffic = MessageTraffic(self._messages, self._in_layer, self._out_layer)
        self._plain_dispatch = tables.plain
        self._dispatch = tables.fused
        self._fused_codes = tables.fused_codes
        self._starts = [0.0] * (len(tables.plain) + 1)
        self._ends = [0.0] * (len(tables.plain) + 1)
        # A fused compute action's end, stamped before its send (the event excludes the send).
        self._compute_ends = [0.0] * (len(tables.plain) + 1)
        self._message_peers = tuple(sorted({peer for _, peer in self._messages}))
        self._senders: dict[int, Callable[[tuple[Tensor, ...]], Transfer | None]] = {}
        self._receivers: dict[int, Callable[[tuple[Tensor, ...], Any], Transfer]] = {}
        self._copying_peers: frozenset[int] = frozenset()
        self._group_caches = {s: GroupCache() for s in stages}
        self._receive_buffers = ReceiveBuffers(schedule.num_stages, schedule.num_microbatches, device)
        self._run_counter: ActivationCounter | None = counter
        self._ready_at = 0.0
        self.sent_bytes = 0
        """Bytes of boundary tensors and gradients the last step sent to other ranks (as laid
        out in shared memory: each tensor aligned, see `shm.layout`)."""
        self.current: Action | None = None
        """The action running (or last run); names the failure point in error reports."""
        self._timed_layout()
        self._reset(None)

    def _then_forget(self, handler: Callable[[Action], None]) -> Callable[[Action], None]:
        """`handler`, then the end of `W`'s readiness memo on every stage here
        (`GroupCache.reset`), for an action that may change parameters other than by `.grad`."""

        def run(action: Action) -> None:
            handler(action)
            self._forget_readiness()

        return run

    def _forget_readiness(self) -> None:
        for cache in self._group_caches.values():
            cache.reset()

    def _after_gather(
        self, wait: Callable[[int], None], handler: Callable[[Action], None]
    ) -> Callable[[Action], None]:
        """`handler` after the stage's gather finished, the time waited recorded as a `Wait`
        (as a receive's is): only actions that follow an UNSHARD get it."""

        def run(action: Action) -> None:
            start = time.perf_counter()
            wait(action.stage)
            end = self._ready_at = time.perf_counter()
            self._waits.append((action, start - self._t0, end - self._t0))
            handler(action)

        return run

    def intercept(
        self, wrapper: Callable[[Action, Callable[[Action], None]], Callable[[Action], None]]
    ) -> None:
        """Run `wrapper(action, handler)` in place of each action's handler from the next step on.

        For tests that inject faults at chosen actions (tests/runtime/test_faults.py): a wrapper
        installed by the test's own code, so nothing a checkpoint, a flag or the environment
        holds can trigger it, and the loop pays nothing when none is installed.
        """
        # Every action gets its own handler call here, sends included (none is fused).
        self._plain_dispatch = self._dispatch = tuple(
            (wrapper(action, handler), action, timed, code)
            for handler, action, timed, code in self._plain_dispatch
        )
        self._fused_codes = ()
        self._timed_layout()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, step: StepInputs, *, count_memory: bool = True) -> StepRecord:
        """Execute one step. `count_memory=False` skips the saved-tensor hooks (a Python
        call per saved tensor, a few percent of a CPU step); the peak is then reported as 0."""
        self._reset(step)
        # Between steps anything may have changed the parameters (`param.data = ...`, `.to()`,
        # `grad_dtype`): W checks them in full again (`GroupCache.reset`).
        self._forget_readiness()
        counter = self._run_counter = self._counter if count_memory else None
        if counter is not None:
            counter.reset_peak()
        events: list[Stamp] = []
        self._waits: list[Stamp] = []
        cuda = self._device.type == "cuda"
        cuda_marks: list[tuple[Action, torch.cuda.Event, torch.cuda.Event]] = []
        origin = torch.cuda.Event(enable_timing=True) if cuda else None  # type: ignore[no-untyped-call]
        if origin is not None:
            origin.record()
        if self._p2p is not None and self._watchdog is not None and self._messages:
            send_bytes, recv_bytes = self._traffic.of(step.boundaries)
            self._p2p.begin_step(send_bytes, recv_bytes, self._watchdog)
            self.sent_bytes = sum(send_bytes.values())
        if self._p2p is not None and self._messages:
            # Resolved once a step (after begin_step decided which channels carry it), so a
            # message pays no channel lookup.
            p2p = self._p2p
            self._senders = {peer: p2p.sender(peer) for peer in self._message_peers}
            self._copying_peers = frozenset(p for p in self._message_peers if p2p.copies_on_send(p))
            self._receivers = {peer: p2p.receiver(peer) for peer in self._message_peers}
        self._t0 = t0 = time.perf_counter()
        rank = self.rank
        clock = time.perf_counter
        # This rank's progress slot: the code of the action it runs (pipefold/runtime/progress.py).
        progress, slot = self._progress.slots, self._progress.slot
        # Compute actions' start and end, by progress code: stored, not appended, in the loop.
        starts, ends = self._starts, self._ends
        with counter.counting() if counter is not None else contextlib.nullcontext(), collection_paused():
            for handler, action, timed, code in self._dispatch:
                self.current = action
                progress[slot] = code
                if not timed:
                    handler(action)
                elif cuda:
                    self._ready_at = clock()  # where a receive's wait starts (`_complete`)
                    begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    begin.record()
                    handler(action)
                    end.record()
                    cuda_marks.append((action, begin, end))
                else:
                    self._ready_at = clock()
                    handler(action)
                    ends[code] = clock()
                    # A consumer first waits for its message (recorded as a Wait by
                    # _complete, which moves _ready_at); the compute event starts after it.
                    starts[code] = self._ready_at
        self.current = None
        # The memo holds the gradients it checked: let them go with the step (`zero_grad`).
        self._forget_readiness()
        table = None
        if not cuda:
            table = self._event_table(t0)
            events = list(zip(self._timed_actions, table[:, 3].tolist(), table[:, 4].tolist(), strict=True))
        self._progress.mark("the end of the step (loss and gradient reduction)")
        self._wait_sends()
        if origin is not None:
            torch.cuda.synchronize(self._device)
            events = [
                (action, origin.elapsed_time(begin) / 1e3, origin.elapsed_time(end) / 1e3)
                for action, begin, end in cuda_marks
            ]
        losses = torch.zeros(self._num_microbatches, dtype=torch.float64, device=self._device)
        if self._last_stage_here:
            losses = scaled_losses(self._require_losses(), self._inputs().scales)
        peak = counter.peak if counter is not None else 0
        waits = tuple(self._waits)
        self._reset(None)
        return StepRecord(losses, tuple(events), waits, peak, t0, rank, event_table=table)

    def _timed_layout(self) -> None:
        """The compute actions' progress codes and fields (`step_gather.EVENT_FIELDS`' first
        three), in the loop's order, and those of the fused ones (whose end is the compute's)."""
        timed = [(action, code) for _, action, is_timed, code in self._dispatch if is_timed]
        self._timed_actions = tuple(action for action, _ in timed)
        self._timed_codes = np.array([code for _, code in timed], dtype=np.intp)
        fields = [(op_code(action.op), action.stage, action.microbatch) for action, _ in timed]
        self._timed_fields = np.array(fields, dtype=np.float64).reshape(len(timed), 3)
        self._fused_index = np.array(self._fused_codes, dtype=np.intp)

    def _event_table(self, t0: float) -> np.ndarray:
        """This step's compute events as rows (op code, stage, micro-batch, start, end), times
        from `t0`, built with array operations (a step has a few hundred)."""
        ends = np.array(self._ends)
        if len(self._fused_index):
            ends[self._fused_index] = np.array(self._compute_ends)[self._fused_index]
        codes = self._timed_codes
        table = np.empty((len(codes), EVENT_FIELDS), dtype=np.float64)
        table[:, :3] = self._timed_fields
        table[:, 3] = np.array(self._starts)[codes] - t0
        table[:, 4] = ends[codes] - t0
        return table

    def _reset(self, step: StepInputs | None) -> None:
        stages, mbs = self._num_stages, self._num_microbatches

        def table() -> list[list[Any]]:
            return [[None] * mbs for _ in range(stages)]

        self._inputs_of: list[list[Any]] = table()
        self._outputs: list[list[Any]] = table()
        self._held: list[list[Any]] = table()
        self._forward_handoff: list[list[Any]] = table()
        self._grad_handoff: list[list[Any]] = table()
        # Posted receives: (the value the data lands in, the transfer, the consumer's name).
        self._recv_f: list[list[tuple[Any, Transfer, str] | None]] = table()
        self._recv_b: list[list[tuple[Any, Transfer, str] | None]] = table()
        self._send_grads: list[list[Any]] = table()
        self._weight_state: list[list[WeightGradState | None]] = table()
        self._losses: list[Tensor | None] = [None] * mbs
        # Sends in flight, with their tensors kept alive until the transfer completes.
        self._sends: list[tuple[Transfer, Action, tuple[Tensor, ...]]] = []
        self._step_inputs = step

    # -- helpers -----------------------------------------------------------------------------

    def _inputs(self) -> StepInputs:
        if self._step_inputs is None:
            raise self._outside_run()
        return self._step_inputs

    def _comm(self) -> tuple[P2P, Watchdog]:
        if self._p2p is None or self._watchdog is None:
            raise self._no_group()
        return self._p2p, self._watchdog

    @staticmethod
    def _outside_run() -> PipelineError:
        return PipelineError("the executor ran an action outside run(); call run(step)")

    def _no_group(self) -> PipelineError:
        return PipelineError(
            f"rank {self.rank} reached a communication action but the pipeline has no process group"
        )

    def _require_losses(self) -> list[Tensor]:
        losses = []
        for mb, loss in enumerate(self._losses):
            if loss is None:
                raise PipelineError(
                    f"rank {self.rank}: the schedule ran no forward of the last stage for micro-batch {mb}"
                )
            losses.append(loss)
        return losses

    def _complete(self, pending: tuple[Any, Transfer, str], consumer: Action) -> Any:
        p2p, watchdog = self._p2p, self._watchdog
        if p2p is None or watchdog is None:
            raise self._no_group()
        # The wait starts where the loop stamped the action's start (a few calls earlier).
        start = self._ready_at
        value, transfer, what = pending
        transfer.wait(watchdog, what)
        end = self._ready_at = time.perf_counter()
        if p2p.orders_streams:
            p2p.after_recv()
        self._waits.append((consumer, start - self._t0, end - self._t0))
        return value

    def _wait_sends(self) -> None:
        if not self._sends:
            return
        _, watchdog = self._comm()
        for transfer, action, _ in self._sends:
            transfer.wait(watchdog, str(action))
        self._sends = []

    def _release(self, stage: int, microbatch: int) -> None:
        self._inputs_of[stage][microbatch] = None
        self._outputs[stage][microbatch] = None
        self._held[stage][microbatch] = None

    # -- forward -----------------------------------------------------------------------------

    def _forward(self, action: Action, send_to: int | None = None, code: int = 0) -> None:
        """F; with `send_to`, then its SEND_F to that peer (`code`: its progress code), sent as
        soon as the output exists."""
        s, mb = action.stage, action.microbatch
        stage = self._stages[s]
        # The checks of `_inputs` and `_comm` are inlined in the per-action handlers: a
        # Python call each, on the caches a stage's autograd leaves cold.
        step = self._step_inputs
        if step is None:
            raise self._outside_run()
        if stage.is_first:
            if step.inputs is None:
                raise PipelineError(f"rank {self.rank} owns stage 0 but the step has no inputs")
            value: Any = step.inputs[mb]
            leaves: tuple[Tensor, ...] = ()
        else:
            pending = self._recv_f[s][mb]
            if pending is not None:
                self._recv_f[s][mb] = None
                # The leaves were made when the receive was posted (`_recv_forward`).
                value, leaves = self._complete(pending, action)
            else:
                raw = self._forward_handoff[s][mb]
                self._forward_handoff[s][mb] = None
                if raw is None:
                    raise PipelineError(
                        f"rank {self.rank}: {action} has no input (neither received nor handed over)"
                    )
                value, leaves = as_leaves(raw)
        output = stage.forward(value, mb)
        if stage.is_last:
            if step.targets is None:
                raise PipelineError(f"rank {self.rank} owns the last stage but the step has no targets")
            loss = self._loss_fn(output, step.targets[mb])
            # `ndim` is an attribute read; `numel()` a call, made only for a non-scalar loss.
            if not isinstance(loss, Tensor) or (loss.ndim != 0 and loss.numel() != 1):
                raise PipelineError(
                    f"loss_fn returned {type(loss).__name__}"
                    f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}"
                    f" for micro-batch {mb}; it must return a scalar tensor (the mean over the micro-batch)"
                )
            # The loss itself is the root: its backward starts from the gradient the scaling
            # (micro-batch share, loss scale) would hand it (`_loss_seed`), and the recorded
            # losses are scaled once per step, not by two tensor ops per micro-batch.
            self._losses[mb] = loss.detach()
            outputs: tuple[Tensor, ...] = (loss,)
        else:
            # `flatten`, inlined for a stage's usual one tensor: on the path from the compute's
            # end to the send's flag.
            outputs = (output,) if isinstance(output, Tensor) else tuple(output)
            if send_to is not None:
                self._compute_ends[code] = time.perf_counter()
                self._send_outputs(action, outputs, send_to)
            elif self._next_local[s]:
                self._forward_handoff[s + 1][mb] = output
        self._outputs[s][mb] = outputs
        self._inputs_of[s][mb] = leaves
        if self._run_counter is not None:
            self._held[s][mb] = self._run_counter.hold(leaves + outputs)
        if send_to is not None:
            self._release_sent(s, mb, outputs)

    def _send_forward(self, action: Action, *, peer: int) -> None:
        s, mb = action.stage, action.microbatch
        outputs = self._outputs[s][mb]
        self._send_outputs(action, outputs, peer)
        self._release_sent(s, mb, outputs)

    def _send_outputs(self, action: Action, outputs: tuple[Tensor, ...], peer: int) -> None:
        s, mb = action.stage, action.microbatch
        step = self._step_inputs
        if step is None:
            raise self._outside_run()
        expected = step.boundaries[mb][self._out_layer[s]]
        single = len(outputs) == 1
        if single and not expected.is_tuple:  # `matches` of one tensor, inlined
            output = outputs[0]
            try:
                same = output.dtype == expected.dtypes[0] and output.shape == expected.shapes[0]
            except AttributeError:  # not a tensor: `mismatch` says what it is
                same = False
        else:
            same = matches(expected, outputs)
        problem = None if same else expected.mismatch(outputs if expected.is_tuple else outputs[0])
        if problem is not None:
            raise BoundaryMismatch(
                f"rank {self.rank}: stage {s} produced an output for micro-batch {mb} that stage {s + 1} "
                f"on rank {peer} does not expect (its buffers come from the meta-device trace): {problem}; "
                f"layer outputs must not depend on tensor values"
            )
        if self._p2p is None:
            raise self._no_group()
        # A shared-memory send copies the bytes before it returns and keeps nothing: it takes
        # the outputs as they are; a process-group send keeps detached ones until done.
        if peer in self._copying_peers:
            tensors = outputs
        else:
            tensors = (outputs[0].detach(),) if single else tuple(t.detach() for t in outputs)
        transfer = self._senders[peer](tensors)
        if transfer is not None or self._sends:
            self._keep_until_sent(transfer, action, tensors)

    def _release_sent(self, s: int, mb: int, outputs: tuple[Tensor, ...]) -> None:
        # The backward needs the outputs' graph, not their values: free what the send no
        # longer reads (a process-group send keeps its own detached tensors until done). Not
        # under a weight stash (asynchronous schedules): freeing there broke the streaming
        # exactness test (tests/runtime/test_runtime_exact.py), so those outputs are kept.
        if self._stages[s].stash is None and release_sent(outputs) and self._held[s][mb] is not None \
                and self._run_counter is not None:
            self._held[s][mb] = self._run_counter.hold(self._inputs_of[s][mb])

    def _keep_until_sent(
        self, transfer: Transfer | None, action: Action, tensors: tuple[Tensor, ...]
    ) -> None:
        """Keep `tensors` alive while `transfer` may still read them (a shared-memory send has
        copied them when it returns: None, nothing to keep); drop those of sends completed since."""
        if self._sends:
            self._sends = [entry for entry in self._sends if not entry[0].done()]
        if transfer is not None and not transfer.done():
            self._sends.append((transfer, action, tensors))

    def _recv_forward(self, action: Action, *, peer: int, what: str) -> None:
        s, mb = action.stage, action.microbatch
        step = self._step_inputs
        p2p = self._p2p
        if step is None:
            raise self._outside_run()
        if p2p is None:
            raise self._no_group()
        value, buffers, views = self._receive_buffers.input(s, mb, step.boundaries[mb][self._in_layer[s]])
        # The consumer's leaves are made now, off the path from the message's arrival to its
        # compute: they share the buffers' memory, which the receive fills.
        self._recv_f[s][mb] = (as_leaves(value), self._receivers[peer](buffers, views), what)

    # -- backward ----------------------------------------------------------------------------

    def _output_grads(self, action: Action, *, shared_seed: bool = False) -> Grads:
        """The gradients at the outputs of `action`'s stage: received, handed over, or at the
        last stage the loss's seed. `shared_seed`: the seed may be a tensor other backwards read
        too (`seed_tensor`), for B, whose engine only reads it; I keeps its own, since W's direct
        weight gradients may keep a gradient they are handed as a parameter's `.grad`."""
        s, mb = action.stage, action.microbatch
        if self._stages[s].is_last:
            loss = self._outputs[s][mb][0]
            step = self._step_inputs
            if step is None:
                raise self._outside_run()
            if shared_seed:
                return (seed_tensor(step.scales[mb], step.loss_scale, loss),)
            return (torch.full_like(loss, seed_value(step.scales[mb], step.loss_scale, loss.dtype)),)
        pending = self._recv_b[s][mb]
        if pending is not None:
            self._recv_b[s][mb] = None
            grads: Grads = self._complete(pending, action)
            return grads
        handed = self._grad_handoff[s][mb]
        self._grad_handoff[s][mb] = None
        if handed is None:
            raise PipelineError(
                f"rank {self.rank}: {action} has no output gradient (neither received nor handed over)"
            )
        return tuple(handed)

    def _route_input_grads(self, s: int, mb: int, leaves: tuple[Tensor, ...], grads: Grads) -> None:
        if self._stages[s].is_first:
            return
        # Every differentiable boundary tensor gets a gradient (zeros when the stage did not
        # use it), so both sides agree on what crosses without looking at values.
        full: tuple[Tensor | None, ...]
        if len(leaves) == 1 and len(grads) == 1:  # a stage's usual boundary: no generators
            (leaf,), (grad,) = leaves, grads
            full = ((grad if grad is not None else torch.zeros_like(leaf)) if leaf.requires_grad else None,)
        else:
            full = tuple(
                (grad if grad is not None else torch.zeros_like(leaf)) if leaf.requires_grad else None
                for leaf, grad in zip(leaves, grads, strict=True)
            )
        if self._prev_local[s]:
            self._grad_handoff[s - 1][mb] = full
        elif len(full) == 1 and full[0] is not None:
            self._send_grads[s][mb] = full
        else:
            self._send_grads[s][mb] = tuple(g for g in full if g is not None)

    def _send_input_grads(
        self, action: Action, leaves: tuple[Tensor, ...], input_grads: Grads, peer: int
    ) -> None:
        """SEND_B fused into `action` (B or I): its input gradients to the previous stage on `peer`."""
        if (
            len(input_grads) == 1 and input_grads[0] is not None and leaves[0].requires_grad
            and self._p2p is not None
        ):
            # The usual boundary: its one gradient is what `_route_input_grads` would put in
            # `_send_grads` for `_send_backward` (a send means the previous stage is on another
            # rank), sent without those two calls and the table's round trip.
            sent: tuple[Tensor, ...] = input_grads  # type: ignore[assignment]  # its one entry is not None
            transfer = self._senders[peer](sent)
            if transfer is not None or self._sends:
                self._keep_until_sent(transfer, action, sent)
        else:
            self._route_input_grads(action.stage, action.microbatch, leaves, input_grads)
            self._send_backward(action, peer=peer)

    def _backward(self, action: Action, send_to: int | None = None, code: int = 0) -> None:
        """B; with `send_to`, then its SEND_B (as `_forward`), sent before the graph is freed."""
        s, mb = action.stage, action.microbatch
        grads = self._output_grads(action, shared_seed=True)
        leaves = self._inputs_of[s][mb]
        input_grads = backward_full(self._outputs[s][mb], grads, leaves)
        if send_to is not None:
            self._compute_ends[code] = time.perf_counter()
            self._send_input_grads(action, leaves, input_grads, send_to)
        self._inputs_of[s][mb] = self._outputs[s][mb] = self._held[s][mb] = None  # `_release`, inlined
        stash = self._stages[s].stash
        if stash is not None:
            stash.after_backward(mb)
        if send_to is None and s:  # stage 0 has no input gradient to route (`_route_input_grads`)
            self._route_input_grads(s, mb, leaves, input_grads)

    def _backward_input(self, action: Action, send_to: int | None = None, code: int = 0) -> None:
        """I; with `send_to`, then its SEND_B (as `_backward`)."""
        s, mb = action.stage, action.microbatch
        grads = self._output_grads(action)
        leaves = self._inputs_of[s][mb]
        stage = self._stages[s]
        # Recomputed activations must be unpacked inside autograd's call (checkpointing
        # recomputes once per call), so such stages keep W on autograd's path.
        input_grads, state = backward_input(
            self._outputs[s][mb], grads, leaves, stage.parameters, direct=not stage.recomputes,
            cache=self._group_caches[s],
        )
        if send_to is not None:
            self._compute_ends[code] = time.perf_counter()
            self._send_input_grads(action, leaves, input_grads, send_to)
        else:
            self._route_input_grads(s, mb, leaves, input_grads)
        self._weight_state[s][mb] = state
        self._inputs_of[s][mb] = self._outputs[s][mb] = self._held[s][mb] = None  # `_release`, inlined

    def _backward_weight(self, action: Action) -> None:
        s, mb = action.stage, action.microbatch
        state = self._weight_state[s][mb]
        if state is None:
            raise PipelineError(
                f"rank {self.rank}: {action} runs before I{s}.{mb}; the schedule must run I first"
            )
        self._weight_state[s][mb] = None
        backward_weight(state)
        stash = self._stages[s].stash
        if stash is not None:
            stash.after_backward(mb)

    def _send_backward(self, action: Action, *, peer: int) -> None:
        s, mb = action.stage, action.microbatch
        grads = self._send_grads[s][mb]
        self._send_grads[s][mb] = None
        if self._p2p is None:
            raise self._no_group()
        transfer = self._senders[peer](grads)
        if transfer is not None or self._sends:
            self._keep_until_sent(transfer, action, grads)

    def _recv_backward(self, action: Action, *, peer: int, what: str) -> None:
        s, mb = action.stage, action.microbatch
        step = self._step_inputs
        p2p = self._p2p
        if step is None:
            raise self._outside_run()
        if p2p is None:
            raise self._no_group()
        grads, buffers, views = self._receive_buffers.output_grads(
            s, mb, step.boundaries[mb][self._out_layer[s]]
        )
        self._recv_b[s][mb] = (grads, self._receivers[peer](buffers, views), what)

    # -- optimizer ---------------------------------------------------------------------------

    def _step(self, action: Action) -> None:
        if self._step_fn is None:
            raise PipelineError(
                f"rank {self.rank}: the schedule runs {action} but the pipeline has no optimizer; "
                "asynchronous schedules need "
                "Pipeline(parallel=ParallelOptions(optimizer=lambda params: ...))"
            )
        self._step_fn(action.stage, action.microbatch)
        # A weight stash's step gives the live parameters new data (`WeightStash.step`).
        self._forget_readiness()
