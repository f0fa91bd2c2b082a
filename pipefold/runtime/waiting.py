"""How this rank waits for the others: the `Watchdog` that bounds every wait, polling busily
or blocking on doorbells depending on whether the host's processes outnumber its cores, and
the share of the cores each rank computes on (which the recorded timeline carries, so a cost
model replays turns taken on shared cores: docs/decisions.md, "shared cores").

    watchdog, shared = host_watchdog(board, dims, device, runtime_options)
"""

from __future__ import annotations

import torch

from pipefold.runtime.failure import BUSY_POLL_S, FailureBoard, Watchdog
from pipefold.runtime.options import RuntimeOptions
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.processes.cores import processes_on_host, ranks_share_cores, shared_cores

__all__ = ["host_watchdog"]


def host_watchdog(
    board: FailureBoard, dims: ParallelDims, device: torch.device, options: RuntimeOptions
) -> tuple[Watchdog, float | None]:
    """(this rank's watchdog, the shared-cores factor of its CPU timeline or None)."""
    # Data-parallel replicas and tp peers on the host compute beside this pipeline and take
    # their share of the cores.
    host_processes = processes_on_host(dims.num_ranks, dims.processes_beside())
    shared = (
        shared_cores(dims.num_ranks, torch.get_num_threads(), host_processes)
        if device.type == "cpu"
        else None
    )
    busy_wait = options.busy_wait
    if busy_wait is None:
        # Only shared-memory waits on CPU busy-poll; where processes share cores they block on
        # doorbells instead (docs/decisions.md, "busy polling").
        busy_wait = device.type == "cpu" and not ranks_share_cores(host_processes)
    watchdog = Watchdog(
        board,
        rank=dims.rank,
        timeout_s=float(options.timeout_s),
        poll_completion=device.type == "cuda",
        busy_poll_s=BUSY_POLL_S if busy_wait else 0.0,
        world_ranks=dims.ranks if dims.pipeline_group is not None else None,
    )
    return watchdog, shared
