"""V-Half (Qi et al., 2024, "Pipeline Parallelism with Controllable Memory"): half of 1F1B's memory."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.families._v_greedy import greedy_v_rows
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Schedule, v_placement

__all__ = ["generate", "check", "memory_cap", "FAMILY"]


def memory_cap(num_ranks: int) -> int:
    """Stage-chunks (1/2 stage each) a rank may hold: p/2 + 1 stages, about half of 1F1B's p."""
    return num_ranks + 2


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """V placement, split backward, at most p+2 half-stage chunks in flight per rank.

    Built by the greedy scheduler of docs/decisions.md, "Controllable-memory V schedules"
    (_v_greedy.py). p=2, m=4 (compute order per rank; idle not drawn)::

        rank 0  F0.0 F0.1 F3.0 I3.0 F3.1 I3.1 I0.0 W3.0 I0.1 W3.1 F0.2 W0.0
                W0.1 F3.2 I3.2 F0.3 W3.2 I0.2 W0.2 F3.3 I3.3 W3.3 I0.3 W0.3
        rank 1  F1.0 F2.0 F1.1 F2.1 I2.0 I1.0 I2.1 I1.1 W2.0 W1.0 W2.1 F1.2
                F2.2 W1.1 I2.2 I1.2 F1.3 F2.3 W2.2 W1.2 I2.3 I1.3 W2.3 W1.3

    Memory: p+2 chunks, i.e. p/2 + 1 stages' worth against 1F1B's p on rank 0
    (half of it for large p; no saving at p <= 2, where 1 stage is the floor). Bubble with F = I = W,
    measured at m = 4p: 4% (p=2), 9% (p=4), 11% (p=8), below 1F1B's
    (p-1)/(m+p-1) at the same m.
    """
    rows = greedy_v_rows(num_ranks, num_microbatches, memory_cap(num_ranks))
    return make_schedule("v-half", num_ranks, num_microbatches, v_placement(num_ranks, 2), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("v-half", num_virtual, 2, "use interleaved-1f1b or looped-bfs for other counts")


FAMILY = Family(
    name="v-half",
    generate=generate,
    check=check,
    summary="V-Half: V-shaped schedule with about half of 1F1B's activation memory (Qi et al., 2024)",
    bubble="below 1F1B's (p-1)/(m+p-1) with F = I = W (measured at m = 4p, p <= 8)",
    memory="p+2 chunks of 1/2 stage (p/2 + 1 stages) on every rank",
    legal="any p >= 1, m >= 1; v = 2 exactly (V placement)",
    default_virtual=2,
)
