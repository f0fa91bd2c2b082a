"""Searched orders as planner candidates: a configuration's actions in an order found for its costs.

[Note: planner refinement]
The family search (search.py) prices every configuration (split, family, v, m, partition,
recompute) at its family's hand-written order. Afterwards the order itself is searched:
`search_schedule` (order_search.py) runs on a configuration's own cost model
(partition, micro-batch size, recomputed stages, link, shared cores), in its layout, under
the activation memory the limit leaves on the fullest rank once weights, gradients,
optimizer state and the recompute transient are counted. Each result is simulated and
priced like any candidate and joins the ranking as schedule "auto", carrying its
`Schedule` (`Candidate.order`), so it can be the choice, be saved and be run.

1. What is searched. The search depends on a family only through its layout, so every
   (split, partition, m, v, layout, recompute) is one target, however many families share
   it; its base is the best family candidate there (the fastest, where none fits). The
   family choice's configuration goes first, as it always did; the others follow in order
   of their base's step time, and only those whose base is within `ORDER_SEARCH_MARGIN`
   (10%) of the family choice: a searched order gains a few percent on its family's (its
   seeds include every fitting family of the layout), rarely ten, and each search costs
   up to `order_search_s`. Configurations the family search never simulated are not
   targets: their bound already exceeded the table's slowest entry, so no order of them
   can win.
2. Pruning. The lower bounds of bounds.py hold for any order of the same actions, so a
   target whose bound is not below the family choice's 1% time bucket (nor inside the best
   searched order's) cannot become the choice and is skipped unsearched.
3. Budget. At most `max_order_searches` searches (default 8), each of at most
   `order_search_s` (1 s) and all together of about `order_search_total_s` (2 s): each gets
   an equal share of what is left among the searches that may still run, and none but the
   first starts once it is spent; a search's list-scheduler runs always finish, so the
   total can run over a little. `order_search_s = 0` turns searching off: every candidate
   is a family's order, as before. The defaults keep `pipefold plan` within a few seconds.
4. Over-memory configurations are searched too. A target whose family orders all exceed
   the limit (typically without the recompute the family search then added) gets the same
   memory cap, and a searched order that holds fewer micro-batches in flight can fit where
   no family order of it does, without recomputing. It is cheap: where even one
   micro-batch per rank exceeds the cap, `search_schedule` refuses at once, and the bound,
   the margin (on the family's over-memory step time) and the budget apply as above.
5. Ranking. A searched order is ranked like any candidate, except that within one 1% time
   bucket every family order comes first: a family's order is known to run well on any
   costs, a searched one is tuned to these (on the CPU benchmark a searched order predicted
   ahead of zb-h1 ran 6% behind it). So the choice is a searched order only where it is
   faster than every family candidate beyond the tolerance; otherwise the table may list
   searched orders and the choice's own searched order is still reported with its gain.
   Only orders faster than their base family's, or fitting where it does not, are ranked.
6. No family fits. Where no family order fits anywhere, the search runs before giving up:
   every simulated configuration is a target (no margin: there is no choice to be near),
   the least over the limit first, with the same budget; the fastest order that fits is
   the choice, and `NoFeasiblePlan` is raised only where none does.

With families pinned (`schedules`), searched orders compete only where "auto" is among
the pins; otherwise only the choice's order is searched and reported beside it.
Asynchronous families are not searched (the search builds flush schedules), nor layouts
the search does not know, nor configurations the family search pruned unsimulated.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pipefold.errors import ScheduleError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.memory import rank_memory, static_bytes
from pipefold.plan.order_search import search_schedule
from pipefold.plan.result import Candidate, SearchedOrder
from pipefold.plan.space import SEARCHED_ORDER, PlanOptions, is_asynchronous
from pipefold.plan.stages import StageLayout, stage_cost_model, transient_bytes
from pipefold.schedule import build, layout_of
from pipefold.simulate import simulate

__all__ = ["search_order", "searchable", "searched_candidate", "ORDER_SEARCH_MARGIN"]

DEFAULT_SEARCH_TIME_S = 1.0
"""Seconds `search_order` may spend by default (the list-scheduler runs always finish)."""

ORDER_SEARCH_MARGIN = 0.10
"""Configurations whose best family order is more than this much slower than the family choice
are not searched (see [Note: planner refinement])."""


def searchable(candidate: Candidate) -> bool:
    """Whether the order of `candidate`'s configuration can be searched: a flush family whose
    layout `search_schedule` knows."""
    if candidate.is_searched_order or is_asynchronous(candidate.schedule):
        return False
    family = build(candidate.schedule, num_ranks=candidate.num_ranks, num_microbatches=1,
                   num_virtual=candidate.num_virtual)
    return layout_of(family.placement, candidate.num_ranks, candidate.num_virtual) is not None


def search_order(
    costs: ModelCosts,
    options: PlanOptions,
    choice: Candidate,
    *,
    time_budget_s: float = DEFAULT_SEARCH_TIME_S,
) -> SearchedOrder | None:
    """Search an order for the configuration of the family candidate `choice` (see [Note: planner
    refinement]), over or within the memory limit; None where the family is asynchronous, its
    layout is not one the search knows, or no order fits the memory the limit leaves."""
    if not searchable(choice):
        return None
    pp, v, m = choice.num_ranks, choice.num_virtual, choice.num_microbatches
    family = build(choice.schedule, num_ranks=pp, num_microbatches=m, num_virtual=v)
    layout = layout_of(family.placement, pp, v)
    assert layout is not None  # searchable
    stages = StageLayout(choice.bounds, choice.microbatch_rows)
    model = stage_cost_model(
        costs, stages, choice.recompute, options.link,
        options.cores_per_pipeline(choice.num_data_parallel, choice.num_tensor_parallel),
    )
    transient = transient_bytes(costs, stages, choice.recompute, family.placement, pp)
    if math.isinf(options.memory_limit):
        # No limit: as many activations as the family that holds the most (every micro-batch).
        cap: int | None = sum(model.activation_bytes) * m
    else:
        fixed = static_bytes(costs, model, family.placement, pp)
        cap = int(min(options.memory_limit - fixed[r] - transient[r] for r in range(pp)))
        if cap < 0:
            return None
    try:
        found = search_schedule(
            model, num_ranks=pp, num_microbatches=m, num_virtual=v, placement=layout,
            memory_limit=cap, time_budget_s=time_budget_s,
        )
    except ScheduleError:
        return None  # not even one micro-batch per rank fits beside the weights
    timeline = simulate(found.schedule, model)
    memory = rank_memory(costs, model, timeline, found.schedule.placement, transient)
    if max(rank.total for rank in memory) > options.memory_limit:
        return None
    return SearchedOrder(
        schedule=found.schedule,
        family=choice.schedule,
        step_time=timeline.makespan + choice.allreduce_s,
        family_step_time=choice.step_time,
        bubble_fraction=timeline.bubble_fraction,
        memory=memory,
        origin=found.origin,
        family_fits=choice.over_limit(options.memory_limit) <= 0,
    )


def searched_candidate(base: Candidate, found: SearchedOrder) -> Candidate:
    """`found` as a candidate of its own: `base`'s configuration run in the searched order."""
    return replace(
        base, schedule=SEARCHED_ORDER, step_time=found.step_time, bubble_fraction=found.bubble_fraction,
        memory=found.memory, order=found.schedule, base_family=base.schedule,
    )
