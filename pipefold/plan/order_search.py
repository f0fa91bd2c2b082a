"""`find_schedule(costs, ...)`: a flush schedule searched for measured costs, not drawn by hand.

    >>> from pipefold.plan import find_schedule
    >>> from pipefold.simulate import CostModel
    >>> costs = CostModel.from_lists(f=[1, 1.5, 1, 1], i=[1, 1.5, 1, 1], w=[1, 1.5, 1, 1])
    >>> schedule = find_schedule(costs, num_ranks=4, num_microbatches=8)   # validated, name "auto"

`search_schedule` returns the same schedule with how it was found (`ScheduleSearch`):
list-scheduler starts (list_scheduler.py) and the flush families, refined by a local
search (local_search.py), every order scored by `pipefold.simulate`. The method is in
docs/decisions.md, "Automatic schedules".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import product

from pipefold.errors import CostModelError, ScheduleError
from pipefold.plan.list_scheduler import Policy, Problem, Warmup, WeightPass, list_schedule
from pipefold.plan.local_search import Evaluator, Scored, local_search
from pipefold.schedule.ir import Op, Schedule, WeightUpdate
from pipefold.schedule.placement import Placement, placement_of
from pipefold.schedule.registry import build, names
from pipefold.schedule.validate import validate
from pipefold.simulate.costs import CostModel
from pipefold.simulate.engine import simulate

__all__ = ["FamilyBaseline", "ScheduleSearch", "find_schedule", "search_schedule"]


@dataclass(frozen=True)
class FamilyBaseline:
    """One schedule the search compared, as simulated with the search's costs."""

    name: str
    """The family's name."""
    makespan: float
    bubble_fraction: float
    peak_memory: int
    """Most memory any rank holds, in the search's unit (`ScheduleSearch.memory_unit`)."""
    fits: bool
    """Whether `peak_memory` is within the memory limit."""
    placement: tuple[int, ...]


@dataclass(frozen=True)
class ScheduleSearch:
    """What `search_schedule` found and what it was compared with."""

    schedule: Schedule
    makespan: float
    bubble_fraction: float
    peak_memory: tuple[int, ...]
    """Per rank, in `memory_unit`."""
    memory_limit: int
    memory_unit: str
    """`bytes`, or `stage micro-batches` when the cost model gives no sizes."""
    origin: str
    """The starting point that won: a list-scheduler setting or a family name."""
    local_moves: int
    """Changes the local search kept on top of `origin`."""
    evaluations: int
    """Schedules simulated, starting points included."""
    baselines: tuple[FamilyBaseline, ...]
    """Every flush family with as many stages as the costs, fastest first."""

    def best_family(self, *, fitting: bool = True) -> FamilyBaseline | None:
        """The fastest family (within the memory limit, unless `fitting=False`)."""
        return next((c for c in self.baselines if c.fits or not fitting), None)


_LARGE = 4096
"""Ranks x micro-batches above which a strict budget leaves the families out of the starts."""


def _memory_costs(costs: CostModel) -> tuple[CostModel, str]:
    if any(costs.activation_bytes) or any(costs.weight_grad_bytes):
        return costs, "bytes"
    ones = (1,) * costs.num_stages
    return replace(costs, activation_bytes=ones, weight_grad_bytes=ones), "stage micro-batches"


def _family_candidates(
    memory_costs: CostModel, num_ranks: int, num_microbatches: int, num_virtual: int,
    deadline: float = float("inf"),
) -> list[tuple[Schedule, FamilyBaseline]]:
    """Every flush family buildable with these parameters, simulated (fits is filled in later); those
    built before `deadline` only."""
    found = []
    for name in names():
        if time.perf_counter() > deadline:
            break
        try:
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             num_virtual=num_virtual)
        except ScheduleError:
            continue  # not legal here (e.g. zb-v needs two stages per rank)
        if schedule.weight_update is not WeightUpdate.FLUSH or time.perf_counter() > deadline:
            continue
        timeline = simulate(schedule, memory_costs)
        found.append((schedule, FamilyBaseline(
            name, timeline.makespan, timeline.bubble_fraction, max(timeline.activation_bytes_peak),
            True, schedule.placement,
        )))
    return found


def search_schedule(
    costs: CostModel,
    *,
    num_ranks: int,
    num_microbatches: int,
    num_virtual: int = 1,
    placement: Placement = "contiguous",
    memory_limit: int | None = None,
    split_backward: bool = True,
    time_budget_s: float = 1.0,
    include_families: bool = True,
    strict_budget: bool = False,
) -> ScheduleSearch:
    """Search a flush schedule for `costs` and report how (docs/decisions.md, "Automatic schedules").

    `memory_limit` is per rank, in bytes as `simulate` counts activation memory, or, when
    `costs` gives no sizes, in (stage, micro-batch) pairs held from F to W/B; None means
    1F1B's peak. `split_backward=False` uses only whole backwards (B); with True the
    result may still hold B where fusing I and W was faster. `time_budget_s` bounds the
    whole search, except that the list-scheduler runs always finish; the local search
    stops when it is spent, so a result found under a tight budget can depend on the
    machine's speed. With `strict_budget` (the planner's) the list-scheduler runs and the
    families' builds stop at the budget too, and a search that scored nothing by then raises
    `ScheduleError`: at 64 ranks and 512 micro-batches one run takes seconds. Raises
    ScheduleError for a cap below one micro-batch per rank or a bad placement, CostModelError if
    `costs` has not num_ranks x num_virtual stages.
    """
    if num_ranks < 1 or num_microbatches < 1 or num_virtual < 1:
        raise ScheduleError(
            f"num_ranks={num_ranks}, num_microbatches={num_microbatches}, num_virtual={num_virtual}: "
            "each must be >= 1"
        )
    target = placement_of(placement, num_ranks, num_virtual)
    if costs.num_stages != len(target):
        raise CostModelError(
            f"cost model has num_stages={costs.num_stages} but {num_ranks} ranks x {num_virtual} stages "
            f"per rank make {len(target)}; give one entry per (virtual) stage"
        )
    if not time_budget_s >= 0:
        raise ScheduleError(f"time_budget_s={time_budget_s!r}; give a number of seconds >= 0")
    deadline = time.perf_counter() + time_budget_s
    memory_costs, unit = _memory_costs(costs)
    hard_deadline = deadline if strict_budget else float("inf")
    # Under a strict budget a large problem skips the families: building and simulating one takes
    # seconds there, past any check of the clock; its list-scheduler runs check it as they go.
    large = num_ranks * num_microbatches > _LARGE
    families = [] if strict_budget and large else _family_candidates(
        memory_costs, num_ranks, num_microbatches, num_virtual, hard_deadline)

    if memory_limit is None:
        # 1F1B's peak from its formula, min(p-r, m) micro-batches on rank r, not from its
        # simulation: with zero-time actions the simulator frees and takes at one instant.
        activation = memory_costs.activation_bytes
        if num_virtual == 1:
            cap = max(min(num_ranks - rank, num_microbatches) * activation[rank] for rank in range(num_ranks))
        else:
            heaviest = max(
                sum(activation[s] for s, r in enumerate(target) if r == rank) for rank in range(num_ranks)
            )
            cap = min(num_ranks, num_microbatches) * heaviest
    else:
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 0:
            raise ScheduleError(f"memory_limit={memory_limit!r}; give a whole number >= 0 ({unit}) or None")
        cap = memory_limit
    problem = Problem(num_ranks, num_microbatches, target, costs, memory_costs, cap)
    baselines = tuple(sorted(
        (replace(c, fits=c.peak_memory <= cap) for _, c in families),
        key=lambda c: (c.makespan, c.peak_memory),
    ))

    evaluator = Evaluator(problem)
    starts: list[tuple[str, Scored]] = []
    splits = (True, False) if split_backward else (False,)
    one_stage = num_virtual == 1
    for split, weight_pass, warmup, forward_first, forward_yields, deep_first in product(
        splits,
        tuple(WeightPass),
        tuple(Warmup) if one_stage else (Warmup.MEMORY,),
        (False, True),
        (False, True),
        (True,) if one_stage else (True, False),
    ):
        if (not split and weight_pass is not WeightPass.LAST) or not problem.admits(split):
            continue  # without W the weight-pass switch means nothing
        policy = Policy(split, weight_pass, warmup, forward_first, forward_yields, deep_first)
        if time.perf_counter() > hard_deadline:
            break
        rows = list_schedule(problem, policy, hard_deadline)
        if rows is None:
            break
        scored = evaluator.score(tuple(tuple(row) for row in rows))
        if scored is not None:
            starts.append((policy.describe(), scored))
    if include_families:
        for schedule, candidate in families:
            if time.perf_counter() > hard_deadline:
                break
            uses_split = any(a.op is Op.I for _, _, a in schedule.iter_actions())
            if schedule.placement != target or (uses_split and not split_backward):
                continue
            scored = evaluator.score(schedule.actions)
            if scored is not None:
                starts.append((f"family {candidate.name}", scored))
    if not starts and time.perf_counter() > hard_deadline:
        raise ScheduleError(
            f"the search's time budget of {time_budget_s:.3g} s was spent before any order of {num_ranks} "
            f"ranks x {num_microbatches} micro-batches was scored; give it more time"
        )
    if not starts:
        needed = min(
            max(problem.rank_footprint(rank, split) for rank in range(num_ranks)) for split in splits
        )
        raise ScheduleError(
            f"memory_limit={cap} ({unit}) is below what one micro-batch holds on the busiest rank "
            f"({needed}); give memory_limit >= {needed}"
        )
    origin, best = starts[0]
    for name, scored in starts[1:]:
        if scored.beats(best):
            origin, best = name, scored
    best, moves = local_search(evaluator, best, deadline)
    schedule = evaluator.schedule(best.rows)
    validate(schedule)
    return ScheduleSearch(
        schedule=schedule,
        makespan=best.makespan,
        bubble_fraction=best.bubble_fraction,
        peak_memory=best.peak,
        memory_limit=cap,
        memory_unit=unit,
        origin=origin,
        local_moves=moves,
        evaluations=evaluator.count,
        baselines=baselines,
    )


def find_schedule(
    costs: CostModel,
    *,
    num_ranks: int,
    num_microbatches: int,
    num_virtual: int = 1,
    placement: Placement = "contiguous",
    memory_limit: int | None = None,
    split_backward: bool = True,
    time_budget_s: float = 1.0,
    include_families: bool = True,
) -> Schedule:
    """The fastest flush schedule `search_schedule` finds for `costs`, validated, named `auto`.

    Runs like any family's schedule: `Pipeline(layers, schedule=find_schedule(...))`, or
    write it (`write_atomic(path, pipefold.schedule.io.dumps(schedule))`) and load it where it
    runs.
    """
    return search_schedule(
        costs,
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_virtual=num_virtual,
        placement=placement,
        memory_limit=memory_limit,
        split_backward=split_backward,
        time_budget_s=time_budget_s,
        include_families=include_families,
    ).schedule
