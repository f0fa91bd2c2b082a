"""V-Min (Qi et al., 2024, "Pipeline Parallelism with Controllable Memory"): a third of 1F1B's memory."""

from __future__ import annotations

import math

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.families._v_greedy import greedy_v_rows
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Schedule, v_placement

__all__ = ["generate", "check", "memory_cap", "FAMILY"]


def memory_cap(num_ranks: int) -> int:
    """Stage-chunks (1/2 stage each) a rank may hold: about p/3 + 1 stages, a third of 1F1B's p."""
    return math.ceil(2 * num_ranks / 3) + 2


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """V placement, split backward, at most ceil(2p/3)+2 half-stage chunks in flight per rank.

    Built by the greedy scheduler of docs/decisions.md, "Controllable-memory V schedules"
    (_v_greedy.py); exact pictures in tests/schedule/test_golden.py. Memory:
    ceil(2p/3)+2 chunks, about p/3 + 1 stages' worth against 1F1B's p on rank 0.
    Bubble with F = I = W, measured at m = 4p: 4% (p=2), 11% (p=4), 28% (p=6),
    21% (p=8), against 1F1B's 11%, 16%, 17%, 18% at the same m: below it at
    p = 2 and 4, up to 1.7x it elsewhere, the price of the smaller memory.
    """
    rows = greedy_v_rows(num_ranks, num_microbatches, memory_cap(num_ranks))
    return make_schedule("v-min", num_ranks, num_microbatches, v_placement(num_ranks, 2), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("v-min", num_virtual, 2, "use interleaved-1f1b or looped-bfs for other counts")


FAMILY = Family(
    name="v-min",
    generate=generate,
    check=check,
    summary="V-Min: V-shaped schedule with about a third of 1F1B's activation memory (Qi et al., 2024)",
    bubble="within 1.7x of 1F1B's (p-1)/(m+p-1), below it at p = 2, 4 (measured at m = 4p, p <= 8)",
    memory="ceil(2p/3)+2 chunks of 1/2 stage (about p/3 + 1 stages) on every rank",
    legal="any p >= 1, m >= 1; v = 2 exactly (V placement)",
    default_virtual=2,
)
