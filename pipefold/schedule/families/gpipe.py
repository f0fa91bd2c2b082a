"""GPipe (Huang et al., 2019): all forwards, then all backwards, then a flush."""

from __future__ import annotations

from pipefold.errors import ScheduleError
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, contiguous_placement


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Every rank runs F of all micro-batches, then B of all of them, in micro-batch order.

    p=3, m=4 (compute order per rank; time runs right, idle not drawn)::

        rank 0  F0.0 F0.1 F0.2 F0.3 B0.0 B0.1 B0.2 B0.3
        rank 1  F1.0 F1.1 F1.2 F1.3 B1.0 B1.1 B1.2 B1.3
        rank 2  F2.0 F2.1 F2.2 F2.3 B2.0 B2.1 B2.2 B2.3

    Bubble (uniform costs): (p-1)/(m+p-1). Memory: all m micro-batches in flight on
    every rank.
    """
    rows = []
    for rank in range(num_ranks):
        forwards = [Action(Op.F, rank, mb) for mb in range(num_microbatches)]
        backwards = [Action(Op.B, rank, mb) for mb in range(num_microbatches)]
        rows.append(tuple(forwards + backwards))
    return Schedule(
        name="gpipe",
        num_ranks=num_ranks,
        num_stages=num_ranks,
        num_microbatches=num_microbatches,
        placement=contiguous_placement(num_ranks),
        actions=tuple(rows),
    )


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    if num_virtual != 1:
        raise ScheduleError(
            f"gpipe runs one stage per rank; got num_virtual={num_virtual}. "
            "Use looped-bfs for several stages per rank in GPipe order."
        )


FAMILY = Family(
    name="gpipe",
    generate=generate,
    check=check,
    summary="GPipe: all forwards, then all backwards (Huang et al., 2019)",
    bubble="(p-1)/(m+p-1)",
    memory="m micro-batches on every rank",
    legal="any p >= 1, m >= 1; v = 1",
)
