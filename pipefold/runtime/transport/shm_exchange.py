"""The step's own collectives through shared memory when every rank is on one host.

Design notes: docs/decisions.md, "shared-memory exchange".
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipefold.runtime.failure import Watchdog
from pipefold.runtime.transport.doorbell import Doorbell, Ringer
from pipefold.runtime.transport.shm import SharedFile

__all__ = ["PROGRESS_STRIDE", "ShmExchange"]

_LINE = 64
_INT64_PER_LINE = _LINE // 8
_TOO_LARGE = -1
PROGRESS_STRIDE = _INT64_PER_LINE
_LENGTH = struct.Struct("=q")
"""A buffer's length word, read and written on the mapping directly (native order, as the
tensor views read it)."""


def _align(offset: int) -> int:
    return (offset + _LINE - 1) // _LINE * _LINE


class ShmExchange:
    """Broadcast and all-gather among `num_ranks` processes of one host; see docs/decisions.md,
    "shared-memory exchange".

    `capacity` is the largest payload (bytes) one rank may put into one operation.
    """

    def __init__(self, file: SharedFile, *, num_ranks: int, rank: int, capacity: int) -> None:
        self._file = file
        self.path = file.path
        self.num_ranks = num_ranks
        self.rank = rank
        self.capacity = _align(capacity)
        self._buffer_bytes = _LINE + self.capacity  # a length line, then the payload
        counters = num_ranks * _INT64_PER_LINE
        self._header = np.frombuffer(file.map, dtype=np.int64, count=counters + _INT64_PER_LINE)
        # The counters as Python ints, for the waits' polling loops (a memoryview index costs a
        # third of a numpy element read plus `int()`).
        self._words = memoryview(file.map)[: (num_ranks + 1) * _LINE].cast("q")
        self._data = torch.frombuffer(file.map, dtype=torch.uint8, offset=(num_ranks + 1) * _LINE)
        # Where `_data` starts in the mapping: byte payloads (`broadcast`, `all_gather`) are
        # copied with slices of the mapping, where a tensor view, a copy and a length view each
        # cost microseconds of dispatch on the step's critical path (step start and end).
        self._data_start = (num_ranks + 1) * _LINE
        self._op = 0
        self.peer_alive: Callable[[], bool] | None = None
        """Set by the owner: whether every other rank's process still runs."""
        self.doorbell: Doorbell | None = None
        """Set by the owner when ranks share cores: waits block on it (docs/decisions.md, "doorbells")."""
        self.ringers: list[Ringer] = []
        """The other ranks' doorbells, rung after each publish."""

    # -- setup -------------------------------------------------------------------------------

    @staticmethod
    def file_bytes(num_ranks: int, capacity: int) -> int:
        return (num_ranks + 1) * _LINE + num_ranks * 2 * (_LINE + _align(capacity))

    @classmethod
    def create(
        cls, directory: Path, name: str, *, num_ranks: int, capacity: int, token: int
    ) -> ShmExchange:
        """Rank 0's side: create and allocate the whole file."""
        size = cls.file_bytes(num_ranks, capacity)
        file = SharedFile.create(directory, name, size, allocate=size)
        exchange = cls(file, num_ranks=num_ranks, rank=0, capacity=capacity)
        exchange._header[num_ranks * _INT64_PER_LINE] = token  # the magic line after the counters
        return exchange

    @classmethod
    def open(
        cls, directory: Path, name: str, *, num_ranks: int, rank: int, capacity: int, token: int
    ) -> ShmExchange | None:
        """Another rank's side, or None when the file is not there or not rank 0's."""
        file = SharedFile.open(directory, name, cls.file_bytes(num_ranks, capacity))
        if file is None:
            return None
        exchange = cls(file, num_ranks=num_ranks, rank=rank, capacity=capacity)
        if int(exchange._header[num_ranks * _INT64_PER_LINE]) != token:
            exchange.close()
            return None
        return exchange

    def unlink(self) -> None:
        self._file.unlink()

    def progress_slots(self) -> memoryview:
        """Each rank's progress slot (pipefold/runtime/progress.py): rank r's is the int64 at
        `r * PROGRESS_STRIDE`, the second of its counter's cache line, which nothing else uses."""
        return memoryview(self._file.map)[8 : self.num_ranks * _LINE].cast("q")

    def close(self) -> None:
        for end in (self.doorbell, *self.ringers):
            if end is not None:
                end.close()
        if not self._file.alive:
            return
        self._words.release()
        del self._data, self._header
        self._file.close()

    # -- the operations ----------------------------------------------------------------------

    def broadcast(self, payload: bytes | None, *, src: int, watchdog: Watchdog, what: str) -> bytes | None:
        """`payload` of rank `src` on every rank; None everywhere when it did not fit (the
        caller then broadcasts through the process group)."""
        op = self._op + 1
        self._op = op
        if self.rank == src:
            if payload is None:
                raise ValueError("the broadcast source must give a payload")
            self._wait_all(op - 1, watchdog, what)
            fits = len(payload) <= self.capacity
            self._write(src, op, payload if fits else None)
            self._publish(op)
            return payload if fits else None
        self._wait_rank(src, op, watchdog, what)
        received = self._read(src, op)
        self._publish(op)
        return received

    def all_gather(self, tensor: Tensor, *, watchdog: Watchdog, what: str) -> list[Tensor] | None:
        """Every rank's `tensor` (same shape and dtype everywhere, CPU), in rank order; None
        on every rank when it does not fit (the caller then uses the process group)."""
        flat = tensor.contiguous().view(-1)
        num_bytes = flat.numel() * flat.element_size()
        if num_bytes > self.capacity:
            return None
        op = self._op + 1
        self._op = op
        self._wait_all(op - 1, watchdog, what)
        start = self._data_start + self._payload_offset(self.rank, op)
        mapping = self._file.map
        if num_bytes:
            mapping[start : start + num_bytes] = flat.detach().view(torch.uint8).numpy().tobytes()
        self._publish(op)
        self._wait_all(op, watchdog, what)
        gathered = []
        for rank in range(self.num_ranks):
            if not num_bytes:
                gathered.append(torch.empty(tensor.shape, dtype=flat.dtype))
                continue
            start = self._data_start + self._payload_offset(rank, op)
            # A copy of the bytes the tensor then owns (a bytearray: writable), as `clone()` gave.
            copied = bytearray(mapping[start : start + num_bytes])
            gathered.append(torch.frombuffer(copied, dtype=flat.dtype).view(tensor.shape))
        return gathered

    def sum_in_rank_order(
        self, tensor: Tensor, *, watchdog: Watchdog, what: str, out: Tensor | None = None
    ) -> Tensor:
        """The elementwise sum of every rank's `tensor` (same shape and dtype everywhere, CPU),
        added in rank order on every rank (`t0 + t1 + ...`), so every rank gets the same bits;
        written into `out` where given (a contiguous tensor of `tensor`'s shape and dtype, which
        may be `tensor` itself: each chunk is copied in before its sum is written), else into a
        new tensor. A tensor larger than `capacity` goes through in chunks of it, one operation
        each: the sum of a chunk is its elements' sums, so chunking changes no bit."""
        flat = tensor.detach().contiguous().view(-1)
        itemsize = flat.element_size()
        per_chunk = self.capacity // itemsize
        if per_chunk < 1:
            raise ValueError(f"capacity {self.capacity} holds no element of {flat.dtype}")
        if out is not None and not (
            out.shape == tensor.shape and out.dtype == tensor.dtype and out.is_contiguous()
        ):
            raise ValueError(f"out must be a contiguous {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
        result = torch.empty_like(tensor, memory_format=torch.contiguous_format) if out is None else out
        total = result.detach().view(-1)
        for start in range(0, flat.numel(), per_chunk):
            piece = flat[start : start + per_chunk]
            num_bytes = piece.numel() * itemsize
            op = self._op + 1
            self._op = op
            # The buffer of this parity last held op - 2: every rank read it before publishing op - 1.
            self._wait_all(op - 1, watchdog, what)
            offset = self._payload_offset(self.rank, op)
            self._data[offset : offset + num_bytes].view(flat.dtype).copy_(piece)
            self._publish(op)
            self._wait_all(op, watchdog, what)
            parts = [
                self._data[at : at + num_bytes].view(flat.dtype)
                for at in (self._payload_offset(rank, op) for rank in range(self.num_ranks))
            ]
            chunk = total[start : start + piece.numel()]
            if len(parts) == 1:
                chunk.copy_(parts[0])
                continue
            torch.add(parts[0], parts[1], out=chunk)
            for part in parts[2:]:
                chunk.add_(part)
        return result

    # -- helpers -----------------------------------------------------------------------------

    def _counter(self, rank: int) -> int:
        return int(self._words[rank * _INT64_PER_LINE])

    def _publish(self, op: int) -> None:
        self._header[self.rank * _INT64_PER_LINE] = op
        for ringer in self.ringers:
            ringer.ring()

    def _length_offset(self, rank: int, op: int) -> int:
        return (rank * 2 + op % 2) * self._buffer_bytes

    def _payload_offset(self, rank: int, op: int) -> int:
        return self._length_offset(rank, op) + _LINE

    def _write(self, rank: int, op: int, payload: bytes | None) -> None:
        mapping, base = self._file.map, self._data_start
        length_at = base + self._length_offset(rank, op)
        if payload is None:
            _LENGTH.pack_into(mapping, length_at, _TOO_LARGE)
            return
        start = base + self._payload_offset(rank, op)
        mapping[start : start + len(payload)] = payload
        _LENGTH.pack_into(mapping, length_at, len(payload))

    def _read(self, rank: int, op: int) -> bytes | None:
        mapping, base = self._file.map, self._data_start
        (length,) = _LENGTH.unpack_from(mapping, base + self._length_offset(rank, op))
        if length == _TOO_LARGE:
            return None
        start = base + self._payload_offset(rank, op)
        return mapping[start : start + length]

    def _wait_rank(self, rank: int, op: int, watchdog: Watchdog, what: str) -> None:
        words, index = self._words, rank * _INT64_PER_LINE
        watchdog.wait_until(
            lambda: words[index] >= op,  # type: ignore[no-any-return]
            what=what,
            peer=rank,
            peer_alive=self.peer_alive,
            block=None if self.doorbell is None else self.doorbell.wait,
        )

    def _wait_all(self, op: int, watchdog: Watchdog, what: str) -> None:
        others: Sequence[int] = [r for r in range(self.num_ranks) if r != self.rank]
        if all(self._counter(r) >= op for r in others):
            return
        words, indices = self._words, [r * _INT64_PER_LINE for r in others]
        watchdog.wait_until(
            lambda: all(words[index] >= op for index in indices),
            what=what,
            peer=None,
            peer_alive=self.peer_alive,
            block=None if self.doorbell is None else self.doorbell.wait,
        )
