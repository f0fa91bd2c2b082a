"""Receive buffers kept per (stage, micro-batch) from one step to the next.

A step receives each (stage, micro-batch)'s input and output gradient once, with the same
shapes every step of a batch shape, so the executor asks `ReceiveBuffers` for a buffer instead
of allocating one per message. A kept buffer is handed out again only when nothing but this
pool holds it: neither its storage (no leaf detached from it, no view, no tensor autograd
saved) nor the tensor object itself (autograd hands a received gradient to hooks, and `I`'s
captured frontier gradients, as that very object). A consumer that keeps what it received past
the step gets a fresh buffer the next step, and what it kept never changes under it. Where
that cannot be checked (a torch without the storage use count) or the device has streams
(CUDA: a receive on the comm stream could overwrite what the compute stream still reads),
every message gets a fresh buffer.

A kept buffer also keeps a byte view of its memory (`shm.byte_view`): a shared-memory receive
copies into it with one slice assignment instead of a tensor copy (`input`,
`output_grads`).

The pool keeps one buffer per (stage, micro-batch) and direction: what a GPipe step holds at
its peak anyway, more than a 1F1B step (whose receives could share a few buffers; sharing
within a step needs the executor to say when a posted receive was consumed, not built).

Design notes: docs/decisions.md, "receive buffers".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pipefold.model import TensorMeta
from pipefold.runtime.stage import flatten
from pipefold.runtime.transport.shm import byte_view

__all__ = ["ReceiveBuffers", "reusable"]

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _alone_count() -> int:
    """The storage use count of a tensor nothing else refers to, as `reusable` reads it (the
    temporary storage object it asks through counts too)."""
    if _use_count is None:
        return -1
    fresh = torch.empty(1)
    return _use_count(fresh.untyped_storage()._cdata)


_ALONE = _alone_count()


def _most_refs(entry: tuple[object, Any, tuple[Tensor, ...], Any]) -> int:
    """The largest reference count among `entry`'s buffers, as `reusable` reads it (the same
    loop: its variable is one of the references counted)."""
    most = 0
    for buffer in entry[2]:
        refs = sys.getrefcount(buffer)
        if refs > most:
            most = refs
    return most


def _alone_refs() -> int:
    """References to a buffer held by nothing but its pool entry (the entry's value, or the
    tuple that is the value, and its buffers tuple), as `reusable` reads them."""
    value = torch.empty(1)
    entry = (None, value, (value,), None)
    del value
    return _most_refs(entry)


_ALONE_REFS = _alone_refs()


def reusable(entry: tuple[object, Any, tuple[Tensor, ...], Any]) -> bool:
    """Whether nothing but `entry` (a pool entry: description, value, buffers, their byte
    views, which hold no reference to them) refers to its
    buffers: no other reference to the tensor objects, no other tensor on their storage."""
    count = _use_count
    if count is None:
        return False
    # One loop for both checks (this runs once per received message); the reference count
    # is read as `_most_refs` reads it.
    for buffer in entry[2]:
        if sys.getrefcount(buffer) > _ALONE_REFS or count(buffer.untyped_storage()._cdata) > _ALONE:
            return False
    return True


Views = tuple[memoryview, ...] | None
_Entry = tuple[TensorMeta, Any, tuple[Tensor, ...], Views]
"""(the description the buffers were made for, the value handed to the consumer, its buffers,
their byte views or None)."""


def _views(buffers: tuple[Tensor, ...]) -> Views:
    views = tuple(byte_view(buffer) for buffer in buffers)
    return None if any(view is None for view in views) else views  # type: ignore[return-value]


class ReceiveBuffers:
    """Buffers for a step's receives, per (stage, micro-batch) and direction."""

    def __init__(self, num_stages: int, num_microbatches: int, device: torch.device) -> None:
        self._device = device
        self._reuse = _use_count is not None and device.type == "cpu"
        self._inputs: list[list[_Entry | None]] = [[None] * num_microbatches for _ in range(num_stages)]
        self._grads: list[list[_Entry | None]] = [[None] * num_microbatches for _ in range(num_stages)]

    def input(self, stage: int, microbatch: int, meta: TensorMeta) -> tuple[Any, tuple[Tensor, ...], Views]:
        """(the value to feed the stage, its tensors to receive into, their byte views or None)
        for a stage input `meta`."""
        entry = self._inputs[stage][microbatch]
        if entry is not None and (entry[0] is meta or entry[0] == meta) and reusable(entry):
            return entry[1], entry[2], entry[3]
        value = meta.empty(self._device)
        buffers = flatten(value)
        if not self._reuse:
            return value, buffers, None
        views = _views(buffers)
        self._inputs[stage][microbatch] = (meta, value, buffers, views)
        return value, buffers, views

    def output_grads(
        self, stage: int, microbatch: int, meta: TensorMeta
    ) -> tuple[tuple[Tensor | None, ...], tuple[Tensor, ...], Views]:
        """(one gradient per output, None where it is not differentiable; the gradients to
        receive into; their byte views or None) for a stage output `meta`."""
        entry = self._grads[stage][microbatch]
        if entry is not None and (entry[0] is meta or entry[0] == meta) and reusable(entry):
            return entry[1], entry[2], entry[3]
        device = self._device
        grads = tuple(
            torch.empty(shape, dtype=dtype, device=device)
            if dtype.is_floating_point or dtype.is_complex
            else None
            for shape, dtype in zip(meta.shapes, meta.dtypes, strict=True)
        )
        buffers = tuple(g for g in grads if g is not None)
        if not self._reuse:
            return grads, buffers, None
        views = _views(buffers)
        self._grads[stage][microbatch] = (meta, grads, buffers, views)
        return grads, buffers, views
