"""The executor's data and pure helpers: what a step takes and gives back (`StepInputs`,
`StepRecord`), the hooks it calls around actions (`StageHooks`, `ShardingActions`), and the tables
it derives from a rank's program once (first forwards and last backwards, receive consumers).
`pipefold.runtime.executor` re-exports the public names; import them from there.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pipefold.model import TensorMeta
from pipefold.runtime.transport.shm import layout
from pipefold.schedule import Action, Op
from pipefold.timeline import Event, Wait

__all__ = [
    "Grads",
    "LossFn",
    "ShardingActions",
    "StageHooks",
    "Stamp",
    "StepInputs",
    "StepRecord",
    "after",
    "before",
    "collection_paused",
    "compute_then_send",
    "consumer_names",
    "first_forward_and_last_backward",
    "matches",
    "message_bytes",
    "scaled_losses",
    "seed_tensor",
    "seed_value",
]


LossFn = Callable[[Any, Any], Tensor]
Grads = tuple[Tensor | None, ...]
Stamp = tuple[Action, float, float]
"""(action, start, end), seconds from the step's start: an `Event` or `Wait` not yet built
(building one, a frozen dataclass, cost more than the action's two clock reads)."""


@dataclass(frozen=True)
class StepInputs:
    """What one step needs on this rank.

    `inputs[mb]` only where this rank owns stage 0, `targets[mb]` only where it owns
    the last stage; `boundaries[mb][layer]` describes layer `layer`'s output for
    micro-batch `mb`; `scales[mb]` = micro-batch size / batch size.
    """

    inputs: Sequence[Any] | None
    targets: Sequence[Any] | None
    boundaries: Sequence[Sequence[TensorMeta]]
    scales: Sequence[float]
    loss_scale: float = 1.0
    """What the backward starts from: the loss times this (fp16's dynamic loss scale)."""


@dataclass(frozen=True)
class StepRecord:
    """What one step did on this rank."""

    losses: Tensor
    """Per micro-batch scaled loss (float64); zeros unless this rank owns the last stage."""
    event_stamps: tuple[Stamp, ...]
    """Each compute action that ran, with its start and end."""
    wait_stamps: tuple[Stamp, ...]
    """Each wait, with the action it held up."""
    activation_bytes_peak: int
    origin: float = 0.0
    """`time.perf_counter()` at the step's start on this rank; event times are relative to it."""
    rank: int = 0
    event_table: np.ndarray | None = field(default=None, compare=False)
    """`event_stamps` as rows of numbers (`step_gather.EVENT_FIELDS`: op code, stage,
    micro-batch, start, end), where the executor built them so (for the step's gather)."""

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(Event(self.rank, action, start, end) for action, start, end in self.event_stamps)

    @property
    def waits(self) -> tuple[Wait, ...]:
        return tuple(Wait(self.rank, action, start, end) for action, start, end in self.wait_stamps)


class StageHooks(Protocol):
    """What runs around a stage's first forward and after its last backward action (B or W) of
    each step: the overlapped data-parallel gradient all-reduce (runtime/parallel/data_parallel.py).
    Full sharding's gathers and reductions are actions of the schedule instead (`ShardingActions`)."""

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages the hooks apply to."""
        ...

    def before_first_forward(self, stage: int) -> None: ...

    def after_last_backward(self, stage: int) -> None: ...


class ShardingActions(Protocol):
    """What runs the schedule's sharding actions (full sharding, runtime/parallel/full_shard.py)."""

    def unshard(self, stage: int) -> None:
        """UNSHARD: start gathering the stage's whole weights."""
        ...

    def wait_gathered(self, stage: int) -> None:
        """Before the stage's next compute action after an UNSHARD: finish the gather."""
        ...

    def reshard(self, stage: int) -> None:
        """RESHARD: free the stage's whole weights."""
        ...

    def reduce_grad(self, stage: int) -> None:
        """REDUCE_GRAD: reduce-scatter the stage's gradients of the step."""
        ...


def first_forward_and_last_backward(
    actions: Sequence[Action], stages: Iterable[int]
) -> tuple[dict[int, int], dict[int, int]]:
    """({stage: index of its first F}, {stage: index of its last B or W}) in one rank's program:
    after the last B or W the stage's gradients of the step are complete."""
    wanted = set(stages)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.stage not in wanted:
            continue
        if action.op is Op.F and action.stage not in first:
            first[action.stage] = index
        elif action.op in (Op.B, Op.W):
            last[action.stage] = index
    return first, last


def compute_then_send(actions: Sequence[Action]) -> set[int]:
    """Indices of the compute actions in one rank's program directly followed by the send of
    their output (F then its SEND_F, B or I then its SEND_B): the executor runs each such pair
    as one handler call."""
    pairs = {Op.F: Op.SEND_F, Op.B: Op.SEND_B, Op.I: Op.SEND_B}
    return {
        index
        for index, (action, following) in enumerate(zip(actions, actions[1:], strict=False))
        if pairs.get(action.op) is following.op
        and following.stage == action.stage
        and following.microbatch == action.microbatch
    }


def message_bytes(
    messages: Iterable[tuple[Action, int]],
    boundaries: Sequence[Sequence[TensorMeta]],
    in_layer: Sequence[int],
    out_layer: Sequence[int],
) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes a step's `messages` (action, peer) send to and receive from each peer, laid out as
    the shared-memory channels lay them out (see `shm.layout`). `boundaries[mb][layer]`
    describes layer `layer`'s output; a stage's input is its `in_layer`'s, its output its
    `out_layer`'s."""
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    for action, peer in messages:
        s, mb = action.stage, action.microbatch
        op = action.op
        forward = op in (Op.SEND_F, Op.RECV_F)
        # A forward message carries a stage's output (send) or input (receive); a
        # backward one the gradient of the other side, differentiable entries only.
        at_output = op in (Op.SEND_F, Op.RECV_B)
        meta = boundaries[mb][out_layer[s] if at_output else in_layer[s]]
        sizes = [
            size for size, grad in zip(meta.byte_sizes, meta.differentiable, strict=True) if forward or grad
        ]
        totals = sent if op in (Op.SEND_F, Op.SEND_B) else received
        totals[peer] = layout(sizes, totals.get(peer, 0))[1]
    return sent, received


class MessageTraffic:
    """Bytes a rank's step sends to and receives from each peer (`message_bytes`), cached per
    batch shape: keyed on the identity of the step's boundary lists, which the pipeline keeps per
    shape."""

    _MAX_SHAPES = 64

    def __init__(
        self, messages: Sequence[tuple[Action, int]], in_layer: Sequence[int], out_layer: Sequence[int]
    ) -> None:
        self._messages = messages
        self._in_layer = in_layer
        self._out_layer = out_layer
        self._cache: dict[tuple[int, ...], tuple[tuple[object, ...], dict[int, int], dict[int, int]]] = {}

    def of(self, boundaries: Sequence[Sequence[TensorMeta]]) -> tuple[dict[int, int], dict[int, int]]:
        key = tuple(map(id, boundaries))
        cached = self._cache.get(key)
        if cached is not None:
            return cached[1], cached[2]
        sent, received = message_bytes(self._messages, boundaries, self._in_layer, self._out_layer)
        # The entry keeps its lists alive, so their ids stay theirs (the pipeline's shape cache
        # may drop a shape, and a list made later could otherwise take a dropped one's id).
        self._cache[key] = (tuple(boundaries), sent, received)
        # A caller building new lists every step would grow it, so bound it.
        if len(self._cache) > self._MAX_SHAPES:
            self._cache.pop(next(iter(self._cache)))
        return sent, received


def consumer_names(actions: Sequence[Action]) -> dict[tuple[Op, int, int], str]:
    """{(RECV_F or RECV_B, stage, micro-batch): name of the compute action that waits for that
    message}: the F of the same stage and micro-batch for a forward message, its B or I for a
    gradient."""
    names: dict[tuple[Op, int, int], str] = {}
    for action in actions:
        if action.op is Op.F:
            names[(Op.RECV_F, action.stage, action.microbatch)] = str(action)
        elif action.op in (Op.B, Op.I):
            names[(Op.RECV_B, action.stage, action.microbatch)] = str(action)
    return names


def matches(expected: TensorMeta, outputs: tuple[Tensor, ...]) -> bool:
    """Whether a stage's flattened `outputs` have exactly the shapes and dtypes `expected`
    describes (what `TensorMeta.mismatch` checks, without building a description)."""
    shapes, dtypes = expected.shapes, expected.dtypes
    if len(outputs) != len(shapes):
        return False
    try:
        for tensor, shape, dtype in zip(outputs, shapes, dtypes, strict=True):
            if tensor.dtype != dtype or tensor.shape != shape:
                return False
    except AttributeError:  # not a tensor: `mismatch` says what it is
        return False
    return True


def before(hook: Callable[[int], None], handler: Callable[[Action], None]) -> Callable[[Action], None]:
    """`handler` preceded by `hook(stage)`: only the actions where a sharded stage's weights are
    gathered get it, so the loop over the others is unchanged."""

    def run(action: Action) -> None:
        hook(action.stage)
        handler(action)

    return run


def after(hook: Callable[[int], None], handler: Callable[[Action], None]) -> Callable[[Action], None]:
    """`handler` followed by `hook(stage)` (a sharded stage's gradient reduction and free)."""

    def run(action: Action) -> None:
        handler(action)
        hook(action.stage)

    return run


_seeds: dict[tuple[float, float, torch.dtype], float] = {}


def seed_value(scale: float, loss_scale: float, dtype: torch.dtype) -> float:
    """The gradient at a micro-batch's loss when the backward starts at `loss * scale` (times
    `loss_scale` where it is not 1), as autograd's chain rule forms it in the loss's `dtype`:
    ones, times `loss_scale`, times `scale`, each product rounded to `dtype`. Seeding the loss
    with it gives bit for bit the gradients of the scaled loss, without its two tensor ops."""
    key = (scale, loss_scale, dtype)
    value = _seeds.get(key)
    if value is None:
        seed = torch.ones((), dtype=dtype)
        if loss_scale != 1.0:
            seed = seed * loss_scale
        value = float(seed * scale)
        if len(_seeds) >= 256:
            _seeds.clear()
        _seeds[key] = value
    return value


_seed_tensors: dict[tuple[float, float, torch.dtype, torch.device, torch.Size], Tensor] = {}


def seed_tensor(scale: float, loss_scale: float, loss: Tensor) -> Tensor:
    """`seed_value` as a tensor shaped like `loss` (the gradient a B starts from at the loss),
    one per value, dtype, device and shape, shared by every B it seeds: autograd's engine reads
    a root's gradient and never writes it (a tensor hook must not change its argument; a leaf's
    accumulation clones a gradient something else holds, as this cache does), and a `full_like`
    per micro-batch cost 0.9 µs in a loop, more on the caches a backward leaves, on the last
    stage's rank (1F1B's critical one). Not for I: W's direct weight gradients may keep a
    gradient they are handed as a parameter's `.grad` and add into it later."""
    key = (scale, loss_scale, loss.dtype, loss.device, loss.shape)
    seed = _seed_tensors.get(key)
    if seed is None:
        seed = torch.full_like(loss, seed_value(scale, loss_scale, loss.dtype))
        if len(_seed_tensors) >= 256:
            _seed_tensors.clear()
        _seed_tensors[key] = seed
    return seed


def scaled_losses(losses: list[Tensor], scales: Sequence[float]) -> Tensor:
    """Each micro-batch's loss times its scale (as `loss * scale` rounds it), as float64: a few
    tensor ops for all of them instead of two per micro-batch."""
    first = losses[0]
    dtype = first.dtype
    if first.device.type == "cpu" and (dtype == torch.float32 or dtype == torch.float64):
        # One multiply of the stacked losses by the scales in the losses' dtype: float32 and
        # float64 products compute in their own dtype (`loss * scale` rounds the scale to it
        # first), so every bit is the same, at a fifth of `_foreach_mul`'s CPU time on 64
        # scalars (its CPU path is one op per tensor). Run by the last stage's rank at the
        # step's end, before the step's gather.
        stacked = torch.stack(losses)
        return stacked.mul_(torch.tensor(scales[: len(losses)], dtype=dtype)).to(torch.float64)
    scaled = torch._foreach_mul(losses, [scales[mb] for mb in range(len(losses))])
    return torch.stack(scaled).to(torch.float64)


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a step's actions run (where it was on), back
    on after. A step allocates thousands of tracked objects (tensors, their graph's wrappers),
    so the collector would start several times inside it, each time traversing the micro-batches'
    live autograd graphs, and a rank paused there holds up every rank behind it in the pipeline.
    After the step the graphs are freed, and the collection that follows finds little to
    traverse. (Megatron-LM's `--manual-gc` does the same against stragglers.) Cycles created
    during the step wait until the step ends; objects freed by reference counting, which is
    nearly all of a step's, go at once as before."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
