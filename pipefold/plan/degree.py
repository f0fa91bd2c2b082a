"""The data-parallel degree: which dp x pp splits of the devices to search, and what dp costs.

[Note: data-parallel step model]
`dp` replicas of a `pp`-rank pipeline each run the schedule on global_batch / dp rows
(the runtime of docs/parallelism.md), then every rank all-reduces its stages' gradients
with the same rank of the other replicas, after the schedule (not overlapped with the
backward). The planner prices that as:
- the pipeline part: the simulated step of one replica on its global_batch / dp rows,
  costs scaled linearly with rows as for any micro-batch size ([Note: cost scaling]
  in costs.py), so per-replica activations shrink with the replica's batch;
- the all-reduce: a ring all-reduce of the gradient bytes of the rank that holds the
  most, 2 (dp - 1) / dp x bytes / bandwidth + 2 (dp - 1) x latency on `dp_link`.
  Every rank reduces at once over its own group, so the largest one sets the time;
  the runtime's 25 MB buckets are all started before any is waited on, so their
  latencies are charged once, not per bucket. dp = 1, or no gradient bytes, costs 0.
- memory: each replica holds its stages' full weights, gradients and optimizer state
  (no sharding), so a rank's memory is that of the lone pipeline on the replica batch.
  The all-reduce's flat bucket buffers are not counted (as no communication buffer is).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipefold.simulate import Link

__all__ = ["Degree", "allreduce_time", "factorizations", "degree_problem"]


@dataclass(frozen=True, order=True)
class Degree:
    """dp replicas of a pp-rank pipeline, each on `replica_batch` rows."""

    num_data_parallel: int
    num_ranks: int
    """Pipeline ranks pp of each replica."""
    replica_batch: int
    """Samples each replica runs per step: global_batch / dp."""

    @property
    def num_devices(self) -> int:
        return self.num_data_parallel * self.num_ranks

    @property
    def text(self) -> str:
        """'dp=2 x pp=4'."""
        return f"dp={self.num_data_parallel} x pp={self.num_ranks}"


def allreduce_time(num_bytes: int, num_replicas: int, link: Link) -> float:
    """Seconds of a ring all-reduce of `num_bytes` across `num_replicas` (see [Note: data-parallel step
    model]): 2 (dp - 1) / dp x bytes / bandwidth + 2 (dp - 1) x latency; 0 with one replica or no bytes."""
    if num_replicas <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * (num_replicas - 1)
    return steps / num_replicas * num_bytes / link.bandwidth + steps * link.latency


def factorizations(num_devices: int) -> list[tuple[int, int]]:
    """Every (dp, pp) with dp x pp = num_devices, dp ascending."""
    return [(dp, num_devices // dp) for dp in range(1, num_devices + 1) if num_devices % dp == 0]


def degree_problem(
    global_batch: int, num_data_parallel: int, microbatches: int | None, uneven: bool
) -> str | None:
    """Why dp replicas cannot split `global_batch` (with m pinned to `microbatches`), or None.
    The reason does not name dp: the caller says which one."""
    dp = num_data_parallel
    if global_batch % dp:
        legal = ", ".join(str(d) for d in range(1, global_batch + 1) if global_batch % d == 0)
        return (
            f"global batch {global_batch} does not split into {dp} equal replica batches "
            f"(dp must divide it: {legal})"
        )
    rows = global_batch // dp
    if microbatches is not None and rows < microbatches:
        return (
            f"global batch {global_batch} gives {rows} rows per replica, fewer than "
            f"m={microbatches} (each micro-batch needs at least one row)"
        )
    if microbatches is not None and rows % microbatches and not uneven:
        return (
            f"global batch {global_batch} gives {rows} rows per replica, which m={microbatches} "
            "does not divide (allow uneven micro-batches, or pin another m)"
        )
    return None
