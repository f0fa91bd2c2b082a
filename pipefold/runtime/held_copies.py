"""Autocast's 16-bit weight copies that a step holds: told apart from activations, and measured.

While `runtime.stage.held_casts` keeps autocast's cache for a step (mixed precision, a flush
schedule, no full sharding), each weight autocast casts is copied once for the step, not once
per micro-batch. So the saved-tensor counter (`runtime.memory.ActivationCounter`) leaves those
copies out of the activations (`is_weight_copy`), and at the end of a step the copies the cache
holds are measured per stage (`measure_held_copies`, once: `Stage.held_cast_bytes`), those of
recomputed layers included, whose checkpointed forward saves none of them, and of a
tensor-parallel weight (a DTensor) this rank's shard's. `pipefold train`
reports them per rank (summary.json's memory `casts`), beside the counted activations, as the
planner prices them (`RankMemory.casts`).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from pipefold.runtime.parallel.tensor_parallel import local

__all__ = ["CastHolder", "casts_kept", "held_copy_bytes", "holding", "is_weight_copy", "measure_held_copies"]


class CastHolder(Protocol):
    """What `measure_held_copies` reads and sets of a `pipefold.runtime.stage.Stage`."""

    held_cast_bytes: int | None
    compute_dtype: torch.dtype | None
    device_type: str

    @property
    def parameters(self) -> Sequence[torch.nn.Parameter]: ...


_depth = [0]
"""How many `holding()` blocks are open (a list, changed in place)."""


@contextmanager
def casts_kept() -> Iterator[None]:
    """Keep autocast's cache of weight casts until the outermost holder leaves: an autocast
    nesting level held open (autocast itself stays off outside the forwards), so the forwards
    inside reuse the first one's 16-bit copy of each weight. What a step and a profile hold."""
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


@contextmanager
def holding() -> Iterator[None]:
    """Mark a step whose weight casts are held (`runtime.stage.held_casts` opens it)."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def is_weight_copy(tensor: Tensor, parameters: Container[int]) -> bool:
    """Whether `tensor` (or the tensor it is a view of) is a 16-bit copy of a parameter whose id is
    in `parameters`, made while the step's casts are held: autocast's cast of that weight."""
    if not _depth[0] or tensor.dtype not in (torch.bfloat16, torch.float16):
        return False
    base = getattr(tensor, "_base", None)
    node = (tensor if base is None else base).grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    source = node.next_functions[0][0]
    variable = getattr(source, "variable", None)
    # A weight, plain or a tensor-parallel shard (a DTensor: autocast caches its cast as any leaf's).
    return isinstance(variable, (torch.nn.Parameter, DTensor)) and id(variable) in parameters


def measure_held_copies(stages: Sequence[CastHolder]) -> None:
    """Set each stage's `held_cast_bytes` (where not set yet) to the bytes of the weight copies
    autocast's cache holds for it now: called at the end of a step, with the cache still held.

    For each fp32 weight a probe asks autocast for its 16-bit cast: a weight the step cast comes
    back from the cache, made before the probe began (autograd numbers its nodes in order); the
    others come back new, and are not counted (the cache is dropped right after)."""
    todo = [stage for stage in stages if stage.held_cast_bytes is None and stage.compute_dtype is not None]
    if not todo:
        return
    seen: set[int] = set()  # a weight two stages of the rank hold (tied) is one copy: the first's
    marker = _next_node_number()
    for stage in todo:
        dtype = stage.compute_dtype
        assert dtype is not None
        stage.held_cast_bytes = held_copy_bytes(stage.parameters, stage.device_type, dtype, marker, seen)


def held_copy_bytes(parameters: Iterable[Tensor], device_type: str, dtype: torch.dtype,
                    marker: int | None = None, seen: set[int] | None = None) -> int:
    """Bytes of the copies of `parameters` autocast's cache holds now (with `casts_kept` open),
    made before `marker` (`_next_node_number()` taken before any probe; None: now), each storage
    once (`seen`: those counted already, shared across calls). What `measure_held_copies` counts
    per stage and `pipefold.runtime.profile` per layer (`LayerProfile.held_cast_bytes`)."""
    seen = set() if seen is None else seen
    held = 0
    with torch.enable_grad(), holding():  # the probe's casts are the held kind (is_weight_copy)
        marker = _next_node_number() if marker is None else marker
        for param in parameters:
            copy = _cast_of(param, device_type, dtype)
            if copy is not None and copy.grad_fn is not None and copy.grad_fn._sequence_nr() < marker:
                storage = local(copy).untyped_storage()  # a shard's copy: this rank's part
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    held += storage.nbytes()
    return held


def _next_node_number() -> int:
    with torch.enable_grad():
        node = torch.zeros(1, requires_grad=True).clone().grad_fn
    assert node is not None
    return int(node._sequence_nr())


def _cast_of(param: Tensor, device_type: str, dtype: torch.dtype) -> Tensor | None:
    """Autocast's 16-bit cast of `param` (from its cache where it holds one); None where autocast
    would not cache one (not an fp32 leaf taking a gradient, a scalar)."""
    if (not isinstance(param, (torch.nn.Parameter, DTensor)) or param.dtype != torch.float32
            or not param.requires_grad or not param.is_leaf or param.dim() == 0):
        return None
    saved: list[Tensor] = []

    def keep(tensor: Tensor) -> Any:
        saved.append(tensor)
        return tensor

    # A matrix product with a factor that takes a gradient saves the weight's cast for it (a
    # product with no columns: nothing is computed).
    shape = (param.shape[-1], 0) if param.dim() >= 2 else (param.shape[0],)
    other: Tensor = torch.zeros(shape, device=local(param).device, requires_grad=True)
    if isinstance(param, DTensor):
        # Whole on every rank of the shard's mesh: the product with a shard then moves nothing.
        other = DTensor.from_local(other, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast(device_type, dtype=dtype):
            torch.matmul(param, other)
    return next((tensor for tensor in saved if is_weight_copy(tensor, {id(param)})), None)
