"""A memory-capped greedy list scheduler over a V placement (two stages per rank).

It derives the V schedules of Qi et al. (2024) whose memory is a chosen fraction of
1F1B's, and cannot stall for any cap of one micro-batch or more (docs/decisions.md,
"Controllable-memory V schedules").
"""

from __future__ import annotations

from collections import deque

import numpy as np

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
    # Per (stage, micro-batch) at slot stage * width + mb, the time its F (its I) result is available,
    # in flat lists (building and hashing keys for every probe dominated at 64 ranks). Each stage has
    # one slot more, never available (the micro-batch after the last), and two rows more: the
    # gradient from above the last stage and the forward from below the first, available at once:
    # so each probe is one comparison.
    width = num_mb + 1
    f_done = [never] * ((num_stages + 2) * width)
    i_done = [never] * ((num_stages + 2) * width)
    i_done[num_stages * width:num_stages * width + num_mb] = [0] * num_mb
    f_done[(num_stages + 1) * width:(num_stages + 1) * width + num_mb] = [0] * num_mb
    last = num_stages - 1
    # Per rank: its stages down and up, where their slots begin, and where the slots of the stages
    # each one waits on begin (a gradient from the stage above, a forward from the stage below).
    # Each rank's actions as codes slot * 4 + kind, one append each, and the slots of its I's whose W
    # is still to run.
    codes: list[list[int]] = [[] for _ in range(num_ranks)]
    pending_w: list[deque[int]] = [deque() for _ in range(num_ranks)]
    lanes = [(rank, rank, last - rank, rank * width, (last - rank) * width, (rank + 1) * width,
              (last - rank + 1) * width, (last - rank - 1) * width, ((rank or num_stages + 2) - 1) * width,
              codes[rank].append, pending_w[rank]) for rank in range(num_ranks)]
    next_f = [0] * num_stages
    next_i = [0] * num_stages
    held = [0] * num_ranks
    reserved = [0] * num_ranks
    remaining = 3 * num_stages * num_microbatches

    now = 0
    last_busy = 0  # the latest time any rank is busy until (every action takes one step)
    while remaining:
        if now > last_busy + 1:
            # Unreachable for cap >= 2 (see the note); a loud stop beats spinning forever.
            raise ScheduleError(f"greedy V scheduler stalled at time {now} with cap={cap}")
        soon = now + 1
        # A rank's action ends at now + 1, so every rank is free at every step, and what one rank
        # does now is seen by the others only from the next step.
        for rank, down, up, down_at, up_at, above_down, above_up, below_up, below_down, emit, pending in lanes:
            # An I first (the earliest micro-batch, then the later stage: up > down), where the stage's
            # next one has its forward and the gradient from the stage above.
            mb_down, mb_up = next_i[down], next_i[up]
            ready_down = f_done[down_at + mb_down] <= now and i_done[above_down + mb_down] <= now
            ready_up = f_done[up_at + mb_up] <= now and i_done[above_up + mb_up] <= now
            if ready_down or ready_up:
                if ready_down and (not ready_up or mb_down < mb_up):
                    slot = down_at + mb_down
                    next_i[down] = mb_down + 1
                else:
                    slot = up_at + mb_up
                    next_i[up] = mb_up + 1
                i_done[slot] = soon
                emit(slot * 4 + KIND_I)
                pending.append(slot)
            else:
                mb = next_f[up]
                if f_done[below_up + mb] <= now:
                    slot = up_at + mb
                    next_f[up] = mb + 1
                    reserved[rank] -= 1
                else:
                    mb = next_f[down]
                    if f_done[below_down + mb] <= now and held[rank] + reserved[rank] + 2 <= cap:
                        slot = down_at + mb
                        next_f[down] = mb + 1
                        reserved[rank] += 1
                    elif pending:
                        emit(pending.popleft() * 4 + KIND_W)
                        held[rank] -= 1
                        last_busy = soon
                        remaining -= 1
                        continue
                    else:
                        continue
                f_done[slot] = soon
                emit(slot * 4 + KIND_F)
                held[rank] += 1
            last_busy = soon
            remaining -= 1
        now = soon
    rows: list[IntRow] = []
    for row in codes:
        coded = np.array(row, dtype=np.int64)
        slots = coded >> 2
        rows.append((coded & 3, slots // width, slots % width))
    return rows
