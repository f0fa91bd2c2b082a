"""Interleaved 1F1B (Narayanan et al., 2021, Megatron-LM): 1F1B over virtual stages."""

from __future__ import annotations

import math

from pipefold.schedule.families._common import counted, drop_microbatches, make_schedule
from pipefold.schedule.families.one_f_one_b import rank_order as one_f_one_b_order
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Action, Op, Schedule, looped_placement


def microbatch_groups(num_ranks: int, num_microbatches: int) -> tuple[int, int]:
    """(micro-batches per round, padded micro-batch count) for the depth-first order.

    Rounds of at most p micro-batches visit every local stage in turn, as torch
    does: rounds = max(1, m // p). When m is not a multiple of the rounds, the
    last round is padded (see docs/decisions.md, "Padding").
    """
    num_rounds = max(1, num_microbatches // num_ranks)
    per_round = math.ceil(num_microbatches / num_rounds)
    return per_round, per_round * num_rounds


def _rank_order(
    num_ranks: int, num_virtual: int, num_microbatches: int, per_round: int, rank: int
) -> list[Action]:
    num_ops = num_virtual * num_microbatches
    # Megatron's warm-up: enough forwards that the first backward of the last local
    # stage arrives just as they finish; 2 per rank below because a B takes two F's time.
    num_warmup = min((num_virtual - 1) * per_round + 2 * (num_ranks - 1 - rank), num_ops)

    def forward_stage(op: int) -> int:
        return (op // per_round) % num_virtual * num_ranks + rank

    def backward_stage(op: int) -> int:
        local = num_virtual - 1 - ((op - num_warmup) // per_round) % num_virtual
        return local * num_ranks + rank

    counters: dict[tuple[Op, int], int] = {}
    order = [counted(Op.F, forward_stage(op), counters) for op in range(num_warmup)]
    for op in range(num_warmup, num_ops):
        order.append(counted(Op.F, forward_stage(op), counters))
        order.append(counted(Op.B, backward_stage(op), counters))
    order.extend(counted(Op.B, backward_stage(op), counters) for op in range(num_ops, num_ops + num_warmup))
    return order


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Depth-first 1F1B over v looped stages per rank (rank r owns r, r+p, r+2p, …).

    Forwards go in rounds of p micro-batches through local stage 0, then 1, …;
    backwards through the local stages in reverse. p=2, m=4, v=2::

        rank 0  F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3
        rank 1  F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3

    This is torch's ScheduleInterleaved1F1B order. Bubble (uniform costs, a chunk
    costing 1/v of a stage): (p-1)/(v·m+p-1) when m is a multiple of p. Memory:
    min((v-1)·p + 2(p-r-1) + 1, v·m) chunks of 1/v stage in flight on rank r.
    v = 1 is plain 1F1B. When m is not a multiple of max(1, m // p), the last
    round is padded and the padding removed: correct, with a little extra idle time.
    """
    placement = looped_placement(num_ranks, num_virtual)
    if num_virtual == 1:
        rows = [one_f_one_b_order(num_ranks, num_microbatches, rank) for rank in range(num_ranks)]
    else:
        per_round, padded = microbatch_groups(num_ranks, num_microbatches)
        rows = drop_microbatches(
            (_rank_order(num_ranks, num_virtual, padded, per_round, rank) for rank in range(num_ranks)),
            num_microbatches,
        )
    return make_schedule("interleaved-1f1b", num_ranks, num_microbatches, placement, rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    """Every p, m, v >= 1 is legal (build() already refused values below 1)."""


FAMILY = Family(
    name="interleaved-1f1b",
    generate=generate,
    check=check,
    summary="Interleaved 1F1B (Megatron-LM virtual stages): depth-first 1F1B over looped chunks",
    bubble="(p-1)/(v*m+p-1)",
    memory="(v-1)*p + 2(p-r-1) + 1 chunks of 1/v stage on rank r (capped at v*m)",
    legal="any p >= 1, m >= 1, v >= 1 (m not a multiple of the rounds is padded)",
    default_virtual=2,
)
