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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipefold.schedule import Schedule
from pipefold.schedule.ir import Op
from pipefold.simulate import CostModel

__all__ = [
    "step_time_lower_bound", "bound_terms", "BoundTerms", "backward_kind", "Backward", "Boundaries",
    "boundary_times", "running_sums", "LinkTable", "link_table", "SERIAL_FAMILIES",
]

SERIAL_FAMILIES = frozenset({"naive"})
"""Families whose order runs one micro-batch at a time through the whole pipeline: a rank's next
forward comes after its backward of the micro-batch before, so on the first stage's rank each
micro-batch's round trip starts after the last one's ended, and the step lasts at least m of them
(`BoundTerms.at(m, serial=True)`). Without it naive's bound is 1F1B's, and at cluster sizes the
search simulated its orders, the costliest to time, only to find them p times slower."""

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

    def at(self, num_microbatches: int, serial: bool = False) -> float:
        """The bound at m micro-batches; `serial`: of a family in `SERIAL_FAMILIES`."""
        # A plain loop: over tens of ranks it is faster than numpy's per-call cost.
        bound = self.chain
        if serial:
            # m round trips one after another: the same terms the simulator adds, in another order,
            # so a rounding's worth under.
            bound = max(bound, num_microbatches * self.chain * (1 - 1e-12))
        total = 0.0
        for start, busy, chained, drain in self.ranks:
            bound = max(bound, start + num_microbatches * busy, start + num_microbatches * chained + drain)
            total += num_microbatches * busy
        if self.num_cores is not None:
            # Ranks sharing cores (docs/decisions.md, "Shared cores") get through at most num_cores x the
            # time of work together.
            bound = max(bound, total / min(self.num_cores, self.num_ranks))
        return bound


@dataclass(frozen=True)
class Boundaries:
    """Per stage boundary s -> s + 1 of one pipeline: the seconds of the activation's send forward
    and of its gradient's send back (0.0 where both stages are on one rank). They depend on the
    partition, the rows and the placement only (not on recompute), so the planner computes them once
    per pipeline and every bound of it reads them."""

    send: np.ndarray
    back: np.ndarray


@dataclass(frozen=True)
class LinkTable:
    """Per (src, dst) pair of ranks, the latency and bandwidth of `CostModel.link_between(src, dst)`.
    The same for every model of one pipeline split, so the planner keeps one per split."""

    latency: np.ndarray
    bandwidth: np.ndarray


def link_table(model: CostModel, num_ranks: int) -> LinkTable:
    """`model.link_between` for ranks 0..num_ranks - 1, as arrays."""
    latency = np.full((num_ranks, num_ranks), model.link.latency, dtype=np.float64)
    bandwidth = np.full((num_ranks, num_ranks), model.link.bandwidth, dtype=np.float64)
    # link_between takes the (src, dst) override, else the (dst, src) one, else the default link:
    # written here in the reverse order, so the preferred one is written last.
    for reverse in (True, False):
        for (a, b), link in model.link_overrides.items():
            src, dst = (b, a) if reverse else (a, b)
            if src < num_ranks and dst < num_ranks:
                latency[src, dst] = link.latency
                bandwidth[src, dst] = link.bandwidth
    return LinkTable(latency, bandwidth)


def boundary_times(model: CostModel, placement: Sequence[int], table: LinkTable | None = None) -> Boundaries:
    """`model.transfer_time` of every boundary, both ways, as arrays: `latency + bytes / bandwidth`
    (0 bytes: the latency alone; one rank: 0), the same floats as `Link.transfer_time`. `table`:
    `link_table(model, ...)` over the placement's ranks, where the caller keeps it."""
    if model.num_stages < 2:
        return Boundaries(np.zeros(0), np.zeros(0))
    if table is None:
        table = link_table(model, max(placement) + 1)
    src = np.asarray(placement[:-1], dtype=np.intp)
    dst = np.asarray(placement[1:], dtype=np.intp)
    num_bytes = np.asarray(model.message_bytes, dtype=np.float64)  # whole bytes: exact as floats
    sent = num_bytes > 0

    def times(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        seconds = table.latency[a, b] + np.where(sent, num_bytes / table.bandwidth[a, b], 0.0)
        result: np.ndarray = np.where(a == b, 0.0, seconds)
        return result

    return Boundaries(times(src, dst), times(dst, src))


def running_sums(work: np.ndarray, sends: np.ndarray) -> np.ndarray:
    """[0, w0 + s0, (w0 + s0) + w1 + s1, ...]: per stage s, the sum of `work` and `sends` over the
    stages before it, added one term at a time in stage order (`sends` has one entry fewer: none
    after the last stage). The same floats as a Python loop `total += work[s]; total += sends[s]`,
    since a cumulative sum adds sequentially (unlike `sum`, which adds pairwise)."""
    terms = np.zeros(2 * len(work), dtype=np.float64)
    terms[0::2] = work
    terms[1:-1:2] = sends
    return np.concatenate([[0.0], np.cumsum(terms)[1::2]])


def step_time_lower_bound(
    model: CostModel, placement: tuple[int, ...], num_microbatches: int, backward: Backward = "any",
    serial: bool = False,
) -> float:
    """The least step any order of these actions can take (see the module docstring); `backward` says
    how the schedule runs its backwards ("any": the cheaper of B and I + W per stage, valid for all);
    `serial`: the order is one of `SERIAL_FAMILIES`'."""
    return bound_terms(model, placement, backward).at(num_microbatches, serial)


def bound_terms(
    model: CostModel, placement: tuple[int, ...], backward: Backward = "any",
    boundaries: Boundaries | None = None,
) -> BoundTerms:
    """The m-free terms of `step_time_lower_bound`; `boundaries`: `boundary_times(model, placement)`
    where the caller keeps them."""
    if boundaries is None:
        boundaries = boundary_times(model, placement)
    f = np.asarray(model.f, dtype=np.float64)
    b, i, w = (np.asarray(times, dtype=np.float64) for times in (model.b, model.i, model.w))
    if backward == "B":
        i, w = b, np.zeros(model.num_stages)
    elif backward == "I":
        b = i + w
    num_ranks = max(placement) + 1
    num_stages = model.num_stages
    # A family runs either B or I + W for a stage; the cheaper one keeps the bound valid for both.
    # A W waits for nothing downstream, so it may run after the drain has started.
    busy_terms = (f + np.minimum(b, i + w)).tolist()
    chained_terms = (f + np.minimum(b, i)).tolist()
    busy = [0.0] * num_ranks
    chained = [0.0] * num_ranks
    first = [num_stages] * num_ranks
    for stage, rank in enumerate(placement):
        busy[rank] += busy_terms[stage]
        chained[rank] += chained_terms[stage]
        if first[rank] == num_stages:
            first[rank] = stage
    # fill[s]: one micro-batch forward through stages 0..s-1 and the send into s; drain[s]: the
    # send of its input gradient from s to s-1, then back through stages s-1..0 (none past the ends).
    fill = running_sums(f, boundaries.send).tolist()
    drain = running_sums(np.minimum(b, i), boundaries.back).tolist()
    ranks = tuple(
        (fill[first[rank]], busy[rank], chained[rank], drain[first[rank]])
        for rank in range(num_ranks) if first[rank] < num_stages  # a rank with no stage adds nothing
    )
    return BoundTerms(fill[-1] + drain[-1], ranks, model.num_cores, num_ranks)
