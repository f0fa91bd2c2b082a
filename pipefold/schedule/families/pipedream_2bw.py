"""PipeDream-2BW (Narayanan et al., 2021): 1F1B with double-buffered weight updates."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.families.one_f_one_b import rank_order
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, contiguous_placement


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """The 1F1B order; stage s steps after its backwards number p, 2p, 3p, … and after its last.

    The rule: with k counting stage s's backwards from 1, STEP(s, j) follows the
    k-th backward when k is a multiple of p (j = k/p - 1) or k = m (the last). A
    micro-batch's forward on rank r happens at most p-1 backwards after the
    oldest in-flight one's, so the in-flight micro-batches saw at most two
    consecutive versions: the current one and the one before (the "2" of 2BW).
    p=2, m=3::

        rank 0  F0.0 F0.1 B0.0 F0.2 B0.1 STEP0.0 B0.2 STEP0.1
        rank 1  F1.0 B1.0 F1.1 B1.1 STEP1.0 F1.2 B1.2 STEP1.1

    Bubble (uniform costs, one call): (p-1)/(m+p-1). Memory: min(p-r, m)
    micro-batches on rank r and at most 2 weight versions.
    """
    rows = []
    for rank in range(num_ranks):
        row: list[Action] = []
        num_backwards = 0
        num_steps = 0
        for action in rank_order(num_ranks, num_microbatches, rank):
            row.append(action)
            if action.op is not Op.B:
                continue
            num_backwards += 1
            if num_backwards % num_ranks == 0 or num_backwards == num_microbatches:
                row.append(Action(Op.STEP, action.stage, num_steps))
                num_steps += 1
        rows.append(row)
    return make_schedule(
        "pipedream-2bw",
        num_ranks,
        num_microbatches,
        contiguous_placement(num_ranks),
        rows,
        WeightUpdate.DOUBLE_BUFFER,
    )


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("pipedream-2bw", num_virtual, 1, "use a flush schedule such as interleaved-1f1b")


FAMILY = Family(
    name="pipedream-2bw",
    generate=generate,
    check=check,
    summary="PipeDream-2BW: 1F1B, a weight update every p backwards, two weight versions",
    bubble="(p-1)/(m+p-1) in one call; none in steady state across calls",
    memory="min(p-r, m) micro-batches on rank r; at most 2 weight versions",
    legal="any p >= 1, m >= 1; v = 1",
)
