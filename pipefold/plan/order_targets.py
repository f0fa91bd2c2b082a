"""The order search's targets: which simulated family configurations are worth searching an
order for, and in which order (docs/decisions.md, "Planner refinement"). `plan.search` calls
`order_targets` with its search state."""

from __future__ import annotations

import math
import time
from typing import Protocol

from pipefold.plan.bounds import Backward
from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import Degree
from pipefold.plan.ranking import rank_key
from pipefold.plan.record import Record
from pipefold.plan.refine import ORDER_SEARCH_MARGIN, OrderTarget, searchable
from pipefold.plan.result import Candidate
from pipefold.plan.topology import MeshLinks

__all__ = ["TargetSource", "order_targets"]


class TargetSource(Protocol):
    """What the targets read of the search: its memory limit, bounds, simulations and costs."""

    limit: float
    num_untimed: int

    def bound(
        self, record: Record, recompute: tuple[int, ...], backward: Backward | None = None
    ) -> float: ...

    def run(self, record: Record, recompute: tuple[int, ...]) -> Candidate: ...

    def costs_of(self, record: Record) -> ModelCosts: ...

    def links(self, degree: Degree) -> MeshLinks: ...


def order_targets(search: TargetSource, records: list[Record], choice: Candidate | None,
                  deadline: float = math.inf) -> list[OrderTarget]:
    """One target per simulated (split, partition, m, v, layout, recompute) of a flush family the
    search knows the layout of, within the margin of the family `choice`, the choice's own first,
    then by step; with no choice (no family order fits), every one, the leanest first."""
    # A choice found over the limit without simulating may fit in another order: time those
    # that could come within the margin of the choice, most promising first, out of the order
    # search's budget (the ones left untimed are counted unsearched).
    pending = sorted(
        ((bound, index, recompute) for index, record in enumerate(records) for recompute in record.over
         if recompute not in record.tried and (bound := search.bound(record, recompute, "any")) <= (
             math.inf if choice is None else choice.step_time * (1 + ORDER_SEARCH_MARGIN))),
        key=lambda item: (item[0], item[1]),
    )
    for _, index, recompute in pending:
        if time.perf_counter() >= deadline:
            search.num_untimed += 1
            continue
        search.run(records[index], recompute)
    groups: dict[tuple[object, ...], list[tuple[Record, Candidate]]] = {}
    for record in records:
        if record.static_over is not None or not record.tried:
            continue
        config = record.config
        for recompute, candidate in record.tried.items():
            key = (record.degree, record.bounds, config.microbatch_rows, config.num_microbatches,
                   config.num_virtual, record.placement, recompute, config.recompute_attention,
                   config.shard, config.free_between, config.gather_lookahead)
            groups.setdefault(key, []).append((record, candidate))
    targets = []
    for members in groups.values():
        candidates = [candidate for _, candidate in members]
        fits = [c for c in candidates if c.over_limit(search.limit) <= 0]
        fastest = min(candidates, key=lambda c: (c.step_time, rank_key(c)))
        base = min(fits, key=rank_key) if fits else fastest
        if choice is not None and base != choice and (
            base.step_time > choice.step_time * (1 + ORDER_SEARCH_MARGIN)
        ):
            continue
        if not searchable(base) or base.shard == "full":
            continue  # (an order search prices no gathers: full sharding keeps its family's order)
        record = members[0][0]
        # Any order of these actions, which may split a backward its family runs whole.
        bound = search.bound(record, base.recompute, "any")
        targets.append(OrderTarget(base, bound, search.costs_of(record),
                                   search.links(record.degree)))
    if choice is None:
        # Nothing fits: the orders most likely to fit first (the least over the limit).
        targets.sort(key=lambda t: (t.base.peak_memory, t.base.step_time, t.bound))
    else:
        targets.sort(key=lambda t: (t.base != choice, t.base.step_time, t.bound, rank_key(t.base)))
    return targets
