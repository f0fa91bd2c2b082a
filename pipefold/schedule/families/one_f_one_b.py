"""1F1B, also called PipeDream-Flush (Narayanan et al., 2021): one forward, one backward."""

from __future__ import annotations

from pipefold.schedule.families._common import make_schedule, require_virtual
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, contiguous_placement

__all__ = ["generate", "check", "rank_order", "FAMILY"]


def rank_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    """Rank `rank`'s 1F1B order: warm-up forwards, alternating F/B, cool-down backwards.

    The warm-up is min(p-r-1, m) forwards, exactly enough that the first backward
    arrives from the last rank as the rank finishes them; it is what bounds
    the micro-batches in flight on rank r to min(p-r, m).
    """
    stage = rank
    num_warmup = min(num_ranks - rank - 1, num_microbatches)
    order = [Action(Op.F, stage, mb) for mb in range(num_warmup)]
    for mb in range(num_microbatches - num_warmup):
        order.append(Action(Op.F, stage, mb + num_warmup))
        order.append(Action(Op.B, stage, mb))
    order.extend(Action(Op.B, stage, mb) for mb in range(num_microbatches - num_warmup, num_microbatches))
    return order


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Warm-up forwards, then one F and one B in turn, then the remaining backwards.

    p=3, m=4 (compute order per rank; time runs right, idle not drawn)::

        rank 0  F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 B0.2 B0.3
        rank 1  F1.0 F1.1 B1.0 F1.2 B1.1 F1.3 B1.2 B1.3
        rank 2  F2.0 B2.0 F2.1 B2.1 F2.2 B2.2 F2.3 B2.3

    Bubble (uniform costs): (p-1)/(m+p-1), the same as GPipe. Memory: at most
    min(p-r, m) micro-batches in flight on rank r, instead of GPipe's m. Works for
    m < p too (torch refuses it): the warm-up is then cut to m forwards.
    """
    rows = [rank_order(num_ranks, num_microbatches, rank) for rank in range(num_ranks)]
    return make_schedule("1f1b", num_ranks, num_microbatches, contiguous_placement(num_ranks), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("1f1b", num_virtual, 1, "use interleaved-1f1b for several stages per rank")


FAMILY = Family(
    name="1f1b",
    generate=generate,
    check=check,
    summary="1F1B / PipeDream-Flush: warm-up, then one forward and one backward in turn",
    bubble="(p-1)/(m+p-1)",
    memory="min(p-r, m) micro-batches on rank r",
    legal="any p >= 1, m >= 1 (m < p allowed); v = 1",
)
