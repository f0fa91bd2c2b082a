"""ZB-V (Qi et al., 2023, "Zero Bubble Pipeline Parallelism", section 6): zero bubble in a V."""

from __future__ import annotations

from pipefold.schedule.families._common import counted, drop_microbatches, make_schedule, require_virtual
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, v_placement


def _rank_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    """torch's ScheduleZBVZeroBubble order for `rank`, for m >= 2p-1 micro-batches."""
    down, up = rank, 2 * num_ranks - 1 - rank  # the rank's stage on the way down and back up
    counters: dict[tuple[Op, int], int] = {}
    order: list[Action] = []

    def emit(op: Op, stage: int) -> None:
        order.append(counted(op, stage, counters))

    def count(op: Op, stage: int) -> int:
        return counters.get((op, stage), 0)

    # Warm-up: forwards down until the first backward can come back up the V.
    for _ in range(2 * (num_ranks - rank) - 1):
        emit(Op.F, down)
    for _ in range(rank):
        emit(Op.F, up)
        emit(Op.F, down)
    for _ in range(num_ranks - rank):
        emit(Op.F, up)
        emit(Op.I, up)
        emit(Op.W, up)
    # Steady state: F I W on the way down, then on the way up.
    while count(Op.F, up) < count(Op.F, down) or count(Op.F, down) < num_microbatches:
        if count(Op.F, down) < num_microbatches:
            emit(Op.F, down)
        emit(Op.I, down)
        emit(Op.W, down)
        emit(Op.F, up)
        emit(Op.I, up)
        emit(Op.W, up)
    # Cool-down: input gradients first (they unblock the ranks above), weights last.
    for _ in range(rank):
        emit(Op.I, down)
        emit(Op.I, up)
    for _ in range(num_ranks - rank):
        emit(Op.I, down)
        emit(Op.W, down)
    while count(Op.W, up) < count(Op.I, up):
        emit(Op.W, up)
    while count(Op.W, down) < count(Op.I, down):
        emit(Op.W, down)
    return order


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Two stages per rank in a V (rank r owns r and 2p-1-r); F, I, W of both in turn.

    p=2, m=4 (compute order per rank; time runs right, idle not drawn)::

        rank 0  F0.0 F0.1 F0.2 F3.0 I3.0 W3.0 F3.1 I3.1 W3.1 F0.3 I0.0 W0.0
                F3.2 I3.2 W3.2 I0.1 W0.1 F3.3 I3.3 W3.3 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F2.0 F1.1 F2.1 I2.0 W2.0 F1.2 I1.0 W1.0 F2.2 I2.1 W2.1
                F1.3 I1.1 W1.1 F2.3 I2.2 W2.2 I1.2 I2.3 I1.3 W1.2 W2.3 W1.3

    This is torch's ScheduleZBVZeroBubble; below m = 2p-1 it is generated for 2p-1
    micro-batches and the extra ones removed (docs/decisions.md, "Padding"). Bubble with
    F = I = W (per chunk): (p-1)/(6m+p-1) within one call once m >= 2p-1, i.e. each
    rank idles only p-1 chunk-slots (tested). Memory: 2p chunks of 1/2 stage on
    every rank once m >= 2p-1: the p stages' worth 1F1B holds on its rank 0.
    """
    padded = max(num_microbatches, 2 * num_ranks - 1)
    rows = drop_microbatches(
        (_rank_order(num_ranks, padded, rank) for rank in range(num_ranks)), num_microbatches
    )
    return make_schedule("zb-v", num_ranks, num_microbatches, v_placement(num_ranks, 2), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("zb-v", num_virtual, 2, "use interleaved-1f1b or looped-bfs for other counts")


FAMILY = Family(
    name="zb-v",
    generate=generate,
    check=check,
    summary="ZB-V: zero-bubble schedule over a V of two stages per rank (Qi et al., 2023)",
    bubble="(p-1)/(6m+p-1) with F = I = W per chunk, once m >= 2p-1",
    memory="min(2p, ...) chunks of 1/2 stage: 2p (p stages' worth) on every rank once m >= 2p-1",
    legal="any p >= 1, m >= 1; v = 2 exactly (V placement)",
    default_virtual=2,
)
