"""Searched orders as planner candidates: a configuration's actions in an order found for its costs.

Which configurations are searched, pruned, budgeted and how searched orders rank against
families: docs/decisions.md, "Planner refinement".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pipefold.errors import ScheduleError
from pipefold.plan.calibrate import first_stage_backward, update_time
from pipefold.plan.costs import ModelCosts
from pipefold.plan.deferred_weight import stage_deferred_shares
from pipefold.plan.held_cost import held_extra, prices_held, with_held_cost
from pipefold.plan.held_states import stage_state_weights
from pipefold.plan.memory import (
    RankMemory,
    excess_per_rank,
    memory_of_peaks,
    rank_memory,
    static_bytes,
    static_weight_bytes,
)
from pipefold.plan.order_search import search_schedule
from pipefold.plan.orders import compiles, family_placement
from pipefold.plan.precision_costs import (
    cast_time,
    casts_every_forward,
    recast_every_forward,
    rerun_copies,
    without_held_casts,
)
from pipefold.plan.ranking import SLACK, bucket_ceiling, bucket_floor
from pipefold.plan.result import Candidate, SearchedOrder
from pipefold.plan.space import SEARCHED_ORDER, PlanOptions, is_asynchronous
from pipefold.plan.stages import StageLayout, stage_cost_model, transient_bytes
from pipefold.plan.topology import MeshLinks
from pipefold.schedule import Schedule, layout_of
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.compiled import CompiledSchedule

__all__ = [
    "ORDER_SEARCH_MARGIN",
    "OrderTarget",
    "Refinement",
    "refine_orders",
    "search_order",
    "searchable",
    "searched_candidate",
]

DEFAULT_SEARCH_TIME_S = 1.0
"""Seconds `search_order` may spend by default (the list-scheduler runs always finish)."""

ORDER_SEARCH_MARGIN = 0.10
"""Configurations whose best family order is more than this much slower than the family choice
are not searched (see docs/decisions.md, "Planner refinement")."""


def searchable(candidate: Candidate) -> bool:
    """Whether the order of `candidate`'s configuration can be searched: a flush family whose
    layout `search_schedule` knows."""
    if candidate.is_searched_order or is_asynchronous(candidate.schedule):
        return False
    placement = family_placement(candidate.schedule, candidate.num_ranks, candidate.num_virtual)
    return layout_of(placement, candidate.num_ranks, candidate.num_virtual) is not None


def search_order(
    costs: ModelCosts,
    options: PlanOptions,
    choice: Candidate,
    *,
    time_budget_s: float = DEFAULT_SEARCH_TIME_S,
    link: Link | None = None,
    link_overrides: tuple[tuple[tuple[int, int], Link], ...] = (),
) -> SearchedOrder | None:
    """Search an order for the configuration of the family candidate `choice` (docs/decisions.md,
    "Planner refinement"), over or within the memory limit; None where the family is asynchronous,
    its layout is not one the search knows, or no order fits the memory the limit leaves, or the
    budget ran out before any order was scored. `link` and `link_overrides`: the sends' links
    (default: the options' link)."""
    if not searchable(choice):
        return None
    pp, v, m = choice.num_ranks, choice.num_virtual, choice.num_microbatches
    # The placement alone: the family's `Schedule` at 64 ranks x 512 micro-batches took seconds to build.
    placement = family_placement(choice.schedule, pp, v)
    layout = layout_of(placement, pp, v)
    assert layout is not None  # searchable
    stages = StageLayout(choice.bounds, choice.microbatch_rows)
    speeds = tuple(choice.rank_speeds[rank] for rank in placement) if choice.rank_speeds else None
    model = first_stage_backward(stage_cost_model(
        costs, stages, choice.recompute, options.link if link is None else link,
        options.cores_per_pipeline(choice.num_data_parallel, choice.num_tensor_parallel), link_overrides,
        speeds,
    ), costs, choice.bounds)
    recast = casts_every_forward(choice.schedule, choice.shard)
    if recast:  # as evaluate prices it: every forward casts its weights again
        model = recast_every_forward(model, costs, choice.recompute, choice.bounds)
    transient = transient_bytes(costs, stages, choice.recompute, placement, pp,
                                rerun_copies(costs, choice.schedule, choice.shard))
    if math.isinf(options.memory_limit):
        # No limit: as many activations as the family that holds the most (every micro-batch).
        cap: int | None = sum(model.activation_bytes) * m
    else:
        fixed = static_bytes(costs, model, placement, pp)
        limits = [min(options.memory_limit, own) for own in choice.rank_limits] or [options.memory_limit] * pp
        cap = int(min(limits[r] - fixed[r] - transient[r] for r in range(pp)))
        if cap < 0:
            return None
    try:
        found = search_schedule(
            model, num_ranks=pp, num_microbatches=m, num_virtual=v, placement=layout,
            memory_limit=cap, time_budget_s=time_budget_s, strict_budget=True,
        )
    except ScheduleError:
        return None  # not even one micro-batch per rank fits beside the weights
    makespan, bubble, memory = _priced_order(found.schedule, model, costs, transient)
    held: tuple[tuple[float, float], ...] = ()
    if prices_held(costs):
        # The order was searched on the costs as measured; its ranks then pay for the activations
        # they hold (the order fixes the peaks: plan.held_cost), as `evaluate` prices a family.
        peaks = tuple(rank.activations for rank in memory)
        states = stage_state_weights(found.schedule) if costs.held_state_forward > 0 else ()
        held = held_extra(costs, peaks, found.schedule.placement, choice.bounds, states)
        late = stage_deferred_shares(found.schedule) if costs.deferred_weight_grad > 0 else ()
        model = with_held_cost(model, costs, found.schedule.placement, peaks, choice.bounds, states, late)
        makespan, bubble, memory = _priced_order(found.schedule, model, costs, transient)
    if recast:
        memory = without_held_casts(memory)
    if max(excess_per_rank(memory, options.memory_limit, choice.rank_limits)) > 0:
        return None
    return SearchedOrder(
        schedule=found.schedule,
        family=choice.schedule,
        step_time=makespan + choice.allreduce_s + choice.tied_exchange_s
        + _update(costs, model, placement, choice)
        + cast_time(costs, model, choice.schedule, choice.shard, placement),
        family_step_time=choice.step_time,
        bubble_fraction=bubble,
        memory=memory,
        origin=found.origin,
        family_fits=choice.over_limit(options.memory_limit) <= 0,
        held_slowdown=held,
    )


def _priced_order(schedule: Schedule, model: CostModel, costs: ModelCosts, transient: tuple[int, ...]
                  ) -> tuple[float, float, tuple[RankMemory, ...]]:
    """A searched order's makespan, bubble and memory per rank on `model`."""
    pp = schedule.num_ranks
    if compiles(schedule, model):
        run = CompiledSchedule(schedule).run(model)
        weights = tuple(static_weight_bytes(model, schedule.placement, pp))
        return (run.makespan, run.bubble_fraction(pp),
                memory_of_peaks(costs, model, weights, run.activation_peaks, schedule.placement, transient,
                                run.later_peaks, schedule.num_microbatches))
    timeline = simulate(schedule, model)
    return (timeline.makespan, timeline.bubble_fraction,
            rank_memory(costs, model, timeline, schedule.placement, transient, schedule.num_microbatches))


def _update(costs: ModelCosts, model: CostModel, placement: tuple[int, ...], choice: Candidate) -> float:
    """The optimizer update after the step, as `evaluate` prices it for the family."""
    seconds = update_time(costs, static_weight_bytes(model, placement, choice.num_ranks))
    sharded = choice.sharded_optimizer or choice.shard == "full"
    return seconds / choice.num_data_parallel if sharded else seconds


def searched_candidate(base: Candidate, found: SearchedOrder) -> Candidate:
    """`found` as a candidate of its own: `base`'s configuration run in the searched order."""
    return replace(
        base, schedule=SEARCHED_ORDER, step_time=found.step_time, bubble_fraction=found.bubble_fraction,
        memory=found.memory, order=found.schedule, base_family=base.schedule,
        held_slowdown=found.held_slowdown,
    )


@dataclass(frozen=True)
class OrderTarget:
    """One configuration whose order may be searched (docs/decisions.md, "Planner refinement")."""

    base: Candidate
    """The best family candidate of the configuration (the fastest, where none fits)."""
    bound: float
    """Lower bound on the step of any order of its actions."""
    costs: ModelCosts
    """One tp rank's costs at its degree."""
    links: MeshLinks
    """The links of its split."""


@dataclass
class Refinement:
    """What the order search found, and what it left unsearched."""

    found: list[tuple[Candidate, SearchedOrder]] = field(default_factory=list)
    """Searched orders that fit, as candidates, with what the search reported."""
    of_choice: SearchedOrder | None = None
    """The searched order of the family choice's configuration (fitting), if it was searched."""
    num_searches: int = 0
    num_pruned: int = 0
    num_unsearched: int = 0

    def searched_for(self, candidate: Candidate) -> SearchedOrder | None:
        return next((order for found, order in self.found if found == candidate), None)

def refine_orders(
    targets_of: Callable[[float], tuple[list[OrderTarget], int]],
    choice: Candidate | None,
    options: PlanOptions,
) -> Refinement:
    """Search the orders of the targets, best first, while they can still beat the family `choice`
    (None: no family order fits) and the budget lasts (see docs/decisions.md, "Planner refinement").
    `targets_of(deadline)`: the configurations to search, in order, timing the untimed ones that
    could compete until `deadline` (perf_counter seconds), and how many it left untimed."""
    refinement = Refinement()
    refinement = Refinement()
    if options.order_search_s <= 0 or (choice is None and not options.ranks_searched_orders):
        return refinement
    start = time.perf_counter()
    # A searched order ranks ahead of the family choice only below the choice's time bucket.
    ceiling = math.inf if choice is None else bucket_floor(choice.step_time)
    targets, num_untimed = targets_of(start + options.order_search_total_s)
    refinement.num_unsearched += num_untimed
    if not options.ranks_searched_orders:
        # Families pinned without "auto": only the choice's order is searched, to report beside it.
        targets = [target for target in targets if target.base == choice]
    for index, target in enumerate(targets):
        left = options.order_search_total_s - (time.perf_counter() - start)
        is_choice = choice is not None and target.base == choice
        if not is_choice:
            if target.bound > ceiling * (1 + SLACK):
                refinement.num_pruned += 1
                continue
            if refinement.num_searches >= options.max_order_searches or left <= 0:
                refinement.num_unsearched += 1
                continue
        # An equal share of what is left for each search that may still run, so the first
        # searches do not spend the budget of the rest.
        num_left = max(1, min(options.max_order_searches - refinement.num_searches,
                              len(targets) - index))
        refinement.num_searches += 1
        found = search_order(target.costs, options, target.base,
                             time_budget_s=max(0.0, min(options.order_search_s, left / num_left)),
                             link=target.links.pipeline, link_overrides=target.links.pipeline_overrides)
        if found is None:
            continue
        if is_choice:
            refinement.of_choice = found
        if not options.ranks_searched_orders or (found.family_fits and found.gain <= 1 + SLACK):
            continue  # not competing, or no faster than its family's order: nothing new to rank
        candidate = searched_candidate(target.base, found)
        refinement.found.append((candidate, found))
        if candidate.step_time < ceiling:
            # Later targets must also reach this one's bucket to matter.
            ceiling = bucket_ceiling(candidate.step_time)
    return refinement
