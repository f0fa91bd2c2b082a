"""How the planner orders candidates that fit: `rank_key`, with step times compared in 1% buckets.

    >>> best = min(candidates, key=rank_key)

Faster first (within `TIME_TOLERANCE`, a tie), then a family's order before a searched one,
then leaner, then simpler; the full order is step 4 of docs/decisions.md, "Planner search".
"""

from __future__ import annotations

import math

from pipefold.plan.result import Candidate
from pipefold.schedule import names

__all__ = ["SLACK", "TIME_TOLERANCE", "bucket_ceiling", "bucket_floor", "rank_key", "time_bucket"]

SLACK = 1e-9
"""Relative margin on bound comparisons: a bound summed in another order may exceed an equal time by
rounding, and must not skip a configuration that ties."""

TIME_TOLERANCE = 0.01
"""Step times within one bucket this wide (relative) count as equal when ranking."""


def time_bucket(step_time: float) -> int:
    """The tolerance bucket of `step_time` (log-spaced, so relative)."""
    return math.floor(math.log(max(step_time, 1e-300)) / math.log1p(TIME_TOLERANCE))


def bucket_ceiling(step_time: float) -> float:
    """The largest time in the bucket of `step_time`: bounds above it cannot tie."""
    return math.exp((time_bucket(step_time) + 1) * math.log1p(TIME_TOLERANCE))


def bucket_floor(step_time: float) -> float:
    """The smallest time in the bucket of `step_time`: only times below it rank ahead whatever else."""
    return math.exp(time_bucket(step_time) * math.log1p(TIME_TOLERANCE))


def rank_key(
    candidate: Candidate,
) -> tuple[int, bool, int, int, int, int, int, int, int, int, float, tuple[int, ...]]:
    """Sort key of candidates that fit: faster, then a family's order before a searched one, then
    leaner, then simpler (docs/decisions.md, "Planner search")."""
    order = names().index(candidate.schedule) if candidate.schedule in names() else len(names())
    return (
        time_bucket(candidate.step_time), candidate.is_searched_order, candidate.peak_memory,
        candidate.num_data_parallel, candidate.num_tensor_parallel, order, candidate.num_virtual,
        candidate.num_microbatches, len(candidate.recompute), candidate.gather_lookahead, candidate.step_time,
        candidate.recompute,
    )
