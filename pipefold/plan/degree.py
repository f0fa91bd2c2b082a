"""The degree: which dp x pp (x tp) splits of the devices to search, and what dp costs.

dp replicas each run the schedule on global_batch / dp rows, then all-reduce gradients
(docs/decisions.md, "Data-parallel step model").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipefold.simulate import Link

__all__ = ["Degree", "allgather_time", "allreduce_time", "factorizations", "degree_problem", "split_text"]


@dataclass(frozen=True, order=True)
class Degree:
    """dp replicas of a pp-rank pipeline, each on `replica_batch` rows, each stage split over tp ranks."""

    num_data_parallel: int
    num_ranks: int
    """Pipeline ranks pp of each replica."""
    replica_batch: int
    """Samples each replica runs per step: global_batch / dp."""
    num_tensor_parallel: int = 1
    """Tensor-parallel ranks tp per stage (docs/decisions.md, "Tensor-parallel cost model")."""

    @property
    def num_devices(self) -> int:
        return self.num_data_parallel * self.num_ranks * self.num_tensor_parallel

    @property
    def split(self) -> tuple[int, int, int]:
        """(dp, pp, tp)."""
        return self.num_data_parallel, self.num_ranks, self.num_tensor_parallel

    @property
    def text(self) -> str:
        """'dp=2 x pp=4', with ' x tp=2' where the stages are split."""
        return split_text(*self.split)


def split_text(num_data_parallel: int, num_ranks: int, num_tensor_parallel: int = 1) -> str:
    """'dp=2 x pp=4' (tp = 1) or 'dp=2 x pp=4 x tp=2'."""
    text = f"dp={num_data_parallel} x pp={num_ranks}"
    return text if num_tensor_parallel == 1 else f"{text} x tp={num_tensor_parallel}"


def allreduce_time(num_bytes: int, num_replicas: int, link: Link) -> float:
    """Seconds of a ring all-reduce of `num_bytes` across `num_replicas` (docs/decisions.md,
    "Data-parallel step model"): 2 (dp - 1) / dp x bytes / bandwidth + 2 (dp - 1) x latency; 0
    with one replica or no bytes."""
    if num_replicas <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * (num_replicas - 1)
    return steps / num_replicas * num_bytes / link.bandwidth + steps * link.latency


def allgather_time(num_bytes: int, num_replicas: int, link: Link) -> float:
    """Seconds of a ring all-gather that leaves `num_bytes` on each of `num_replicas` (ZeRO-1's
    broadcast of the updated weights from their owners): (dp - 1) / dp x bytes / bandwidth +
    (dp - 1) x latency; 0 with one replica or no bytes."""
    if num_replicas <= 1 or num_bytes <= 0:
        return 0.0
    steps = num_replicas - 1
    return steps / num_replicas * num_bytes / link.bandwidth + steps * link.latency


def factorizations(num_devices: int, tensor_parallel: Sequence[int] = (1,)) -> list[tuple[int, int, int]]:
    """Every (dp, pp, tp) with dp x pp x tp = num_devices and tp in `tensor_parallel`, dp then
    tp ascending."""
    return [
        (dp, num_devices // (dp * tp), tp)
        for dp in range(1, num_devices + 1)
        for tp in sorted(tensor_parallel)
        if num_devices % (dp * tp) == 0
    ]


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
