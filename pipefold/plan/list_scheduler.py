"""The greedy list scheduler behind `search_schedule`: per-rank orders from real costs.

`list_schedule(problem, policy)` plays the pipeline forward in time and, whenever a rank
is idle, picks among the ready actions by the switches of `Policy`; `Problem` holds the
costs, the placement and the memory cap it admits micro-batches under. The rules, and
why the scheduler never stalls, are in docs/decisions.md, "Automatic schedules".
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op
from pipefold.simulate.costs import CostModel

__all__ = ["Policy", "Problem", "Warmup", "WeightPass", "list_schedule"]


class WeightPass(Enum):
    LAST = "last"
    """Lowest priority: whenever nothing else can run."""
    GAP = "gap"
    """Only if no known arrival falls inside it, or a forward is blocked by memory."""
    EAGER = "eager"
    """Right after its I (the lowest memory a split backward allows)."""


class Warmup(Enum):
    MEMORY = "memory"
    """As many micro-batches in flight as the cap admits."""
    ONE_F_ONE_B = "1f1b"
    """At most p-r micro-batches between F and backward on rank r (one stage per rank)."""
    ZB_H2 = "zb-h2"
    """At most 2(p-r)-1, ZB-H2's warm-up (one stage per rank)."""


@dataclass(frozen=True)
class Policy:
    """One setting of the list scheduler's switches (see docs/decisions.md, "Automatic schedules")."""

    split: bool
    weight_pass: WeightPass
    warmup: Warmup
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
class Problem:
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
        """The charge of one micro-batch on `stage` (docs/decisions.md, "Automatic schedules")."""
        held = self.memory_costs.activation_bytes[stage]
        return max(held, self.memory_costs.weight_grad_bytes[stage]) if split else held

    def rank_footprint(self, rank: int, split: bool) -> int:
        return sum(self.footprint(stage, split) for stage in self.stages_of(rank))

    def admits(self, split: bool) -> bool:
        return all(self.rank_footprint(rank, split) <= self.cap for rank in range(self.num_ranks))


def list_schedule(
    problem: Problem, policy: Policy, deadline: float = math.inf
) -> list[list[Action]] | None:
    """Per-rank orders from one run of the list scheduler under `policy`; None once
    `time.perf_counter()` passes `deadline` (a budget the caller must keep).

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
    if policy.warmup is Warmup.ONE_F_ONE_B:
        in_flight_limit = [p - rank for rank in range(p)]
    elif policy.warmup is Warmup.ZB_H2:
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
        if policy.weight_pass is WeightPass.EAGER and pending_w[rank]:
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
            if policy.weight_pass is WeightPass.GAP and gap_too_short and not memory_blocked:
                return None  # idle until the arrival: a W now would delay it
            return Action(Op.W, stage, microbatch)
        return None

    checked = 0
    while remaining:
        checked += 1
        # Checked every so often, not every event: the clock costs more than an event's work.
        if checked % 256 == 0 and time.perf_counter() > deadline:
            return None
        if not events:
            # Unreachable when problem.admits(policy.split) (docs/decisions.md, "Automatic
            # schedules"); loud beats a bad schedule.
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
