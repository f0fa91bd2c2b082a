"""Counting the activation bytes a rank holds, with saved-tensor hooks.

Every tensor autograd saves for a backward passes through the pack hook. Bytes are
counted per storage (a tensor saved by two ops, or two views of one buffer, count
once) and released when the last saved reference to that storage is freed, which
is when the graph holding it is freed (after B, or after W for a split backward).
Parameters are not activations, so their storages are never counted, nor autocast's copies of
them while a step holds its casts (counted apart: runtime.held_copies). Stage inputs kept for a
recomputing backward are counted through `hold`.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from pipefold.runtime.held_copies import is_weight_copy
from pipefold.runtime.parallel.tensor_parallel import local

__all__ = ["ActivationCounter", "CountingTurns"]


class _Saved:
    """What the pack hook hands autograd: the tensor, plus a release on collection."""

    __slots__ = ("tensor", "_counter", "_key")

    def __init__(self, tensor: Tensor, counter: ActivationCounter, key: int) -> None:
        self.tensor = tensor
        self._counter = counter
        self._key = key

    def __del__(self) -> None:
        self._counter._release(self._key)


class ActivationCounter:
    """Current and peak bytes of saved activations on this rank."""

    def __init__(self, parameters: Iterable[Tensor]) -> None:
        held = list(parameters)
        self._excluded = {local(p).untyped_storage().data_ptr() for p in held}
        self._parameters = {id(p): weakref.ref(p) for p in held}
        """The parameters themselves (autograd saves a layer norm's weight and bias as they are),
        known by identity with no storage to look up; weakly, so the counter keeps none alive
        (a parameter replaced later, e.g. by sharding, is not held here)."""
        self._held: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _acquire(self, tensor: Tensor) -> int | None:
        if tensor.is_meta:
            return None
        # A DTensor (tensor parallelism) is a wrapper without storage: count its local shard.
        storage = local(tensor).untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._excluded:
            return None
        entry = self._held.get(key)
        if entry is None:
            size = storage.nbytes()
            self._held[key] = [1, size]
            self.current += size
            if self.current > self.peak:
                self.peak = self.current
        else:
            entry[0] += 1
        return key

    def _release(self, key: int) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._held[key]
            self.current -= entry[1]

    def _pack(self, tensor: Tensor) -> _Saved | Tensor:
        parameter = self._parameters.get(id(tensor))
        if parameter is not None and parameter() is tensor:
            return tensor  # a parameter is not an activation
        if is_weight_copy(tensor, self._parameters):
            return tensor  # held once for the step, not per micro-batch: runtime.held_copies
        key = self._acquire(tensor)
        # Keep a detached alias, not the tensor: a node that saves its own output would
        # otherwise hold that output, whose grad_fn is the node itself, a cycle through
        # C++ that no garbage collector sees. A full backward breaks it by freeing the
        # saved values, but a node that runs only in I (retain_graph) and never in W (an
        # attention's input path) would keep its activations for ever.
        return tensor if key is None else _Saved(tensor.detach(), self, key)

    @staticmethod
    def _unpack(saved: _Saved | Tensor) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count what autograd saves inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def hold(self, tensors: Iterable[Tensor]) -> list[_Saved]:
        """Count `tensors` as held until the returned handles are dropped."""
        handles = []
        for tensor in tensors:
            key = self._acquire(tensor)
            if key is not None:
                handles.append(_Saved(tensor, self, key))
        return handles


class CountingTurns:
    """Which steps count their activation bytes (counting costs a hook per saved tensor): the
    first step of each batch shape and every `every`-th step; the others report the last
    counted peak. Every rank decides alike (same step count, same broadcast batch shape), so
    the peaks gathered into a timeline always come from the same step."""

    _MAX_SHAPES = 1024
    """Shapes remembered before forgetting them all (a run of ever new shapes counts them again)."""

    def __init__(self, every: int) -> None:
        self._every = every
        self._counted_for: set[Hashable] = set()
        self._peak = 0

    def forget(self) -> None:
        """Count every shape again (the schedule or the recomputation changed its peaks)."""
        self._counted_for.clear()

    def due(self, batch_key: Hashable, step_index: int) -> bool:
        return batch_key not in self._counted_for or step_index % self._every == 0

    def peak(self, batch_key: Hashable, counted: bool, measured_peak: int) -> int:
        """The step's peak to report: `measured_peak` where it `counted`, else the last one."""
        if not counted:
            return self._peak
        if len(self._counted_for) >= self._MAX_SHAPES:
            self._counted_for.clear()
        self._counted_for.add(batch_key)
        self._peak = measured_peak
        return measured_peak
