"""How many cores the ranks on this host have, and whether they must share them.

Two decisions depend on it: ranks that share cores block on doorbells instead of
polling ([Note: doorbells] in doorbell.py, [Note: busy polling] in failure.py), and a
measured timeline records how many ranks could compute at once, so the simulator can
replay the sharing ([Note: shared cores] in pipefold/simulate/costs.py).
"""

from __future__ import annotations

import os

__all__ = ["ranks_share_cores", "shared_cores", "usable_cores"]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ranks_share_cores(num_local_ranks: int) -> bool:
    """Whether `num_local_ranks` processes on this host outnumber the cores this process may use."""
    return num_local_ranks > usable_cores()


def shared_cores(num_local_ranks: int, threads_per_rank: int) -> int | None:
    """How many of `num_local_ranks` ranks, each computing on `threads_per_rank` threads,
    can compute at full speed at once: `CostModel.num_cores`. None when every rank has
    cores of its own."""
    slots = max(usable_cores() // max(threads_per_rank, 1), 1)
    return slots if num_local_ranks > slots else None
