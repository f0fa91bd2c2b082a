"""Dropout whose masks are a function of (seed, step, micro-batch, layer, site), not of call order.

A pipeline runs micro-batches on several ranks in a schedule's order, and recomputation runs a
forward again inside the backward: torch's global generator would give every one of those a
different mask. `SeededDropout` instead seeds a `torch.Generator` per call from a key:

    seed, step       set for a step: `dropout_steps.start_at(seed, step)` then one
                     `dropout_steps.next_step()` per step (`Pipeline.step` calls it)
    micro-batch      set around each stage forward (`enter_microbatch`, `runtime.stage`)
    layer, site      the module's own (its index in the layer list, which dropout of it)

so the same model on one process, run micro-batch by micro-batch inside
`dropout_scope(seed=, step=, microbatch=)`, draws the same masks as any pipeline, and a
checkpointed forward replays them: pass `context_fn=replay_scope` to
`torch.utils.checkpoint.checkpoint` (the recomputation runs under the scope of the forward).
Outside any scope (a model trained on one process without one) the key is drawn from torch's
global generator, as `nn.Dropout` would.

The mask is kept for the backward as one byte per element (a bool tensor), the dropout-mask
term of Korthikanti et al. 2022's activation memory.

Under tensor parallelism the masks stay the one-process ones (Megatron's "model-parallel" and
"default" RNG trackers, made exact by the key instead): a dropout over attention heads
(`head_dim=`) draws each head's mask from its own key, the global head index folded in, so a rank
holding heads [first, first + n) (`forward(x, first_head=first)`) draws those heads' masks; a
dropout on a tensor every tp rank holds whole draws the same key's mask on each; and one on a
sequence slice (`sequence_shard`, which sequence parallelism sets) draws the whole tensor's mask
and keeps its slice (docs/decisions.md, "seeded dropout under tensor parallelism").
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError

__all__ = [
    "SeededDropout",
    "dropout_key",
    "head_key",
    "dropout_scope",
    "dropout_steps",
    "enter_microbatch",
    "replay_scope",
    "replica_seed",
]

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit function of `value`."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def dropout_key(seed: int, step: int, microbatch: int, layer: int, site: int) -> int:
    """The generator seed of one dropout call (63 bits, so torch takes it as is)."""
    key = 0
    for part in (seed, step, microbatch, layer, site):
        key = _mix(key ^ (part & _MASK64))
    return key >> 1


def head_key(key: int, head: int) -> int:
    """The generator seed of head `head`'s mask in the dropout call seeded `key`."""
    return _mix(key ^ (head & _MASK64)) >> 1


def replica_seed(seed: int, replica: int) -> int:
    """The dropout seed of data-parallel replica `replica`: replica 0 keeps `seed`, each other
    replica a seed of its own, so replicas holding different rows never share masks. A
    one-process reference of replica r's rows draws with `dropout_scope(seed=replica_seed(seed, r), ...)`."""
    return seed if replica == 0 else dropout_key(seed, -1, replica, -1, -1)


class _Steps:
    """The process's dropout seed and step: set once per run, advanced once per pipeline step."""

    def __init__(self) -> None:
        self.seed = 0
        self.step = -1
        """The step the forwards now running belong to (-1: none begun)."""
        self._next = 0

    def start_at(self, seed: int, step: int) -> None:
        """The run's seed, and the step the next `next_step()` begins (a resumed run's step)."""
        self.seed, self._next, self.step = seed, step, -1

    def next_step(self) -> int:
        """Begin the next step; returns its number."""
        self.step, self._next = self._next, self._next + 1
        return self.step


dropout_steps = _Steps()
"""The process's seed and step counter (`Pipeline.step` advances it; the job sets where it starts)."""


class _Scope:
    """Where the dropouts now running take their key from: a pinned (seed, step, micro-batch)
    (`dropout_scope`, a recomputation's replay), else the micro-batch a stage forward set with
    the current seed and step; neither: torch's global generator."""

    microbatch: int | None = None
    pinned: tuple[int, int, int] | None = None


MicrobatchScope = _Scope
"""The class whose `microbatch` a stage forward sets and restores itself (`enter_microbatch`
inlined: a Python call each way per forward on the executor's path)."""


def _current() -> tuple[int, int, int] | None:
    if _Scope.pinned is not None:
        return _Scope.pinned
    if _Scope.microbatch is None:
        return None
    return dropout_steps.seed, dropout_steps.step, _Scope.microbatch


def enter_microbatch(microbatch: int | None) -> int | None:
    """The forwards that follow draw masks for `microbatch` of the current step (`dropout_steps`);
    returns the micro-batch set before, to restore with the same call (a stage forward's
    try/finally: cheaper than a context manager on the executor's path)."""
    outer = _Scope.microbatch
    _Scope.microbatch = microbatch
    return outer


class _Pin:
    """Pins the key's (seed, step, micro-batch) inside a with block."""

    __slots__ = ("_key", "_outer")

    def __init__(self, key: tuple[int, int, int] | None) -> None:
        self._key = key
        self._outer: tuple[int, int, int] | None = None

    def __enter__(self) -> None:
        self._outer, _Scope.pinned = _Scope.pinned, self._key

    def __exit__(self, *exc: object) -> None:
        _Scope.pinned = self._outer


def dropout_scope(*, seed: int, step: int, microbatch: int) -> _Pin:
    """The forwards inside draw the masks of (seed, step, microbatch): how a one-process
    reference reproduces a pipeline's dropout."""
    return _Pin((seed, step, microbatch))


def replay_scope() -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    """`context_fn` of `torch.utils.checkpoint.checkpoint`: the recomputation in the backward
    runs under the key the forward ran under, so it draws the same masks."""
    return contextlib.nullcontext(), _Pin(_current())


class _MaskedScale(torch.autograd.Function):
    """x * mask / (1 - p), keeping only the bool mask (1 byte per element) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.masked_fill(~mask, 0.0) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(~mask, 0.0) * ctx.scale, None, None


def _uniform(shape: tuple[int, ...], key: int, device: torch.device) -> Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    return torch.rand(shape, generator=generator, device=device)


def _keep(shape: tuple[int, ...], key: int, p: float, device: torch.device, head_dim: int | None,
          first_head: int) -> Tensor:
    """The kept elements (True) of a tensor of `shape`: one draw, or one per head along `head_dim`."""
    if head_dim is None:
        return _uniform(shape, key, device) >= p
    head_dim %= len(shape)
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    head_shape = shape[:head_dim] + shape[head_dim + 1 :]
    for index in range(shape[head_dim]):
        keep.select(head_dim, index).copy_(
            _uniform(head_shape, head_key(key, first_head + index), device) >= p
        )
    return keep


class SeededDropout(nn.Module):
    """Dropout with probability `p` while training, its mask drawn from the key (module
    docstring) of this `layer` (index in the layer list) and `site` (which dropout of it).

    `head_dim`: the input's dim of attention heads; each head's mask is drawn from a key of its
    own (`head_key`, global head index `first_head` + local index), so a tensor-parallel rank
    holding some heads draws what one process draws for them."""

    sequence_shard: tuple[int, int, int] | None
    """(dim, index, count): the input is slice `index` of `count` equal slices along `dim` of the
    tensor one process drops (sequence parallelism sets it); the whole tensor's mask is drawn
    (`count` times the random numbers of the slice, as without sequence parallelism) and
    the slice of it kept. None: the input is the whole tensor."""

    def __init__(self, p: float, layer: int, site: int, *, head_dim: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"SeededDropout: p = {p!r}; use a probability in [0, 1), e.g. 0.1")
        self.p = p
        self.layer = layer
        self.site = site
        self.head_dim = head_dim
        self.sequence_shard = None

    def extra_repr(self) -> str:
        heads = "" if self.head_dim is None else f", head_dim={self.head_dim}"
        return f"p={self.p}, layer={self.layer}, site={self.site}{heads}"

    def forward(self, x: Tensor, first_head: int = 0) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type == "meta":  # a shape trace (pipefold.model.build): no values to draw
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        else:
            scope = _current()
            if scope is None:
                key = int(torch.randint(0, 2**62, (1,), device="cpu").item())
            else:
                key = dropout_key(*scope, self.layer, self.site)
            shape = tuple(x.shape)
            shard = self.sequence_shard
            if shard is None:
                keep = _keep(shape, key, self.p, x.device, self.head_dim, first_head)
            else:
                dim, index, count = shard
                dim %= len(shape)
                length = shape[dim]
                whole = (*shape[:dim], length * count, *shape[dim + 1 :])
                drawn = _keep(whole, key, self.p, x.device, self.head_dim, first_head)
                # A copy: the kept mask is the slice's bytes, not the whole one's.
                keep = drawn.narrow(dim, index * length, length).contiguous()
        out: Tensor = _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))  # type: ignore[no-untyped-call]
        return out
