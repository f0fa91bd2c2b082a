"""Point-to-point transfers between stages and the few collectives of a step.

Every operation is asynchronous and every wait goes through the `Watchdog`, so no
call here can block past `timeout_s` (see [Note: bounded waits] in failure.py).

[Note: CUDA streams]
On CUDA, transfers run on a dedicated communication stream so they overlap the
compute stream. Before a send, the comm stream waits for the compute stream (the
tensor must be fully written) and the tensor is marked as used by the comm stream
(`record_stream`), so the caching allocator does not hand its memory out while the
transfer reads it. A receive is posted on the comm stream after it waits for the
compute stream (the buffer's allocation is ordered there); once its work completes,
the compute stream waits for the comm stream before the buffer is read. On CPU
(gloo) none of this applies and the calls below are plain `isend`/`irecv`.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipefold.errors import PipelineError
from pipefold.runtime.failure import Watchdog

__all__ = ["P2P", "Collectives"]


class P2P:
    """Non-blocking sends and receives of tensor tuples between ranks of one group.

    `ranks` maps the pipeline's rank numbers to global ranks (torch.distributed
    addresses peers by global rank even inside a subgroup).
    """

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], device: torch.device) -> None:
        self._group = group
        self._global = tuple(ranks)
        self._comm_stream = (
            torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )

    @contextlib.contextmanager
    def _on_comm_stream(self) -> Iterator[None]:
        if self._comm_stream is None:
            yield
            return
        self._comm_stream.wait_stream(torch.cuda.current_stream(self._comm_stream.device))
        with torch.cuda.stream(self._comm_stream):
            yield

    def send(self, tensors: Sequence[Tensor], peer: int) -> list[dist.Work]:
        """Start sending `tensors` (in order) to pipeline rank `peer`."""
        works = []
        with self._on_comm_stream():
            for tensor in tensors:
                if self._comm_stream is not None:
                    tensor.record_stream(self._comm_stream)
                work = dist.isend(tensor, dst=self._global[peer], group=self._group)
                if work is None:  # only when this rank is outside the group, which the Pipeline rules out
                    raise PipelineError(
                        f"isend to rank {peer} returned no work; this rank is not in the group"
                    )
                works.append(work)
        return works

    def recv(self, buffers: Sequence[Tensor], peer: int) -> list[dist.Work]:
        """Post receives into `buffers` (in order) from pipeline rank `peer`."""
        works = []
        with self._on_comm_stream():
            for buffer in buffers:
                work = dist.irecv(buffer, src=self._global[peer], group=self._group)
                if work is None:
                    raise PipelineError(
                        f"irecv from rank {peer} returned no work; this rank is not in the group"
                    )
                works.append(work)
        return works

    def after_recv(self) -> None:
        """Order the compute stream after completed receives (no-op on CPU)."""
        if self._comm_stream is not None:
            torch.cuda.current_stream(self._comm_stream.device).wait_stream(self._comm_stream)


class Collectives:
    """The step's collectives (shape broadcast, loss reduction, timeline gather), all bounded."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        ranks: Sequence[int],
        device: torch.device,
        watchdog: Watchdog,
    ) -> None:
        self._group = group
        self._global = tuple(ranks)
        self._device = device
        self._watchdog = watchdog

    def _wait(self, work: dist.Work | None, what: str) -> None:
        if work is not None:
            self._watchdog.wait(work, what=what, peer=None)

    def all_reduce_sum(self, tensor: Tensor, *, what: str) -> None:
        """Sum `tensor` in place over the pipeline's group."""
        work = dist.all_reduce(tensor, group=self._group, async_op=True)
        self._wait(work, what)

    def broadcast_object(self, value: Any, *, src: int, what: str) -> Any:
        """`value` from pipeline rank `src` on every rank (pickled; small objects only)."""
        is_src = dist.get_rank(self._group) == src
        payload = pickle.dumps(value) if is_src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        self._wait(dist.broadcast(size, src=self._global[src], group=self._group, async_op=True), what)
        buffer = self._bytes_tensor(payload, int(size.item()))
        self._wait(dist.broadcast(buffer, src=self._global[src], group=self._group, async_op=True), what)
        return value if is_src else pickle.loads(buffer.cpu().numpy().tobytes())

    def all_gather_object(self, value: Any, *, what: str) -> list[Any]:
        """Every rank's `value`, in rank order."""
        payload = pickle.dumps(value)
        num_ranks = len(self._global)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        sizes = [torch.zeros_like(size) for _ in range(num_ranks)]
        self._wait(dist.all_gather(sizes, size, group=self._group, async_op=True), what)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        mine = self._bytes_tensor(payload, longest)
        gathered = [torch.empty(longest, dtype=torch.uint8, device=self._device) for _ in range(num_ranks)]
        self._wait(dist.all_gather(gathered, mine, group=self._group, async_op=True), what)
        return [
            pickle.loads(chunk[:length].cpu().numpy().tobytes())
            for chunk, length in zip(gathered, lengths, strict=True)
        ]

    def _bytes_tensor(self, payload: bytes, length: int) -> Tensor:
        buffer = torch.zeros(length, dtype=torch.uint8)
        if payload:
            buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return buffer.to(self._device)
