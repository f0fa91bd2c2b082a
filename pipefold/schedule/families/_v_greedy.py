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
    num_mb = num_microbatches
    never = 1 << 62
    # Per (stage, micro-batch) at index stage * num_mb + mb, the time its F (its I) result is
    # available, in flat lists: building and hashing keys for every probe dominated at 64 ranks.
    f_done = [never] * (num_stages * num_mb)
    i_done = [never] * (num_stages * num_mb)
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    next_f = [0] * num_stages
    next_i = [0] * num_stages
    pending_w: list[deque[Action]] = [deque() for _ in range(num_ranks)]
    held = [0] * num_ranks
    reserved = [0] * num_ranks
    remaining = 3 * num_stages * num_microbatches
    last = num_stages - 1
    f_op, i_op, w_op = Op.F, Op.I, Op.W

    def input_grad_ready(stage: int, mb: int, now: int) -> bool:
        if mb >= num_mb or f_done[stage * num_mb + mb] > now:
            return False
        return stage == last or i_done[(stage + 1) * num_mb + mb] <= now

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
            # An I first: the earliest micro-batch, then the later stage (up > down).
            mb_down, mb_up = next_i[down], next_i[up]
            ready_down = input_grad_ready(down, mb_down, now)
            ready_up = input_grad_ready(up, mb_up, now)
            if ready_down or ready_up:
                stage = down if ready_down and (not ready_up or mb_down < mb_up) else up
                mb = mb_down if stage == down else mb_up
                rows[rank].append(Action(i_op, stage, mb))
                i_done[stage * num_mb + mb] = now + 1
                next_i[stage] += 1
                pending_w[rank].append(Action(w_op, stage, mb))
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
                        rows[rank].append(pending_w[rank].popleft())
                        held[rank] -= 1
                        last_busy = now + 1
                        remaining -= 1
                        continue
                    else:
                        continue
                rows[rank].append(Action(f_op, stage, mb))
                f_done[stage * num_mb + mb] = now + 1
                next_f[stage] += 1
                held[rank] += 1
                reserved[rank] += 1 if stage == down else -1
            last_busy = now + 1
            remaining -= 1
        now += 1
    return rows
