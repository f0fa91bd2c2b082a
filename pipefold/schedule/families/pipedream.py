"""PipeDream (Narayanan et al., 2019): asynchronous 1F1B with weight stashing."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.families.one_f_one_b import rank_order
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, contiguous_placement


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """The 1F1B order with an optimizer step of the stage right after each of its backwards.

    STEP(s, k) follows the k-th backward of stage s, so micro-batch k+1's backward
    already sees updated weights; each micro-batch's backward uses the weights its
    own forward saw (stashed), which is why up to min(p-r, m) versions stay live on
    rank r. p=2, m=3::

        rank 0  F0.0 F0.1 B0.0 STEP0.0 F0.2 B0.1 STEP0.1 B0.2 STEP0.2
        rank 1  F1.0 B1.0 STEP1.0 F1.1 B1.1 STEP1.1 F1.2 B1.2 STEP1.2

    Bubble (uniform costs, one call): (p-1)/(m+p-1) like 1F1B; across calls the
    pipeline never drains, which is PipeDream's point. Memory: min(p-r, m)
    micro-batches and as many stashed weight versions on rank r.
    """
    rows = []
    for rank in range(num_ranks):
        row: list[Action] = []
        for action in rank_order(num_ranks, num_microbatches, rank):
            row.append(action)
            if action.op is Op.B:
                row.append(Action(Op.STEP, action.stage, action.microbatch))
        rows.append(row)
    return make_schedule(
        "pipedream",
        num_ranks,
        num_microbatches,
        contiguous_placement(num_ranks),
        rows,
        WeightUpdate.STASH,
    )


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("pipedream", num_virtual, 1, "use a flush schedule such as interleaved-1f1b")


FAMILY = Family(
    name="pipedream",
    generate=generate,
    check=check,
    summary="PipeDream: asynchronous 1F1B, a weight update after every backward, weights stashed",
    bubble="(p-1)/(m+p-1) in one call; none in steady state across calls",
    memory="min(p-r, m) micro-batches and weight versions on rank r",
    legal="any p >= 1, m >= 1; v = 1",
)
