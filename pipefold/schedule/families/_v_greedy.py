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
    # A stage's F's (and I's) are emitted in micro-batch order, so "its micro-batch j is done by
    # now" is "j < how many it had emitted before this step": per stage at index stage + 1 those
    # counts, and a copy taken at each step's start is what every rank sees during it (what one
    # rank does now is seen by the others only from the next step). Index 0 is the forward from
    # below the first stage and index num_stages + 1 the gradient from above the last, available at
    # once; no count passes num_mb, so the micro-batch after the last is never ready.
    done_f = [0] * (num_stages + 2)
    done_i = [0] * (num_stages + 2)
    done_f[0] = num_mb
    done_i[num_stages + 1] = num_mb
    width = num_mb + 1
    last = num_stages - 1
    # Per rank: the indices of its stages down and up, where their slots (stage * width + mb) begin,
    # its actions as codes slot * 4 + kind (one append each), and the slots of its I's whose W is
    # still to run.
    codes: list[list[int]] = [[] for _ in range(num_ranks)]
    pending_w: list[deque[int]] = [deque() for _ in range(num_ranks)]
    lanes = [(rank, rank + 1, last - rank + 1, rank * width, (last - rank) * width, codes[rank].append,
              pending_w[rank]) for rank in range(num_ranks)]
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
        seen_f = done_f[:]
        seen_i = done_i[:]
        for rank, down, up, down_at, up_at, emit, pending in lanes:
            # An I first (the earliest micro-batch, then the later stage: up > down), where the stage's
            # next one has its forward and the gradient from the stage above.
            mb_down, mb_up = done_i[down], done_i[up]
            ready_down = mb_down < seen_f[down] and mb_down < seen_i[down + 1]
            ready_up = mb_up < seen_f[up] and mb_up < seen_i[up + 1]
            if ready_down or ready_up:
                if ready_down and (not ready_up or mb_down < mb_up):
                    slot = down_at + mb_down
                    done_i[down] = mb_down + 1
                else:
                    slot = up_at + mb_up
                    done_i[up] = mb_up + 1
                emit(slot * 4 + KIND_I)
                pending.append(slot)
            else:
                mb = done_f[up]
                if mb < seen_f[up - 1]:
                    slot = up_at + mb
                    done_f[up] = mb + 1
                    reserved[rank] -= 1
                else:
                    mb = done_f[down]
                    if mb < seen_f[down - 1] and held[rank] + reserved[rank] + 2 <= cap:
                        slot = down_at + mb
                        done_f[down] = mb + 1
                        reserved[rank] += 1
                    elif pending:
                        emit(pending.popleft() * 4 + KIND_W)
                        held[rank] -= 1
                        last_busy = soon
                        remaining -= 1
                        continue
                    else:
                        continue
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
