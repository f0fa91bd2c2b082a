"""A step's batch: its description broadcast from the rank of stage 0, its rows cut into
micro-batches on this rank's device, and the boundary shapes traced on the meta device for
each micro-batch size (cached per shape) as they travel between stages.

A batch is one tensor (or tuple of tensors), batch first, cut into the schedule's
micro-batches by rows; or `Microbatches([...])`, the micro-batches themselves, each of its own
shape (e.g. its own sequence length), so that nothing is padded to the longest:

    pipe.step(Microbatches([x0, x1]), Microbatches([y0, y1]))   # x0: (4, 128), x1: (4, 512)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError, PipelineError
from pipefold.model import LayerLike, TensorMeta, trace_boundaries
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.transport.comm import Collectives
from pipefold.schedule import Schedule

__all__ = [
    "BoundaryShapes", "Microbatches", "SplitBatch", "batch_size", "chunk_sizes", "split", "split_batch",
]


class Microbatches:
    """A step's batch given as its micro-batches, one entry per micro-batch of the schedule,
    each a tensor or a tuple of tensors (batch first) of its own shape: the pipeline runs each
    at its own shape instead of cutting one batch by rows. Pass it for the inputs (rank of
    stage 0) and the targets (rank of the last stage) alike. The step's loss weighs each
    micro-batch's loss by its rows over the step's rows, as for a batch cut by rows."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Any]) -> None:
        if isinstance(parts, Tensor) or not isinstance(parts, Sequence) or not parts:
            raise ConfigError(
                f"Microbatches({type(parts).__name__}): give a non-empty list with one tensor "
                "(or tuple of tensors) per micro-batch"
            )
        self.parts: tuple[Any, ...] = tuple(parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __repr__(self) -> str:
        return f"Microbatches({len(self.parts)} parts)"


@dataclass(frozen=True)
class SplitBatch:
    """One step's batch as this rank sees it (inputs on stage 0's rank, targets on the last's)."""

    meta: TensorMeta
    """The batch's description (with `Microbatches`: the first micro-batch's)."""
    size: int
    sizes: list[int]
    """The rows of each micro-batch."""
    inputs: list[Any] | None
    targets: list[Any] | None
    parts: tuple[TensorMeta, ...] | None = None
    """Each micro-batch's description when the batch came as `Microbatches`, else None."""

    @property
    def key(self) -> TensorMeta | tuple[TensorMeta, ...]:
        """Equal for batches of equal shapes (micro-batch by micro-batch)."""
        return self.meta if self.parts is None else self.parts

    def boundaries(self, shapes: Callable[[TensorMeta, int], list[TensorMeta]]) -> list[list[TensorMeta]]:
        """Each micro-batch's boundary descriptions (`shapes` caches them per shape)."""
        if self.parts is None:
            # A batch cut by rows has at most two micro-batch sizes: trace (or look up) each once.
            by_size: dict[int, list[TensorMeta]] = {}
            for size in self.sizes:
                if size not in by_size:
                    by_size[size] = shapes(self.meta, size)
            return [by_size[size] for size in self.sizes]
        return [shapes(part, size) for part, size in zip(self.parts, self.sizes, strict=True)]


def split_batch(
    rank: int,
    schedule: Schedule,
    inputs: Any,
    targets: Any,
    collectives: Collectives | None,
    device: torch.device,
    *,
    caller: str = "step",
) -> SplitBatch:
    """Agree on the batch's description (broadcast from stage 0's rank), check it, and cut
    this rank's inputs and targets into the schedule's micro-batches on `device`. `caller`
    ("step", "evaluate") names the call in messages."""
    first_rank = schedule.placement[0]
    last_rank = schedule.placement[-1]
    num_microbatches = schedule.num_microbatches
    described: TensorMeta | tuple[TensorMeta, ...] | None = None
    if rank == first_rank:
        if inputs is None:
            raise ConfigError(
                f"rank {rank} holds stage 0 but {caller}() got inputs=None; pass the batch on this rank"
            )
        described = _describe(inputs, "inputs")
    if collectives is not None:
        # A description is a frozen TensorMeta (or a tuple of them) that nothing changes.
        described = collectives.broadcast_object(
            described, src=first_rank, what=f"{caller} start", immutable=True
        )
    if isinstance(described, tuple):
        parts: tuple[TensorMeta, ...] | None = described
        if len(described) != num_microbatches:
            raise ConfigError(
                f"{caller}() got Microbatches of {len(described)} parts but num_microbatches is "
                f"{num_microbatches}; give one part per micro-batch"
            )
        batch_meta = described[0]
        sizes = [batch_size(part) for part in described]
        if 0 in sizes:
            raise ConfigError(
                f"{caller}() got Microbatches with rows {sizes}; give every micro-batch at least one row"
            )
        rows = sum(sizes)
    elif isinstance(described, TensorMeta):
        parts = None
        batch_meta = described
        rows = batch_size(batch_meta)
        if rows < num_microbatches:
            raise ConfigError(
                f"the batch has {rows} rows but num_microbatches is {num_microbatches}; "
                f"use a batch of at least {num_microbatches} rows or fewer micro-batches"
            )
        sizes = chunk_sizes(rows, num_microbatches)
    else:
        raise PipelineError(f"rank {rank} received no batch description from rank {first_rank}")
    split_inputs = None
    if rank == first_rank:
        split_inputs = _cut(inputs, parts, num_microbatches, device)
    split_targets = None
    if rank == last_rank:
        if targets is None:
            raise ConfigError(
                f"rank {rank} holds the last stage but {caller}() got targets=None; pass them here"
            )
        if isinstance(targets, Microbatches) != (parts is not None):
            given = "Microbatches" if isinstance(targets, Microbatches) else "one batch"
            raise ConfigError(
                f"{caller}() got {given} for the targets but "
                f"{'Microbatches' if parts is not None else 'one batch'} for the inputs; "
                "give both as Microbatches (one part per micro-batch) or both as one batch"
            )
        target_meta = _describe(targets, "targets")
        target_sizes = (
            [batch_size(part) for part in target_meta] if isinstance(target_meta, tuple) else None
        )
        target_rows = sum(target_sizes) if target_sizes is not None else batch_size(target_meta)  # type: ignore[arg-type]
        if target_sizes is not None and target_sizes != sizes:
            raise ConfigError(
                f"the target micro-batches have {target_sizes} rows but the input micro-batches "
                f"{sizes}; give one target per row of each micro-batch"
            )
        if target_rows != rows:
            raise ConfigError(
                f"targets have {target_rows} rows but inputs have {rows}; give one target per row"
            )
        split_targets = _cut(targets, parts, num_microbatches, device)
    return SplitBatch(batch_meta, rows, sizes, split_inputs, split_targets, parts)


def _describe(value: Any, what: str) -> TensorMeta | tuple[TensorMeta, ...]:
    fix = "pass a tensor or a tuple of tensors, batch first"
    if isinstance(value, Microbatches):
        return tuple(
            TensorMeta.of(part, what=f"{what} micro-batch {mb}", fix=fix)
            for mb, part in enumerate(value.parts)
        )
    return TensorMeta.of(value, what=what, fix=fix)


def _cut(
    value: Any, parts: tuple[TensorMeta, ...] | None, num_microbatches: int, device: torch.device
) -> list[Any]:
    if parts is None:
        return split(value, num_microbatches, device)
    return [
        _to_device(part, device) if isinstance(part, Tensor) else tuple(_to_device(t, device) for t in part)
        for part in value.parts
    ]


_MAX_SHAPES = 1024
"""Batch shapes whose boundaries `BoundaryShapes` keeps (a few hundred bytes per layer each)."""


class BoundaryShapes:
    """Each layer's output description for a batch description and micro-batch rows, traced
    on the meta device once per shape, as this rank sends and receives it (sequence-sharded
    by tensor parallelism, in the compute dtype under mixed precision)."""

    def __init__(
        self,
        layers: Sequence[LayerLike],
        meta: Sequence[nn.Module],
        dims: ParallelDims,
        sequence_sharded: Mapping[int, int],
        compute_dtype: torch.dtype | None,
    ) -> None:
        self._layers = layers
        self._meta = meta
        self._dims = dims
        self._sequence_sharded = sequence_sharded
        self._compute_dtype = compute_dtype
        self._cache: dict[TensorMeta, list[TensorMeta]] = {}

    def __call__(self, batch_meta: TensorMeta, rows: int) -> list[TensorMeta]:
        key = TensorMeta(
            shapes=tuple((rows, *shape[1:]) for shape in batch_meta.shapes),
            dtypes=batch_meta.dtypes,
            is_tuple=batch_meta.is_tuple,
        )
        cached = self._cache.get(key)
        if cached is None:
            sample = tuple(
                torch.empty(s, dtype=d, device="meta") for s, d in zip(key.shapes, key.dtypes, strict=True)
            )
            cached = trace_boundaries(self._layers, sample if key.is_tuple else sample[0], meta=self._meta)
            cached = self._dims.shard_boundaries(cached, self._sequence_sharded)
            if self._compute_dtype is not None:
                cached = _in_compute_dtype(cached, self._compute_dtype)
            if len(self._cache) >= _MAX_SHAPES:  # a run of ever new shapes: drop the oldest
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = cached
        return cached


def _in_compute_dtype(boundaries: list[TensorMeta], dtype: torch.dtype) -> list[TensorMeta]:
    """The boundaries as stages cast them under mixed precision (`Stage.forward`): fp32 entries
    travel in `dtype`; the last layer's output (the loss function's input) is left as traced."""

    def cast(meta: TensorMeta) -> TensorMeta:
        return replace(meta, dtypes=tuple(dtype if d == torch.float32 else d for d in meta.dtypes))

    return [cast(meta) for meta in boundaries[:-1]] + boundaries[-1:]


def chunk_sizes(rows: int, num_chunks: int) -> list[int]:
    """The rows of each of `torch.tensor_split(rows, num_chunks)`'s chunks, without a tensor: the
    first `rows % num_chunks` chunks hold one row more than the others."""
    base, extra = divmod(rows, num_chunks)
    return [base + 1] * extra + [base] * (num_chunks - extra)


def batch_size(meta: TensorMeta) -> int:
    rows = {shape[0] if shape else -1 for shape in meta.shapes}
    if len(rows) != 1 or -1 in rows:
        raise ConfigError(
            f"every tensor of a batch must have the same first (batch) dimension, got {meta}; "
            "put the batch dimension first"
        )
    return rows.pop()


def split(value: Any, num_chunks: int, device: torch.device) -> list[Any]:
    if isinstance(value, Tensor):
        return list(torch.tensor_split(_to_device(value, device), num_chunks))
    columns = [torch.tensor_split(_to_device(tensor, device), num_chunks) for tensor in value]
    return [tuple(column[mb] for column in columns) for mb in range(num_chunks)]


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`. A host batch bound for a GPU goes through page-locked memory
    and an asynchronous copy, so the host is not held up while the step's inputs travel
    (the copy is ordered on the current stream before the forwards that read it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)
