"""ZB-V (Qi et al., 2023, "Zero Bubble Pipeline Parallelism", section 6): zero bubble in a V."""

from __future__ import annotations

from pipefold.schedule.families._common import (
    KIND_F,
    KIND_I,
    KIND_W,
    IntRow,
    actions_of,
    drop_microbatches,
    make_schedule,
    require_virtual,
)
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Schedule, v_placement


def rank_order(num_ranks: int, num_microbatches: int, rank: int) -> IntRow:
    """torch's ScheduleZBVZeroBubble order for `rank`, for m >= 2p-1 micro-batches, as integers
    (kinds numbered `KIND_F` ...; `pipefold.plan.fast_orders` reads them so)."""
    down, up = rank, 2 * num_ranks - 1 - rank  # the rank's stage on the way down and back up
    kinds: list[int] = []
    stages: list[int] = []
    microbatches: list[int] = []
    # counts[kind][0 down / 1 up]: the next micro-batch of that op on that stage.
    counts = [[0, 0] for _ in range(4)]

    def emit(kind: int, which: int) -> None:
        kinds.append(kind)
        stages.append(up if which else down)
        microbatches.append(counts[kind][which])
        counts[kind][which] += 1

    # Warm-up: forwards down until the first backward can come back up the V.
    for _ in range(2 * (num_ranks - rank) - 1):
        emit(KIND_F, 0)
    for _ in range(rank):
        emit(KIND_F, 1)
        emit(KIND_F, 0)
    for _ in range(num_ranks - rank):
        emit(KIND_F, 1)
        emit(KIND_I, 1)
        emit(KIND_W, 1)
    # Steady state: F I W on the way down, then on the way up.
    while counts[KIND_F][1] < counts[KIND_F][0] or counts[KIND_F][0] < num_microbatches:
        if counts[KIND_F][0] < num_microbatches:
            emit(KIND_F, 0)
        for kind, which in ((KIND_I, 0), (KIND_W, 0), (KIND_F, 1), (KIND_I, 1), (KIND_W, 1)):
            emit(kind, which)
    # Cool-down: input gradients first (they unblock the ranks above), weights last.
    for _ in range(rank):
        emit(KIND_I, 0)
        emit(KIND_I, 1)
    for _ in range(num_ranks - rank):
        emit(KIND_I, 0)
        emit(KIND_W, 0)
    while counts[KIND_W][1] < counts[KIND_I][1]:
        emit(KIND_W, 1)
    while counts[KIND_W][0] < counts[KIND_I][0]:
        emit(KIND_W, 0)
    return kinds, stages, microbatches


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
        (actions_of(rank_order(num_ranks, padded, rank)) for rank in range(num_ranks)), num_microbatches
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
