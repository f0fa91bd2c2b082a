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


class SeededDropout(nn.Module):
    """Dropout with probability `p` while training, its mask drawn from the key (module
    docstring) of this `layer` (index in the layer list) and `site` (which dropout of it)."""

    def __init__(self, p: float, layer: int, site: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"SeededDropout: p = {p!r}; use a probability in [0, 1), e.g. 0.1")
        self.p = p
        self.layer = layer
        self.site = site

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, site={self.site}"

    def forward(self, x: Tensor) -> Tensor:
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
            generator = torch.Generator(device=x.device)
            generator.manual_seed(key)
            keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.p
        out: Tensor = _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))  # type: ignore[no-untyped-call]
        return out
