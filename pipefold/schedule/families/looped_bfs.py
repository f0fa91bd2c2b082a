"""Looped BFS (Lamy-Poirier, 2022, "Breadth-First Pipeline Parallelism")."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, looped_placement


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Breadth-first over looped stages: all micro-batches of local stage 0, then of stage 1, …

    Backwards run the local stages in reverse, and within a stage the micro-batches
    last-in first-out (as torch's ScheduleLoopedBFS does), so the newest activations
    are consumed first. p=2, m=2, v=2::

        rank 0  F0.0 F0.1 F2.0 F2.1 B2.1 B2.0 B0.1 B0.0
        rank 1  F1.0 F1.1 F3.0 F3.1 B3.1 B3.0 B1.1 B1.0

    Bubble (uniform costs): (p-1)/(v·m+p-1). Memory: GPipe-like, all v·m
    chunks (m micro-batches of every local stage) held on every rank.
    """
    placement = looped_placement(num_ranks, num_virtual)
    rows = []
    for rank in range(num_ranks):
        stages = range(rank, num_ranks * num_virtual, num_ranks)
        row = [Action(Op.F, stage, mb) for stage in stages for mb in range(num_microbatches)]
        row += [
            Action(Op.B, stage, mb) for stage in reversed(stages) for mb in reversed(range(num_microbatches))
        ]
        rows.append(row)
    return make_schedule("looped-bfs", num_ranks, num_microbatches, placement, rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    """Every p, m, v >= 1 is legal (build() already refused values below 1)."""


FAMILY = Family(
    name="looped-bfs",
    generate=generate,
    check=check,
    summary="Looped BFS: breadth-first GPipe order over looped virtual stages (Lamy-Poirier, 2022)",
    bubble="(p-1)/(v*m+p-1)",
    memory="v*m chunks of 1/v stage (m stages' worth) on every rank",
    legal="any p >= 1, m >= 1, v >= 1",
    default_virtual=2,
)
