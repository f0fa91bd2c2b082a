"""Cheap lower bounds on a configuration's step time, so most losers are never simulated.

A rank runs its actions one at a time, so a step lasts at least the rank's busy time. Every
action of rank r descends from a forward of its lowest stage s, which cannot start before one
micro-batch has gone forward through stages 0..s-1 (their forwards and the sends between them:
the fill). And the last input-gradient backward (B or I) of stage s on rank r comes after every
F and every B or I of rank r (each of them is an ancestor of stage s's backward of the same
micro-batch), after which one micro-batch's backward still runs through stages s-1..0 (the
drain). Hence, for every rank r:

    step >= fill(s) + busy(r)                          (F + B, or F + I + W)
    step >= fill(s) + busy without W(r) + drain(s)     (F + B, or F + I)

For 1f1b or GPipe on equal stages the second is exact: (m + p - 1) (f + b). Transfers, waits
and overheads only add time, and recomputation only lengthens actions, so bounds computed
without waits hold for the simulated step. Ranks that share `num_cores` cores cannot do more than
num_cores seconds of work per second, so the step also lasts at least the total work / num_cores
(sharing only ever slows an action).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipefold.schedule import Schedule
from pipefold.schedule.ir import Op
from pipefold.simulate import CostModel

__all__ = ["step_time_lower_bound", "bound_terms", "BoundTerms", "backward_kind", "Backward"]

Backward = Literal["B", "I", "any"]
"""How a schedule runs its backwards: "B" whole, "I" split (I + W), "any" mixed or not known."""


def backward_kind(schedule: Schedule) -> Backward:
    """Whether `schedule` runs every backward as B, every one split into I + W, or both."""
    ops = {action.op for row in schedule.actions for action in row if action.op in (Op.B, Op.I)}
    if ops == {Op.B}:
        return "B"
    if ops == {Op.I}:
        return "I"
    return "any"


@dataclass(frozen=True)
class BoundTerms:
    """The terms of the bound that do not depend on the micro-batch count, so one configuration's
    bound at every m costs O(ranks): `terms.at(num_microbatches)`."""

    chain: float
    """One micro-batch forward through every stage and back."""
    ranks: tuple[tuple[float, float, float, float], ...]
    """Per rank with a stage: (fill to its lowest stage, busy seconds per micro-batch, busy
    seconds without W per micro-batch, drain from its lowest stage)."""
    num_cores: float | None
    num_ranks: int

    def at(self, num_microbatches: int) -> float:
        bound = self.chain
        total = 0.0
        for start, busy, chained, drain in self.ranks:
            bound = max(bound, start + num_microbatches * busy, start + num_microbatches * chained + drain)
            total += num_microbatches * busy
        if self.num_cores is not None:
            # Ranks sharing cores (docs/decisions.md, "Shared cores") get through at most num_cores x the
            # time of work together.
            bound = max(bound, total / min(self.num_cores, self.num_ranks))
        return bound


def step_time_lower_bound(
    model: CostModel, placement: tuple[int, ...], num_microbatches: int, backward: Backward = "any"
) -> float:
    """The least step any order of these actions can take (see the module docstring); `backward` says
    how the schedule runs its backwards ("any": the cheaper of B and I + W per stage, valid for all)."""
    return bound_terms(model, placement, backward).at(num_microbatches)


def bound_terms(model: CostModel, placement: tuple[int, ...], backward: Backward = "any") -> BoundTerms:
    """The m-free terms of `step_time_lower_bound`."""
    b, i, w = model.b, model.i, model.w
    if backward == "B":
        i, w = b, (0.0,) * model.num_stages
    elif backward == "I":
        b = tuple(x + y for x, y in zip(i, w, strict=True))
    num_ranks = max(placement) + 1
    num_stages = model.num_stages
    busy = [0.0] * num_ranks
    chained = [0.0] * num_ranks
    first = [num_stages] * num_ranks
    for stage, rank in enumerate(placement):
        # A family runs either B or I + W for a stage; the cheaper one keeps the bound valid for both.
        busy[rank] += model.f[stage] + min(b[stage], i[stage] + w[stage])
        # A W waits for nothing downstream, so it may run after the drain has started.
        chained[rank] += model.f[stage] + min(b[stage], i[stage])
        first[rank] = min(first[rank], stage)
    # fill[s]: one micro-batch forward through stages 0..s-1 and the send into s; drain[s]: the
    # send of its input gradient from s to s-1, then back through stages s-1..0 (none past the ends).
    fill = [0.0]
    drain = [0.0]
    for stage in range(num_stages):
        send = 0.0
        back = 0.0
        if stage + 1 < num_stages:
            send = model.transfer_time(stage, placement[stage], placement[stage + 1])
            back = model.transfer_time(stage, placement[stage + 1], placement[stage])
        fill.append(fill[-1] + model.f[stage] + send)
        drain.append(drain[-1] + min(b[stage], i[stage]) + back)
    ranks = tuple(
        (fill[first[rank]], busy[rank], chained[rank], drain[first[rank]])
        for rank in range(num_ranks) if first[rank] < num_stages  # a rank with no stage adds nothing
    )
    return BoundTerms(fill[-1] + drain[-1], ranks, model.num_cores, num_ranks)
