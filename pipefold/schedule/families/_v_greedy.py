"""A memory-capped greedy list scheduler over a V placement (two stages per rank).

It derives the V schedules of Qi et al. (2024) whose memory is a chosen fraction of
1F1B's, and cannot stall for any cap of one micro-batch or more (docs/decisions.md,
"Controllable-memory V schedules").
"""

from __future__ import annotations

from collections import deque

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op

__all__ = ["greedy_v_rows"]


def greedy_v_rows(num_ranks: int, num_microbatches: int, cap: int) -> list[list[Action]]:
    """Per-rank compute orders under the policy of docs/decisions.md, "Controllable-memory V schedules"."""
    if cap < 2:
        raise ScheduleError(
            f"a V schedule needs a memory cap of at least 2 stage-chunks (one micro-batch's "
            f"down and up chunk); got cap={cap}"
        )
    num_stages = 2 * num_ranks
    finished: dict[Action, int] = {}  # action -> time its result is available
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    busy_until = [0] * num_ranks
    next_f = [0] * num_stages
    next_i = [0] * num_stages
    pending_w: list[deque[Action]] = [deque() for _ in range(num_ranks)]
    held = [0] * num_ranks
    reserved = [0] * num_ranks
    remaining = 3 * num_stages * num_microbatches

    def ready(action: Action, now: int) -> bool:
        stage, mb = action.stage, action.microbatch
        if mb >= num_microbatches:
            return False
        if action.op is Op.F:
            needed = [Action(Op.F, stage - 1, mb)] if stage > 0 else []
        else:
            needed = [Action(Op.F, stage, mb)]
            if stage < num_stages - 1:
                needed.append(Action(Op.I, stage + 1, mb))
        return all(finished.get(a, now + 1) <= now for a in needed)

    def pick(rank: int, now: int) -> Action | None:
        down, up = rank, num_stages - 1 - rank
        inputs = [Action(Op.I, s, next_i[s]) for s in (down, up) if ready(Action(Op.I, s, next_i[s]), now)]
        if inputs:
            return min(inputs, key=lambda a: (a.microbatch, -a.stage))
        if ready(Action(Op.F, up, next_f[up]), now):
            return Action(Op.F, up, next_f[up])
        if ready(Action(Op.F, down, next_f[down]), now) and held[rank] + reserved[rank] + 2 <= cap:
            return Action(Op.F, down, next_f[down])
        return pending_w[rank][0] if pending_w[rank] else None

    now = 0
    while remaining:
        if now > max(busy_until) + 1:
            # Unreachable for cap >= 2 (see the note); a loud stop beats spinning forever.
            raise ScheduleError(f"greedy V scheduler stalled at time {now} with cap={cap}")
        for rank in range(num_ranks):
            if busy_until[rank] > now:
                continue
            action = pick(rank, now)
            if action is None:
                continue
            rows[rank].append(action)
            finished[action] = now + 1
            busy_until[rank] = now + 1
            remaining -= 1
            down = rank
            if action.op is Op.F:
                next_f[action.stage] += 1
                held[rank] += 1
                if action.stage == down:
                    reserved[rank] += 1
                else:
                    reserved[rank] -= 1
            elif action.op is Op.I:
                next_i[action.stage] += 1
                pending_w[rank].append(Action(Op.W, action.stage, action.microbatch))
            else:
                pending_w[rank].popleft()
                held[rank] -= 1
        now += 1
    return rows
