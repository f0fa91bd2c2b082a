"""Measure the point-to-point link between ranks 0 and 1 (gloo on this machine).

The simulator's link model is latency + bytes / bandwidth (pipefold.simulate.Link);
a ping-pong of a small and a large message gives both: half the small round trip is
the latency, and the extra time of the large message over the small one is its bytes
over the bandwidth.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

__all__ = ["measure_link"]

_SMALL_BYTES = 4
_LARGE_BYTES = 4 * 2**20


def _round_trip(rank: int, num_bytes: int, repeats: int) -> float:
    buffer = torch.zeros(num_bytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_link(rank: int, repeats: int = 7) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) seen by rank 0; every rank must call it (others idle)."""
    dist.barrier()
    small = _round_trip(rank, _SMALL_BYTES, repeats)
    large = _round_trip(rank, _LARGE_BYTES, repeats)
    dist.barrier()
    latency = small / 2
    extra = max(large - small, 1e-9) / 2
    return latency, (_LARGE_BYTES - _SMALL_BYTES) / extra
