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
    # (0 for F / 1 for I, stage, micro-batch) -> time its result is available. Keyed by plain
    # tuples, not `Action`s: building and hashing actions for every probe dominated at 64 ranks.
    finished: dict[tuple[int, int, int], int] = {}
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    busy_until = [0] * num_ranks
    next_f = [0] * num_stages
    next_i = [0] * num_stages
    pending_w: list[deque[Action]] = [deque() for _ in range(num_ranks)]
    held = [0] * num_ranks
    reserved = [0] * num_ranks
    remaining = 3 * num_stages * num_microbatches
    last = num_stages - 1

    def forward_ready(stage: int, mb: int, now: int) -> bool:
        if mb >= num_microbatches:
            return False
        return stage == 0 or finished.get((0, stage - 1, mb), now + 1) <= now

    def input_grad_ready(stage: int, mb: int, now: int) -> bool:
        if mb >= num_microbatches or finished.get((0, stage, mb), now + 1) > now:
            return False
        return stage == last or finished.get((1, stage + 1, mb), now + 1) <= now

    def pick(rank: int, now: int) -> Action | None:
        down, up = rank, last - rank
        best: tuple[int, int] | None = None  # (micro-batch, -stage): the earliest, then the later stage
        for stage in (down, up):
            mb = next_i[stage]
            if input_grad_ready(stage, mb, now) and (best is None or (mb, -stage) < best):
                best = (mb, -stage)
        if best is not None:
            return Action(Op.I, -best[1], best[0])
        if forward_ready(up, next_f[up], now):
            return Action(Op.F, up, next_f[up])
        if forward_ready(down, next_f[down], now) and held[rank] + reserved[rank] + 2 <= cap:
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
            if action.op is not Op.W:
                finished[(0 if action.op is Op.F else 1, action.stage, action.microbatch)] = now + 1
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
