"""The step's own collectives through shared memory when every rank is on one host.

[Note: shared-memory exchange]
Each step starts with a broadcast (the batch description, from the rank of stage 0)
and ends with an all-gather (every rank's losses and measured timeline, one float64
row each; see step_gather.py). Through gloo on this machine those cost about 0.7 ms and
1 ms per step on the root even when nobody is late: a pickle, two loopback socket
round trips and a wake-up of gloo's I/O thread each. When all ranks of the pipeline
share a host (CPU), a `ShmExchange` carries both instead: one /dev/shm file with a slot
per rank, each slot a published-operation counter on its own cache line and two
payload buffers.

Every rank calls the exchange's operations in the same order (they are collectives),
so operation `n` is the same call everywhere. Its payloads go to buffer `n % 2`. A rank
raises its counter to `n` when it is done with operation `n` as far as others need it:
after writing its payload (the source of a broadcast, every rank of an all-gather) or
after reading the source's (a broadcast's other ranks). Before a rank writes operation
`n` it waits until every counter is at least `n - 1`: a rank is at `n - 1` only after
finishing operation `n - 2` whole, reads included, so nobody still reads the buffer
that operation `n` overwrites. Ordering within the file relies on x86-64 store order,
as the channels do (see [Note: shared-memory channels] in shm.py).

A payload that does not fit its buffer goes through the process group instead: an
all-gather's size is the same on every rank, so all decide alike; a broadcast's source
writes the length -1, and every rank then joins the process group's broadcast.

Waits use the watchdog: bounded by `timeout_s`, aware of the failure board and of a
peer process that died. The file is created by rank 0, opened by the others after a
handshake through the process group, and unlinked once every rank holds a mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipefold.runtime.failure import Watchdog
from pipefold.runtime.transport.doorbell import Doorbell, Ringer
from pipefold.runtime.transport.shm import SharedFile

__all__ = ["ShmExchange"]

_LINE = 64
_INT64_PER_LINE = _LINE // 8
_TOO_LARGE = -1


def _align(offset: int) -> int:
    return (offset + _LINE - 1) // _LINE * _LINE


class ShmExchange:
    """Broadcast and all-gather among `num_ranks` processes of one host; see [Note: shared-memory exchange].

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
        self._data = torch.frombuffer(file.map, dtype=torch.uint8, offset=(num_ranks + 1) * _LINE)
        self._op = 0
        self.peer_alive: Callable[[], bool] | None = None
        """Set by the owner: whether every other rank's process still runs."""
        self.doorbell: Doorbell | None = None
        """Set by the owner when ranks share cores: waits block on it ([Note: doorbells])."""
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

    def close(self) -> None:
        for end in (self.doorbell, *self.ringers):
            if end is not None:
                end.close()
        if not self._file.alive:
            return
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
        start = self._payload_offset(self.rank, op)
        self._data[start : start + num_bytes].view(flat.dtype).copy_(flat)
        self._publish(op)
        self._wait_all(op, watchdog, what)
        gathered = []
        for rank in range(self.num_ranks):
            start = self._payload_offset(rank, op)
            gathered.append(self._data[start : start + num_bytes].view(flat.dtype).view(tensor.shape).clone())
        return gathered

    # -- helpers -----------------------------------------------------------------------------

    def _counter(self, rank: int) -> int:
        return int(self._header[rank * _INT64_PER_LINE])

    def _publish(self, op: int) -> None:
        self._header[self.rank * _INT64_PER_LINE] = op
        for ringer in self.ringers:
            ringer.ring()

    def _length_offset(self, rank: int, op: int) -> int:
        return (rank * 2 + op % 2) * self._buffer_bytes

    def _payload_offset(self, rank: int, op: int) -> int:
        return self._length_offset(rank, op) + _LINE

    def _write(self, rank: int, op: int, payload: bytes | None) -> None:
        length = self._data[self._length_offset(rank, op) :][:8].view(torch.int64)
        if payload is None:
            length[0] = _TOO_LARGE
            return
        start = self._payload_offset(rank, op)
        if payload:
            source = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            self._data[start : start + len(payload)].copy_(source)
        length[0] = len(payload)

    def _read(self, rank: int, op: int) -> bytes | None:
        length = int(self._data[self._length_offset(rank, op) :][:8].view(torch.int64)[0])
        if length == _TOO_LARGE:
            return None
        start = self._payload_offset(rank, op)
        return bytes(self._data[start : start + length].numpy())

    def _wait_rank(self, rank: int, op: int, watchdog: Watchdog, what: str) -> None:
        watchdog.wait_until(
            lambda: self._counter(rank) >= op,
            what=what,
            peer=rank,
            peer_alive=self.peer_alive,
            block=None if self.doorbell is None else self.doorbell.wait,
        )

    def _wait_all(self, op: int, watchdog: Watchdog, what: str) -> None:
        others: Sequence[int] = [r for r in range(self.num_ranks) if r != self.rank]
        if all(self._counter(r) >= op for r in others):
            return
        watchdog.wait_until(
            lambda: all(self._counter(r) >= op for r in others),
            what=what,
            peer=None,
            peer_alive=self.peer_alive,
            block=None if self.doorbell is None else self.doorbell.wait,
        )
