"""`find_schedule(costs, ...)`: a flush schedule searched for measured costs, not drawn by hand.

    >>> from pipefold.schedule import find_schedule
    >>> from pipefold.simulate import CostModel
    >>> costs = CostModel.from_lists(f=[1, 1.5, 1, 1], i=[1, 1.5, 1, 1], w=[1, 1.5, 1, 1])
    >>> schedule = find_schedule(costs, num_ranks=4, num_microbatches=8)   # validated, name "auto"

[Note: automatic schedules]
Qi et al. (2023, "Zero Bubble Pipeline Parallelism", section 3) schedule from
profiled F, B, W times with a greedy heuristic refined by an ILP. We keep the
heuristic, replace the ILP by a bounded local search, and score everything with
`simulate`, so the search sees the same link model and blocking semantics as
every other prediction:

1. A list scheduler plays the pipeline forward in time with the real costs
   (compute and message times). Whenever a rank is idle it takes, among the
   actions whose inputs have arrived:
   - a backward for the input gradient (I, or B unsplit), earliest micro-batch
     first: it is on the critical path back to the first stage and frees memory;
   - else a forward, if the memory cap admits its micro-batch (see below);
   - else a pending weight pass W, which fills time that would be idle.
   Switches vary this: forward before backward; a forward yields to a backward
   whose input is known to arrive before the forward would end; W only in a gap
   long enough for it (or when memory blocks a forward); W right after its I;
   a 1F1B (p-r) or ZB-H2 (2(p-r)-1) cap on micro-batches in flight per rank;
   with several stages per rank, deepest or shallowest stage first; B instead of
   I+W. Every combination is run (a few dozen runs, each O(actions)).
2. Hand-written flush families with the same placement that fit the cap join as
   candidates (1F1B always fits the default cap), so the result is never slower
   than them; `include_families=False` leaves them out.
3. From the fastest candidate, a first-improvement local search pulls a later
   action into a gap where a rank waits, swaps adjacent actions of one rank, and
   fuses an adjacent I, W pair into B, keeping a change when the simulated
   makespan drops (ties: lower peak memory) and the cap still holds, until no
   move helps or the time budget is spent.

Memory is what `simulate` reports as `activation_bytes_peak` (see [Note: what a
rank holds] in pipefold/simulate/memory.py). When the cost model gives no sizes,
each (stage, micro-batch) counts 1 from the end of its F to the end of its W or B,
as the ZB paper counts it; the cap then counts micro-batches (times stages per
rank). The default cap is 1F1B's peak: min(p-r, m) micro-batches of stage r on
rank r, the most over ranks; with several stages per rank, min(p, m) micro-batches
of the heaviest rank's stages.

Admission keeps the list scheduler inside the cap and out of deadlock. A
micro-batch enters a rank at the F of the rank's first stage and is charged there
for every stage it will hold on that rank (the larger of its activation and what
its I keeps for W); the charge drops at its I, W or B. The charge bounds what the
rank holds at every instant, so the cap holds. The earliest unfinished
micro-batch is never refused: everything before it has released its charge, so
the scheduler cannot stall for any cap that holds one micro-batch per rank.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from itertools import product
from typing import TYPE_CHECKING, Literal

from pipefold.errors import CostModelError, ScheduleError
from pipefold.schedule.ir import (
    Action,
    Op,
    Schedule,
    WeightUpdate,
    contiguous_placement,
    looped_placement,
    v_placement,
)
from pipefold.schedule.registry import build, names
from pipefold.schedule.validate import validate

if TYPE_CHECKING:
    from pipefold.simulate.costs import CostModel

# [Note: scoring by simulation] The search scores schedules with pipefold.simulate, which itself
# imports the schedule IR; it is imported inside the functions that need it, so importing
# pipefold.schedule never loads the simulator and the two packages cannot import each other in a
# cycle.

__all__ = ["Placement", "Candidate", "ScheduleSearch", "find_schedule", "layout_of", "search_schedule"]

Placement = Literal["contiguous", "v", "looped"]
"""Stage layout of the searched schedule: one stage per rank, zig-zag (as ZB-V), or round robin."""

_PLACEMENTS = ("contiguous", "v", "looped")

# Makespans closer than this (relative) tie; float sums of the same costs in another order differ
# in the last bits, and such a difference is no reason to prefer one schedule.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Candidate:
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
    baselines: tuple[Candidate, ...]
    """Every flush family with as many stages as the costs, fastest first."""

    def best_family(self, *, fitting: bool = True) -> Candidate | None:
        """The fastest family (within the memory limit, unless `fitting=False`)."""
        return next((c for c in self.baselines if c.fits or not fitting), None)


# -- the list scheduler ------------------------------------------------------------------------


class _WeightPass(Enum):
    LAST = "last"
    """Lowest priority: whenever nothing else can run."""
    GAP = "gap"
    """Only if no known arrival falls inside it, or a forward is blocked by memory."""
    EAGER = "eager"
    """Right after its I (the lowest memory a split backward allows)."""


class _Warmup(Enum):
    MEMORY = "memory"
    """As many micro-batches in flight as the cap admits."""
    ONE_F_ONE_B = "1f1b"
    """At most p-r micro-batches between F and backward on rank r (one stage per rank)."""
    ZB_H2 = "zb-h2"
    """At most 2(p-r)-1, ZB-H2's warm-up (one stage per rank)."""


@dataclass(frozen=True)
class _Policy:
    """One setting of the list scheduler's switches (see [Note: automatic schedules])."""

    split: bool
    weight_pass: _WeightPass
    warmup: _Warmup
    forward_first: bool
    forward_yields: bool
    deep_first: bool

    def describe(self) -> str:
        parts = [
            "I+W" if self.split else "B",
            f"warm-up {self.warmup.value}",
            "F first" if self.forward_first else "backward first",
        ]
        if self.split:
            parts.append(f"W {self.weight_pass.value}")
        if self.forward_yields:
            parts.append("F yields")
        parts.append("deep stage first" if self.deep_first else "shallow stage first")
        return "list scheduler (" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class _Problem:
    num_ranks: int
    num_microbatches: int
    placement: tuple[int, ...]
    costs: CostModel
    memory_costs: CostModel
    """`costs` with the sizes memory is counted in (bytes, or 1 per stage micro-batch)."""
    cap: int

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(stage for stage, owner in enumerate(self.placement) if owner == rank)

    def footprint(self, stage: int, split: bool) -> int:
        """The charge of one micro-batch on `stage` (see [Note: automatic schedules])."""
        held = self.memory_costs.activation_bytes[stage]
        return max(held, self.memory_costs.weight_grad_bytes[stage]) if split else held

    def rank_footprint(self, rank: int, split: bool) -> int:
        return sum(self.footprint(stage, split) for stage in self.stages_of(rank))

    def admits(self, split: bool) -> bool:
        return all(self.rank_footprint(rank, split) <= self.cap for rank in range(self.num_ranks))


def _list_schedule(problem: _Problem, policy: _Policy) -> list[list[Action]]:
    """Per-rank orders from one run of the list scheduler under `policy`.

    The caller checks `problem.admits(policy.split)`; then this never stalls.
    """
    p, m, num_stages = problem.num_ranks, problem.num_microbatches, problem.num_stages
    costs, placement, split = problem.costs, problem.placement, policy.split
    inf = math.inf
    stages_of = [problem.stages_of(rank) for rank in range(p)]
    # Forward candidates in the order the policy prefers them.
    forward_order = [tuple(reversed(s)) if policy.deep_first else s for s in stages_of]
    first_stage = [stages[0] if stages else -1 for stages in stages_of]
    footprint = [problem.footprint(stage, split) for stage in range(num_stages)]
    kept = [problem.memory_costs.weight_grad_bytes[stage] for stage in range(num_stages)]
    rank_footprint = [problem.rank_footprint(rank, split) for rank in range(p)]
    if policy.warmup is _Warmup.ONE_F_ONE_B:
        in_flight_limit = [p - rank for rank in range(p)]
    elif policy.warmup is _Warmup.ZB_H2:
        in_flight_limit = [2 * (p - rank) - 1 for rank in range(p)]
    else:
        in_flight_limit = [m] * p
    # Message delays into stage s: its F input from s-1, its backward input from s+1.
    delay_f = [
        costs.transfer_time(stage - 1, placement[stage - 1], placement[stage]) if stage else 0.0
        for stage in range(num_stages)
    ]
    delay_b = [
        costs.transfer_time(stage, placement[stage + 1], placement[stage]) if stage < num_stages - 1 else 0.0
        for stage in range(num_stages)
    ]
    backward_op = Op.I if split else Op.B
    backward_time = costs.i if split else costs.b

    f_end = [[inf] * m for _ in range(num_stages)]  # end time once started (durations are fixed)
    b_end = [[inf] * m for _ in range(num_stages)]  # of the I or B
    next_f = [0] * num_stages
    lowest_b = [0] * num_stages  # every micro-batch below has its backward started
    pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
    charge = [0] * p
    in_flight = [0] * p
    free_at = [0.0] * p
    rows: list[list[Action]] = [[] for _ in range(p)]
    remaining = (3 if split else 2) * num_stages * m
    events = [0.0]
    queued = {0.0}

    def push(when: float) -> None:
        if when not in queued:
            queued.add(when)
            heapq.heappush(events, when)

    def backward_arrival(stage: int, microbatch: int) -> float:
        ready = f_end[stage][microbatch]
        if stage < num_stages - 1:
            ready = max(ready, b_end[stage + 1][microbatch] + delay_b[stage])
        return ready

    def decide(rank: int, now: float) -> Action | None:
        if policy.weight_pass is _WeightPass.EAGER and pending_w[rank]:
            return Action(Op.W, *pending_w[rank][0])
        backward: Action | None = None
        next_backward = inf  # earliest known backward input arrival after now
        for stage in stages_of[rank]:
            for microbatch in range(lowest_b[stage], next_f[stage]):
                if b_end[stage][microbatch] < inf:
                    continue
                arrival = backward_arrival(stage, microbatch)
                if arrival <= now:
                    if backward is None or (microbatch, -stage) < (backward.microbatch, -backward.stage):
                        backward = Action(backward_op, stage, microbatch)
                else:
                    next_backward = min(next_backward, arrival)
        next_arrival = next_backward  # of anything this rank may run, forwards included below
        forward: Action | None = None
        memory_blocked = False
        for stage in forward_order[rank]:
            microbatch = next_f[stage]
            if microbatch >= m:
                continue
            arrival = f_end[stage - 1][microbatch] + delay_f[stage] if stage else 0.0
            admitting = stage == first_stage[rank]
            if admitting and (
                charge[rank] + rank_footprint[rank] > problem.cap or in_flight[rank] >= in_flight_limit[rank]
            ):
                memory_blocked = memory_blocked or charge[rank] + rank_footprint[rank] > problem.cap
                continue
            if arrival > now:
                next_arrival = min(next_arrival, arrival)
                continue
            if policy.forward_yields and backward is None and next_backward < now + costs.f[stage]:
                continue
            forward = Action(Op.F, stage, microbatch)
            break
        if forward is not None and (policy.forward_first or backward is None):
            return forward
        if backward is not None:
            return backward
        if pending_w[rank]:
            stage, microbatch = pending_w[rank][0]
            gap_too_short = next_arrival < now + costs.w[stage]
            if policy.weight_pass is _WeightPass.GAP and gap_too_short and not memory_blocked:
                return None  # idle until the arrival: a W now would delay it
            return Action(Op.W, stage, microbatch)
        return None

    while remaining:
        if not events:
            # Unreachable when problem.admits(policy.split) (see the Note); loud beats a bad schedule.
            raise ScheduleError(f"auto schedule: the list scheduler stalled under {policy.describe()}")
        now = heapq.heappop(events)
        queued.discard(now)
        for rank in range(p):
            if free_at[rank] > now:
                continue
            action = decide(rank, now)
            if action is None:
                continue
            stage, microbatch = action.stage, action.microbatch
            if action.op is Op.F:
                end = now + costs.f[stage]
                f_end[stage][microbatch] = end
                next_f[stage] += 1
                if stage == first_stage[rank]:
                    charge[rank] += rank_footprint[rank]
                    in_flight[rank] += 1
                if stage < num_stages - 1:
                    push(end + delay_f[stage + 1])
            elif action.op is Op.W:
                end = now + costs.w[stage]
                pending_w[rank].popleft()
                charge[rank] -= kept[stage]
            else:
                end = now + backward_time[stage]
                b_end[stage][microbatch] = end
                while lowest_b[stage] < m and b_end[stage][lowest_b[stage]] < inf:
                    lowest_b[stage] += 1
                if split:
                    charge[rank] -= footprint[stage] - kept[stage]
                    pending_w[rank].append((stage, microbatch))
                else:
                    charge[rank] -= footprint[stage]
                if stage == first_stage[rank]:
                    in_flight[rank] -= 1
                if stage:
                    push(end + delay_b[stage - 1])
            rows[rank].append(action)
            free_at[rank] = end
            push(end)
            remaining -= 1
    return rows


# -- scoring and local search --------------------------------------------------------------------


@dataclass(frozen=True)
class _Scored:
    rows: tuple[tuple[Action, ...], ...]
    makespan: float
    peak: tuple[int, ...]
    bubble_fraction: float
    waited: tuple[tuple[Action, ...], ...]
    """Per rank, the actions the rank sat idle before (waiting for their input)."""

    def beats(self, other: _Scored) -> bool:
        margin = _TOLERANCE * max(1.0, other.makespan)
        if self.makespan < other.makespan - margin:
            return True
        return self.makespan <= other.makespan + margin and max(self.peak) < max(other.peak)


class _Evaluator:
    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        self.count = 0
        # Many list-scheduler settings produce the same orders; each is simulated once.
        self._seen: dict[tuple[tuple[Action, ...], ...], _Scored | None] = {}

    def schedule(self, rows: tuple[tuple[Action, ...], ...]) -> Schedule:
        problem = self.problem
        return Schedule(
            name="auto",
            num_ranks=problem.num_ranks,
            num_stages=problem.num_stages,
            num_microbatches=problem.num_microbatches,
            placement=problem.placement,
            actions=rows,
        )

    def score(self, rows: tuple[tuple[Action, ...], ...]) -> _Scored | None:
        """The simulated makespan and peak, or None if `rows` deadlock or break the cap."""
        if rows not in self._seen:
            self._seen[rows] = self._simulate(rows)
        return self._seen[rows]

    def _simulate(self, rows: tuple[tuple[Action, ...], ...]) -> _Scored | None:
        from pipefold.simulate.engine import simulate  # see [Note: scoring by simulation]

        self.count += 1
        try:
            timeline = simulate(self.schedule(rows), self.problem.memory_costs)
        except ScheduleError:
            return None
        peak = timeline.activation_bytes_peak
        if max(peak) > self.problem.cap:
            return None
        waited = tuple(tuple(wait.waiting_for for wait in row) for row in timeline.waits)
        return _Scored(rows, timeline.makespan, peak, timeline.bubble_fraction, waited)


# How far ahead in a rank's order the search looks for an action to pull into an idle gap:
# beyond a few positions the pulled action almost always depends on one it would overtake.
_PULL_WINDOW = 8


def _moves(best: _Scored) -> Iterator[tuple[int, tuple[Action, ...]]]:
    """(rank, new row) one move from `best`, the likeliest first.

    First pull a later action into each gap where a rank waits (a W into the gap is the
    ZB paper's W filling; a forward there runs ahead of a slow neighbour), then swap
    adjacent actions or fuse an adjacent I, W pair into B.
    """
    for rank, row in enumerate(best.rows):
        position_of = {action: position for position, action in enumerate(row)}
        for waited in best.waited[rank]:
            gap = position_of[waited]
            overtaken: set[tuple[int, int]] = set()
            for position in range(gap, min(len(row) - 1, gap + _PULL_WINDOW)):
                overtaken.add((row[position].stage, row[position].microbatch))
                pulled = row[position + 1]
                if (pulled.stage, pulled.microbatch) not in overtaken:
                    yield rank, row[:gap] + (pulled,) + row[gap : position + 1] + row[position + 2 :]
    for rank, row in enumerate(best.rows):
        for position in range(len(row) - 1):
            for moved in _neighbours(row, position):
                yield rank, moved


def _neighbours(row: tuple[Action, ...], position: int) -> list[tuple[Action, ...]]:
    """Rows one local move away at `position`: swap it with the next action, or fuse I, W into B."""
    first, second = row[position], row[position + 1]
    found = []
    same_work = (first.stage, first.microbatch) == (second.stage, second.microbatch)
    if first.op is Op.I and second.op is Op.W and same_work:
        fused = Action(Op.B, first.stage, first.microbatch)
        found.append(row[:position] + (fused,) + row[position + 2 :])
    # Same (stage, micro-batch) actions depend on each other; two W's or two forwards of one
    # stage swap to the same timing (or only reorder micro-batches), so they are not tried.
    pointless = (first.op is Op.W and second.op is Op.W) or (
        first.op is Op.F and second.op is Op.F and first.stage == second.stage
    )
    if not same_work and not pointless:
        found.append(row[:position] + (second, first) + row[position + 2 :])
    return found


def _local_search(evaluator: _Evaluator, start: _Scored, deadline: float) -> tuple[_Scored, int]:
    """First-improvement hill climbing over `_moves` until none improves or time is up.

    Every kept move strictly lowers (makespan, peak), so the climb ends without a deadline too.
    """
    best, moves = start, 0
    while True:
        for rank, row in _moves(best):
            if time.perf_counter() > deadline:
                return best, moves
            trial = evaluator.score(best.rows[:rank] + (row,) + best.rows[rank + 1 :])
            if trial is not None and trial.beats(best):
                best, moves = trial, moves + 1
                break
        else:
            return best, moves


# -- entry points ------------------------------------------------------------------------------


def layout_of(placement: tuple[int, ...], num_ranks: int, num_virtual: int) -> Placement | None:
    """The search's name for a stage placement ("contiguous", "looped", "v"), or None for a
    placement it does not search."""
    if num_virtual == 1:
        return "contiguous" if tuple(placement) == contiguous_placement(num_ranks) else None
    if tuple(placement) == v_placement(num_ranks, num_virtual):
        return "v"
    if tuple(placement) == looped_placement(num_ranks, num_virtual):
        return "looped"
    return None


def _placement_of(placement: str, num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    if placement not in _PLACEMENTS:
        raise ScheduleError(f"placement={placement!r}; use one of {', '.join(map(repr, _PLACEMENTS))}")
    if placement == "contiguous":
        if num_virtual != 1:
            raise ScheduleError(
                f"placement='contiguous' holds one stage per rank; got num_virtual={num_virtual}. "
                "Use placement='looped' or 'v' for several stages per rank"
            )
        return contiguous_placement(num_ranks)
    if placement == "looped":
        return looped_placement(num_ranks, num_virtual)
    return v_placement(num_ranks, num_virtual)


def _memory_costs(costs: CostModel) -> tuple[CostModel, str]:
    if any(costs.activation_bytes) or any(costs.weight_grad_bytes):
        return costs, "bytes"
    ones = (1,) * costs.num_stages
    return replace(costs, activation_bytes=ones, weight_grad_bytes=ones), "stage micro-batches"


def _family_candidates(
    memory_costs: CostModel, num_ranks: int, num_microbatches: int, num_virtual: int
) -> list[tuple[Schedule, Candidate]]:
    """Every flush family buildable with these parameters, simulated (fits is filled in later)."""
    from pipefold.simulate.engine import simulate  # see [Note: scoring by simulation]

    found = []
    for name in names():
        try:
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             num_virtual=num_virtual)
        except ScheduleError:
            continue  # not legal here (e.g. zb-v needs two stages per rank)
        if schedule.weight_update is not WeightUpdate.FLUSH:
            continue
        timeline = simulate(schedule, memory_costs)
        found.append((schedule, Candidate(
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
) -> ScheduleSearch:
    """Search a flush schedule for `costs` (see [Note: automatic schedules]) and report how.

    `memory_limit` is per rank, in bytes as `simulate` counts activation memory, or, when
    `costs` gives no sizes, in (stage, micro-batch) pairs held from F to W/B; None means
    1F1B's peak. `split_backward=False` uses only whole backwards (B); with True the
    result may still hold B where fusing I and W was faster. `time_budget_s` bounds the
    whole search, except that the list-scheduler runs always finish; the local search
    stops when it is spent, so a result found under a tight budget can depend on the
    machine's speed. Raises ScheduleError for a cap below one micro-batch per rank or a
    bad placement, CostModelError if `costs` has not num_ranks x num_virtual stages.
    """
    if num_ranks < 1 or num_microbatches < 1 or num_virtual < 1:
        raise ScheduleError(
            f"num_ranks={num_ranks}, num_microbatches={num_microbatches}, num_virtual={num_virtual}: "
            "each must be >= 1"
        )
    target = _placement_of(placement, num_ranks, num_virtual)
    if costs.num_stages != len(target):
        raise CostModelError(
            f"cost model has num_stages={costs.num_stages} but {num_ranks} ranks x {num_virtual} stages "
            f"per rank make {len(target)}; give one entry per (virtual) stage"
        )
    if not time_budget_s >= 0:
        raise ScheduleError(f"time_budget_s={time_budget_s!r}; give a number of seconds >= 0")
    deadline = time.perf_counter() + time_budget_s
    memory_costs, unit = _memory_costs(costs)
    families = _family_candidates(memory_costs, num_ranks, num_microbatches, num_virtual)

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
    problem = _Problem(num_ranks, num_microbatches, target, costs, memory_costs, cap)
    baselines = tuple(sorted(
        (replace(c, fits=c.peak_memory <= cap) for _, c in families),
        key=lambda c: (c.makespan, c.peak_memory),
    ))

    evaluator = _Evaluator(problem)
    starts: list[tuple[str, _Scored]] = []
    splits = (True, False) if split_backward else (False,)
    one_stage = num_virtual == 1
    for split, weight_pass, warmup, forward_first, forward_yields, deep_first in product(
        splits,
        tuple(_WeightPass),
        tuple(_Warmup) if one_stage else (_Warmup.MEMORY,),
        (False, True),
        (False, True),
        (True,) if one_stage else (True, False),
    ):
        if (not split and weight_pass is not _WeightPass.LAST) or not problem.admits(split):
            continue  # without W the weight-pass switch means nothing
        policy = _Policy(split, weight_pass, warmup, forward_first, forward_yields, deep_first)
        rows = _list_schedule(problem, policy)
        scored = evaluator.score(tuple(tuple(row) for row in rows))
        if scored is not None:
            starts.append((policy.describe(), scored))
    if include_families:
        for schedule, candidate in families:
            uses_split = any(a.op is Op.I for _, _, a in schedule.iter_actions())
            if schedule.placement != target or (uses_split and not split_backward):
                continue
            scored = evaluator.score(schedule.actions)
            if scored is not None:
                starts.append((f"family {candidate.name}", scored))
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
    best, moves = _local_search(evaluator, best, deadline)
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
    save it with `pipefold.schedule.io.save` and load it where it runs.
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
