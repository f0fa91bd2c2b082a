"""How many cores the ranks on this host have, and whether they must share them.

Two decisions depend on it: ranks that share cores block on doorbells instead of
polling (docs/decisions.md, "doorbells", docs/decisions.md, "busy polling"), and a
measured timeline records how many ranks could compute at once, so the simulator can
replay the sharing (docs/decisions.md, "shared cores").
"""

from __future__ import annotations

import os

__all__ = ["processes_on_host", "ranks_share_cores", "shared_cores", "usable_cores"]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def processes_on_host(num_pipeline_ranks: int, num_replicas: int = 1) -> int:
    """How many processes compute on this host alongside this one.

    torchrun and pipefold's launchers say it in LOCAL_WORLD_SIZE, which also counts the
    data-parallel replicas (and anything else) that share the host. Without it, this
    pipeline's `num_pipeline_ranks` here times its `num_replicas`, assuming the replicas
    share the host too (more sharing assumed than there is costs a little speed; less
    would busy-poll cores that others compute on). Never fewer than the pipeline's own.
    """
    own = num_pipeline_ranks * max(num_replicas, 1)
    declared = os.environ.get("LOCAL_WORLD_SIZE", "")
    if declared.isdigit() and int(declared) >= 1:
        return max(int(declared), num_pipeline_ranks)
    return own


def ranks_share_cores(num_local_ranks: int) -> bool:
    """Whether `num_local_ranks` processes on this host outnumber the cores this process may use."""
    return num_local_ranks > usable_cores()


def shared_cores(
    num_local_ranks: int, threads_per_rank: int, num_host_processes: int | None = None
) -> float | None:
    """How many of this pipeline's `num_local_ranks` ranks, each computing on
    `threads_per_rank` threads, can compute at full speed at once: `CostModel.num_cores`.
    None when every process on the host has cores of its own.

    `num_host_processes` (default: the pipeline's own ranks) is every process computing
    on the host (`processes_on_host`). Where data-parallel replicas run the same schedule
    beside this pipeline, they compute when it does, so the pipeline gets its share of
    the cores: slots x its ranks / all processes (2 cores, dp=2 x pp=2: 1 core for the
    pipeline's 2 ranks), which is what the simulator's sharing then replays."""
    slots = max(usable_cores() // max(threads_per_rank, 1), 1)
    processes = max(num_host_processes or num_local_ranks, num_local_ranks)
    if processes <= slots:
        return None
    return slots * num_local_ranks / processes
