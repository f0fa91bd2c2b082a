"""A searched schedule for the planner's choice: the same configuration, an order found for its costs.

[Note: planner refinement]
The planner searches families, stages per rank, micro-batch counts, partitions and
recomputation; every candidate is a family's order. Once it has chosen, the order
itself is searched too: `search_schedule` (pipefold/schedule/auto.py) runs on the
choice's own cost model (its partition, micro-batch size, recomputed stages, link and
shared cores), in the choice family's layout, under the activation memory the limit
leaves on the fullest rank once weights, gradients, optimizer state and the
recompute transient are counted. The result is simulated and priced like any
candidate, and reported next to the choice with its gain; the choice itself stays
the family (a family's order is known to run well everywhere, a searched one is
tuned to these costs), so the plan table and the verdicts are unchanged.

Only once, for the choice: searching an order per candidate would multiply the
planner's time by the search budget, and the lower bounds that prune candidates hold
for any order of the same actions, so no pruned configuration could have won by its
order more than the bound already allowed. Asynchronous families are not refined
(the search builds flush schedules), nor layouts the search does not know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipefold.errors import ScheduleError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.memory import RankMemory, rank_memory, static_bytes
from pipefold.plan.result import Candidate
from pipefold.plan.space import PlanOptions, is_asynchronous
from pipefold.plan.stages import StageLayout, stage_cost_model, transient_bytes
from pipefold.schedule import Schedule, build, search_schedule
from pipefold.schedule.auto import layout_of
from pipefold.schedule.io import from_json, to_json
from pipefold.simulate import simulate

__all__ = ["SearchedOrder", "search_order"]

DEFAULT_SEARCH_TIME_S = 1.0
"""Seconds `search_order` may spend by default (the list-scheduler runs always finish)."""


@dataclass(frozen=True)
class SearchedOrder:
    """The order `search_schedule` found for the choice's configuration, simulated and priced."""

    schedule: Schedule
    """Named "auto"; runs with the choice's partition, micro-batches and recompute."""
    family: str
    """The choice's family, whose order it was compared with."""
    step_time: float
    """Predicted seconds per step, the choice's gradient all-reduce included."""
    family_step_time: float
    bubble_fraction: float
    memory: tuple[RankMemory, ...]
    origin: str
    """Where the search started: a list-scheduler setting or a family."""

    @property
    def gain(self) -> float:
        """The choice's step over this one's (above 1: the searched order is faster)."""
        return self.family_step_time / self.step_time if self.step_time > 0 else 1.0

    @property
    def peak_memory(self) -> int:
        return max(memory.total for memory in self.memory)

    def explain(self) -> str:
        if self.gain <= 1.0:
            return (
                f"searched order: none faster than {self.family}'s for these costs "
                f"(best found {self.step_time:.4g} s, from {self.origin})"
            )
        return (
            f"searched order: predicted step {self.step_time:.4g} s, {self.gain:.3f}x {self.family}'s "
            f"{self.family_step_time:.4g} s, bubble {self.bubble_fraction:.1%}, from {self.origin}; "
            "`pipefold plan --save-schedule FILE` writes it, for "
            "Pipeline(schedule=pipefold.schedule.io.load(FILE)) with the same partition and micro-batches"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": to_json(self.schedule),
            "family": self.family,
            "step_time": self.step_time,
            "family_step_time": self.family_step_time,
            "gain": self.gain,
            "bubble_fraction": self.bubble_fraction,
            "memory": [memory.to_json() for memory in self.memory],
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchedOrder:
        return cls(
            schedule=from_json(data["schedule"]),
            family=str(data["family"]),
            step_time=float(data["step_time"]),
            family_step_time=float(data["family_step_time"]),
            bubble_fraction=float(data["bubble_fraction"]),
            memory=tuple(RankMemory.from_json(entry) for entry in data["memory"]),
            origin=str(data["origin"]),
        )


def search_order(
    costs: ModelCosts,
    options: PlanOptions,
    choice: Candidate,
    *,
    time_budget_s: float = DEFAULT_SEARCH_TIME_S,
) -> SearchedOrder | None:
    """Search an order for `choice`'s configuration (see [Note: planner refinement]); None
    where the family is asynchronous, its layout is not one the search knows, or no order
    fits the memory the limit leaves."""
    if is_asynchronous(choice.schedule):
        return None
    pp, v, m = choice.num_ranks, choice.num_virtual, choice.num_microbatches
    family = build(choice.schedule, num_ranks=pp, num_microbatches=m, num_virtual=v)
    layout = layout_of(family.placement, pp, v)
    if layout is None:
        return None
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
    )
