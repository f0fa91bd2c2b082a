"""ZB-H2 (Qi et al., 2023, "Zero Bubble Pipeline Parallelism"): more warm-up, no steady-state bubble."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, contiguous_placement


def _rank_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    stage = rank
    # With F = I = W the input gradient of micro-batch 0 reaches rank r 2(p-1-r)+1
    # slots after its own first forward; forwards fill all of them, so rank 0
    # holds 2p-1 micro-batches.
    num_warmup = min(2 * (num_ranks - 1 - rank) + 1, num_microbatches)
    # Rank r keeps 2r weight-gradient passes back for the tail: rank r+1's last input
    # gradient arrives 2 slots later than rank r's would, so each rank up holds two
    # more W's to run while the last backwards climb. Rank 0 then ends first and
    # rank r ends r slots after it, mirroring the start (the parallelogram).
    num_deferred = 2 * rank if num_microbatches >= 2 * num_ranks - 1 else rank
    order = [Action(Op.F, stage, mb) for mb in range(num_warmup)]
    next_w = 0
    for mb in range(num_microbatches):
        order.append(Action(Op.I, stage, mb))
        if mb >= num_deferred:
            order.append(Action(Op.W, stage, next_w))
            next_w += 1
        if mb + num_warmup < num_microbatches:
            order.append(Action(Op.F, stage, mb + num_warmup))
    order.extend(Action(Op.W, stage, mb) for mb in range(next_w, num_microbatches))
    return order


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Warm up with 2(p-1-r)+1 forwards, then I, W, F in turn, then I, W to the end.

    p=3, m=6 (compute order per rank; time runs right, idle not drawn)::

        rank 0  F0.0 F0.1 F0.2 F0.3 F0.4 I0.0 W0.0 F0.5 I0.1 W0.1 I0.2 W0.2 I0.3 W0.3 I0.4 W0.4 I0.5 W0.5
        rank 1  F1.0 F1.1 F1.2 I1.0 F1.3 I1.1 F1.4 I1.2 W1.0 F1.5 I1.3 W1.1 I1.4 W1.2 I1.5 W1.3 W1.4 W1.5
        rank 2  F2.0 I2.0 F2.1 I2.1 F2.2 I2.2 F2.3 I2.3 F2.4 I2.4 W2.0 F2.5 I2.5 W2.1 W2.2 W2.3 W2.4 W2.5

    With F = I = W and m >= 2p-1, rank r is busy without a gap from slot r to slot
    3m+r (tested): a parallelogram. Within one call the bubble is then
    (p-1)/(3m+p-1), as ZB-H1; across calls, with the optimizer step's
    synchronisation relaxed as in the paper, the parallelograms tile and the
    bubble is 0. For m < 2p-1 the deferral drops to r (as ZB-H1), which is never
    slower. Memory: at most min(2p-1, m) micro-batches between F and W on any rank.
    """
    rows = [_rank_order(num_ranks, num_microbatches, rank) for rank in range(num_ranks)]
    return make_schedule("zb-h2", num_ranks, num_microbatches, contiguous_placement(num_ranks), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("zb-h2", num_virtual, 1, "use zb-v for two stages per rank")


FAMILY = Family(
    name="zb-h2",
    generate=generate,
    check=check,
    summary="ZB-H2: zero-bubble schedule, 2(p-1-r)+1 warm-up forwards, W deferred (Qi et al., 2023)",
    bubble="0 across calls (parallelogram) with F = I = W and m >= 2p-1; (p-1)/(3m+p-1) within one",
    memory="at most min(2p-1, m) micro-batches between F and W on any rank",
    legal="any p >= 1, m >= 1; v = 1",
)
