"""ZB-H1 (Qi et al., 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with W deferred into the tail."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, contiguous_placement


def _rank_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    stage = rank
    num_warmup = min(num_ranks - 1 - rank, num_microbatches)
    # Rank r keeps r weight-gradient passes back: they fill the cool-down gaps where
    # 1F1B waits for the next rank's input gradient, without holding more
    # activations than 1F1B's rank 0 (p micro-batches).
    num_deferred = rank
    order = [Action(Op.F, stage, mb) for mb in range(num_warmup)]
    next_w = 0
    for mb in range(num_microbatches):
        if mb + num_warmup < num_microbatches:
            order.append(Action(Op.F, stage, mb + num_warmup))
        order.append(Action(Op.I, stage, mb))
        if mb >= num_deferred:
            order.append(Action(Op.W, stage, next_w))
            next_w += 1
    order.extend(Action(Op.W, stage, mb) for mb in range(next_w, num_microbatches))
    return order


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """1F1B with B split into I then W; rank r runs each W r micro-batches late.

    p=3, m=4 (compute order per rank; time runs right, idle not drawn)::

        rank 0  F0.0 F0.1 F0.2 I0.0 W0.0 F0.3 I0.1 W0.1 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F1.1 I1.0 F1.2 I1.1 W1.0 F1.3 I1.2 W1.1 I1.3 W1.2 W1.3
        rank 2  F2.0 I2.0 F2.1 I2.1 F2.2 I2.2 W2.0 F2.3 I2.3 W2.1 W2.2 W2.3

    This is torch's ScheduleInterleavedZeroBubble (ZB1P) with one stage per rank.
    Bubble (uniform costs F = I = W): (p-1)/(3m+p-1), a third of 1F1B's.
    Memory: min(p-r, m) micro-batches between F and I on rank r, as in 1F1B; at most
    min(p, m) between F and W on any rank (1F1B's peak, on rank 0).
    """
    rows = [_rank_order(num_ranks, num_microbatches, rank) for rank in range(num_ranks)]
    return make_schedule("zb-h1", num_ranks, num_microbatches, contiguous_placement(num_ranks), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("zb-h1", num_virtual, 1, "use zb-v for two stages per rank")


FAMILY = Family(
    name="zb-h1",
    generate=generate,
    check=check,
    summary="ZB-H1: 1F1B with split backward, W passes deferred to fill the tail (Qi et al., 2023)",
    bubble="(p-1)/(3m+p-1) with F = I = W",
    memory="min(p-r, m) micro-batches F..I on rank r; at most min(p, m) F..W (1F1B's peak)",
    legal="any p >= 1, m >= 1; v = 1",
)
