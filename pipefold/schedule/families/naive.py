"""Naive pipelining: one micro-batch at a time through the whole pipeline, no overlap."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, contiguous_placement


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Micro-batch k runs F on every stage, then B back up, before micro-batch k+1 starts.

    p=3, m=2 (time runs right; `.` is an idle slot of a B-sized op)::

        rank 0  F0.0 .    .    .    .    B0.0 F0.1 .    .    .    .    B0.1
        rank 1  .    F1.0 .    .    B1.0 .    .    F1.1 .    .    B1.1 .
        rank 2  .    .    F2.0 B2.0 .    .    .    .    F2.1 B2.1 .    .

    Per rank the order is simply F0.0 B0.0 F0.1 B0.1 …; the dependencies force the
    rest. Bubble (uniform costs, B = 2F): (p-1)/p, the worst possible; it is the
    reference the other families are measured against. Memory: 1 micro-batch.
    """
    rows = [
        [Action(op, rank, mb) for mb in range(num_microbatches) for op in (Op.F, Op.B)]
        for rank in range(num_ranks)
    ]
    return make_schedule("naive", num_ranks, num_microbatches, contiguous_placement(num_ranks), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("naive", num_virtual, 1, "use looped-bfs for several stages per rank")


FAMILY = Family(
    name="naive",
    generate=generate,
    check=check,
    summary="Naive: one micro-batch at a time through all stages, no overlap (the baseline)",
    bubble="(p-1)/p",
    memory="1 micro-batch on every rank",
    legal="any p >= 1, m >= 1; v = 1",
)
