"""A memory-capped greedy list scheduler over a V placement (two stages per rank).

It derives the V schedules of Qi et al. (2024) whose memory is a chosen fraction of
1F1B's, and cannot stall for any cap of one micro-batch or more (docs/decisions.md,
"Controllable-memory V schedules").
"""

from __future__ import annotations

from collections import deque

from pipefold.errors import ScheduleError
from pipefold.schedule.families._common import KIND_F, KIND_I, KIND_W, IntRow, actions_of
from pipefold.schedule.ir import Action

__all__ = ["greedy_v_rows", "greedy_v_order"]


def greedy_v_rows(num_ranks: int, num_microbatches: int, cap: int) -> list[list[Action]]:
    """Per-rank compute orders under the policy of docs/decisions.md, "Controllable-memory V schedules"."""
    return [actions_of(row) for row in greedy_v_order(num_ranks, num_microbatches, cap)]


def greedy_v_order(num_ranks: int, num_microbatches: int, cap: int) -> list[IntRow]:
    """`greedy_v_rows` as integers (kinds numbered `KIND_F` ...), without `Action` objects."""
    if cap < 2:
        raise ScheduleError(
            f"a V schedule needs a memory cap of at least 2 stage-chunks (one micro-batch's "
            f"down and up chunk); got cap={cap}"
        )
    num_stages = 2 * num_ranks
    num_mb = num_microbatches
    never = 1 << 62
    # Per (stage, micro-batch) at index stage * num_mb + mb, the time its F (its I) result is
    # available, in flat lists: building and hashing keys for every probe dominated at 64 ranks.
    f_done = [never] * (num_stages * num_mb)
    i_done = [never] * (num_stages * num_mb)
    kinds: list[list[int]] = [[] for _ in range(num_ranks)]
    stages: list[list[int]] = [[] for _ in range(num_ranks)]
    mbs: list[list[int]] = [[] for _ in range(num_ranks)]
    next_f = [0] * num_stages
    next_i = [0] * num_stages
    pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(num_ranks)]
    held = [0] * num_ranks
    reserved = [0] * num_ranks
    remaining = 3 * num_stages * num_microbatches
    last = num_stages - 1

    now = 0
    last_busy = 0  # the latest time any rank is busy until (every action takes one step)
    while remaining:
        if now > last_busy + 1:
            # Unreachable for cap >= 2 (see the note); a loud stop beats spinning forever.
            raise ScheduleError(f"greedy V scheduler stalled at time {now} with cap={cap}")
        # A rank's action ends at now + 1, so every rank is free at every step, and what one rank
        # does now is seen by the others only from the next step.
        for rank in range(num_ranks):
            down, up = rank, last - rank
            mb_down, mb_up = next_i[down], next_i[up]
            # An I first (the earliest micro-batch, then the later stage: up > down), where the stage's
            # next one has its forward and the gradient from the stage above.
            ready_down = mb_down < num_mb and f_done[down * num_mb + mb_down] <= now and (
                i_done[(down + 1) * num_mb + mb_down] <= now)
            ready_up = mb_up < num_mb and f_done[up * num_mb + mb_up] <= now and (
                up == last or i_done[(up + 1) * num_mb + mb_up] <= now)
            if ready_down or ready_up:
                stage = down if ready_down and (not ready_up or mb_down < mb_up) else up
                mb = mb_down if stage == down else mb_up
                kinds[rank].append(KIND_I)
                stages[rank].append(stage)
                mbs[rank].append(mb)
                i_done[stage * num_mb + mb] = now + 1
                next_i[stage] += 1
                pending_w[rank].append((stage, mb))
            else:
                mb = next_f[up]
                if mb < num_mb and f_done[(up - 1) * num_mb + mb] <= now:
                    stage = up
                else:
                    mb = next_f[down]
                    if mb < num_mb and (down == 0 or f_done[(down - 1) * num_mb + mb] <= now) and (
                        held[rank] + reserved[rank] + 2 <= cap
                    ):
                        stage = down
                    elif pending_w[rank]:
                        w_stage, w_mb = pending_w[rank].popleft()
                        kinds[rank].append(KIND_W)
                        stages[rank].append(w_stage)
                        mbs[rank].append(w_mb)
                        held[rank] -= 1
                        last_busy = now + 1
                        remaining -= 1
                        continue
                    else:
                        continue
                kinds[rank].append(KIND_F)
                stages[rank].append(stage)
                mbs[rank].append(mb)
                f_done[stage * num_mb + mb] = now + 1
                next_f[stage] += 1
                held[rank] += 1
                reserved[rank] += 1 if stage == down else -1
            last_busy = now + 1
            remaining -= 1
        now += 1
    return list(zip(kinds, stages, mbs, strict=True))
