"""Family orders as integer arrays, generated without `Action` objects, for the planner at scale.

What the planner needs of a family order it times (which backward it runs, each rank's held
counts, the compiled dependency graph) is per rank its kinds, stages and micro-batches in order.
At 64 ranks x 512 micro-batches a family's `Schedule` is hundreds of thousands of `Action`
objects, and creating them was most of a search's time; the flush families are generated here
straight into numpy arrays, with the same order as their `generate` (tests/plan/test_fast_orders.py
checks every one against it over ranks, micro-batches and virtual stages):

    order = fast_order("interleaved-1f1b", num_ranks=64, num_microbatches=512, num_virtual=2)
    kinds, stages, microbatches = order.rows[rank]     # KIND_F, KIND_B, ... per action

`order_of(schedule)` converts any other schedule (the families without a generator here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipefold.schedule.families._v_greedy import greedy_v_order
from pipefold.schedule.families.interleaved_1f1b import microbatch_groups
from pipefold.schedule.families.v_half import memory_cap as v_half_cap
from pipefold.schedule.families.v_min import memory_cap as v_min_cap
from pipefold.schedule.ir import (
    Schedule,
    WeightUpdate,
    contiguous_placement,
    looped_placement,
    v_placement,
)
from pipefold.simulate.compiled import KINDS, rows_of

__all__ = [
    "Order", "order_of", "fast_order", "fast_placement", "fast_families", "sorted_unique",
    "KIND_F", "KIND_B", "KIND_I", "KIND_W", "KIND_STEP", "OP_OF_KIND",
]

KIND_F, KIND_B, KIND_I, KIND_W, KIND_STEP = range(5)
OP_OF_KIND = KINDS

Row = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One rank's order: kinds, stages, micro-batches (int64 arrays of one length)."""


@dataclass(frozen=True, eq=False)
class Order:
    """A schedule's compute order per rank as integer arrays (see the module docstring)."""

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    placement: tuple[int, ...]
    rows: tuple[Row, ...]
    weight_update: WeightUpdate = WeightUpdate.FLUSH

    def shell(self) -> Schedule:
        """The schedule's header without its actions (what cost-model checks read)."""
        return Schedule(self.name, self.num_ranks, self.num_stages, self.num_microbatches, self.placement,
                        ((),) * self.num_ranks, self.weight_update)

    def kinds_used(self) -> set[int]:
        return {int(kind) for kinds, _, _ in self.rows for kind in np.flatnonzero(np.bincount(kinds))}


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` of a 1-d integer array, by one sort: numpy's own (a hash table since numpy
    2.3) takes 5-25x longer on the planner's arrays of a few thousand integers."""
    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def order_of(schedule: Schedule) -> Order:
    """`schedule`'s compute actions as an `Order`; refuses sharding actions."""
    rows = [_row(*row) for row in rows_of(schedule)]
    return Order(schedule.name, schedule.num_ranks, schedule.num_stages, schedule.num_microbatches,
                 schedule.placement, tuple(rows), schedule.weight_update)


def _row(kinds: object, stages: object, microbatches: object) -> Row:
    return (np.asarray(kinds, dtype=np.int64).reshape(-1), np.asarray(stages, dtype=np.int64).reshape(-1),
            np.asarray(microbatches, dtype=np.int64).reshape(-1))


def _blocks(kinds: np.ndarray, stages: np.ndarray, microbatches: np.ndarray, keep: np.ndarray) -> Row:
    """Equal-shaped (steps, slots) tables read row by row, the slots not kept left out."""
    mask = keep.reshape(-1)
    return (kinds.reshape(-1)[mask].astype(np.int64), stages.reshape(-1)[mask].astype(np.int64),
            microbatches.reshape(-1)[mask].astype(np.int64))


def _concat(*rows: Row) -> Row:
    return (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]),
            np.concatenate([r[2] for r in rows]))


def _run(kind: int, stage: int | np.ndarray, microbatches: np.ndarray) -> Row:
    size = len(microbatches)
    return (np.full(size, kind, dtype=np.int64),
            np.broadcast_to(np.asarray(stage, dtype=np.int64), (size,)).copy(),
            microbatches.astype(np.int64))


# -- the families ---------------------------------------------------------------------------


def _one_f_one_b_row(num_ranks: int, num_microbatches: int, rank: int) -> Row:
    m = num_microbatches
    warmup = min(num_ranks - rank - 1, m)
    steady = np.arange(m - warmup)
    middle = _blocks(np.tile([KIND_F, KIND_B], (len(steady), 1)), np.full((len(steady), 2), rank),
                     np.stack([steady + warmup, steady], axis=1), np.ones((len(steady), 2), dtype=bool))
    return _concat(_run(KIND_F, rank, np.arange(warmup)), middle,
                   _run(KIND_B, rank, np.arange(m - warmup, m)))


def _one_f_one_b(
    num_ranks: int, num_microbatches: int, num_virtual: int
) -> tuple[tuple[int, ...], list[Row]]:
    return contiguous_placement(num_ranks), [_one_f_one_b_row(num_ranks, num_microbatches, r)
                                            for r in range(num_ranks)]


def _interleaved(
    num_ranks: int, num_microbatches: int, num_virtual: int
) -> tuple[tuple[int, ...], list[Row]]:
    p, v = num_ranks, num_virtual
    placement = looped_placement(p, v)
    if v == 1:
        return placement, _one_f_one_b(p, num_microbatches, 1)[1]
    per_round, padded = microbatch_groups(p, num_microbatches)
    num_ops = v * padded
    ops = np.arange(num_ops)
    # The k-th forward (backward) of a rank: its local stage and micro-batch, as `counted` numbers them.
    local_f = (ops // per_round) % v
    local_b = v - 1 - local_f
    mb = (ops // (per_round * v)) * per_round + ops % per_round
    rows = []
    for rank in range(p):
        warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), num_ops)
        steady = np.arange(num_ops - warmup)
        f_at, b_at = steady + warmup, steady
        middle_stages = np.stack([local_f[f_at], local_b[b_at]], axis=1) * p + rank
        middle_mbs = np.stack([mb[f_at], mb[b_at]], axis=1)
        middle_kinds = np.tile([KIND_F, KIND_B], (len(steady), 1))
        head = (np.full(warmup, KIND_F), local_f[:warmup] * p + rank, mb[:warmup])
        tail_at = np.arange(num_ops - warmup, num_ops)
        tail = (np.full(warmup, KIND_B), local_b[tail_at] * p + rank, mb[tail_at])
        kinds = np.concatenate([head[0], middle_kinds.reshape(-1), tail[0]])
        stages = np.concatenate([head[1], middle_stages.reshape(-1), tail[1]])
        mbs = np.concatenate([head[2], middle_mbs.reshape(-1), tail[2]])
        keep = mbs < num_microbatches
        rows.append(_row(kinds[keep], stages[keep], mbs[keep]))
    return placement, rows


def _gpipe(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    every = np.arange(num_microbatches)
    return contiguous_placement(num_ranks), [
        _concat(_run(KIND_F, rank, every), _run(KIND_B, rank, every)) for rank in range(num_ranks)]


def _looped_bfs(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    m = num_microbatches
    rows = []
    for rank in range(num_ranks):
        stages = np.arange(rank, num_ranks * num_virtual, num_ranks)
        forwards = _run(KIND_F, np.repeat(stages, m), np.tile(np.arange(m), len(stages)))
        backwards = _run(KIND_B, np.repeat(stages[::-1], m), np.tile(np.arange(m)[::-1], len(stages)))
        rows.append(_concat(forwards, backwards))
    return looped_placement(num_ranks, num_virtual), rows


def _zero_bubble_row(num_microbatches: int, rank: int, warmup: int, deferred: int, slots: tuple[int, int, int]
                     ) -> Row:
    """Warm-up forwards, then per micro-batch its F (of micro-batch + warm-up), I and W (of micro-batch
    - deferred) in the order `slots` gives their columns, then the W's left."""
    m = num_microbatches
    mb = np.arange(m)
    columns = {KIND_F: (mb + warmup, mb + warmup < m), KIND_I: (mb, np.ones(m, dtype=bool)),
               KIND_W: (mb - deferred, mb >= deferred)}
    kinds = np.tile(np.array(slots), (m, 1))
    mbs = np.stack([columns[kind][0] for kind in slots], axis=1)
    keep = np.stack([columns[kind][1] for kind in slots], axis=1)
    middle = _blocks(kinds, np.full((m, 3), rank), mbs, keep)
    return _concat(_run(KIND_F, rank, np.arange(warmup)), middle,
                   _run(KIND_W, rank, np.arange(max(0, m - deferred), m)))


def _zb_h1(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    return contiguous_placement(num_ranks), [
        _zero_bubble_row(num_microbatches, rank, min(num_ranks - 1 - rank, num_microbatches), rank,
                         (KIND_F, KIND_I, KIND_W)) for rank in range(num_ranks)]


def _zb_h2(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    m = num_microbatches
    return contiguous_placement(num_ranks), [
        _zero_bubble_row(m, rank, min(2 * (num_ranks - 1 - rank) + 1, m),
                         2 * rank if m >= 2 * num_ranks - 1 else rank, (KIND_I, KIND_W, KIND_F))
        for rank in range(num_ranks)]


def _running_counts(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per entry, how many entries of its group came before it (groups numbered from 0)."""
    order = np.argsort(groups, kind="stable")
    sizes = np.bincount(groups, minlength=num_groups)
    counts = np.empty(len(groups), dtype=np.int64)
    counts[order] = np.arange(len(groups), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return counts


def _repeated(*parts: tuple[list[int], int]) -> np.ndarray:
    """The concatenation of each pattern repeated its count of times (a count below 0 as 0)."""
    return np.concatenate([np.tile(np.array(pattern, dtype=np.int64), max(count, 0))
                           for pattern, count in parts])


def _zb_v_row(num_ranks: int, num_microbatches: int, rank: int) -> Row:
    """`zb_v.rank_order` (m >= 2p-1) built from its phases' repeated patterns, each (kind, which of
    the rank's two stages) numbered in emission order: the same order without a Python call per action."""
    p, m, r = num_ranks, num_microbatches, rank
    f0, f1, i0, i1 = 2 * KIND_F, 2 * KIND_F + 1, 2 * KIND_I, 2 * KIND_I + 1
    w0, w1 = 2 * KIND_W, 2 * KIND_W + 1
    # Warm-up; then the steady state's m - p rounds, the first m - (2p - r - 1) with a forward down
    # (until m have gone down); then the cool-down, whose last W's (r per stage) come after every I.
    coded = _repeated(([f0], 2 * (p - r) - 1), ([f1, f0], r), ([f1, i1, w1], p - r),
                      ([f0, i0, w0, f1, i1, w1], m - (2 * p - r - 1)), ([i0, w0, f1, i1, w1], p - r - 1),
                      ([i0, i1], r), ([i0, w0], p - r), ([w1], r), ([w0], r))
    which = coded & 1
    return coded >> 1, np.where(which == 1, 2 * p - 1 - r, r), _running_counts(coded, 2 * (KIND_W + 1))


def _zb_v(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    padded = max(num_microbatches, 2 * num_ranks - 1)
    rows = []
    for rank in range(num_ranks):
        kinds, stages, mbs = _zb_v_row(num_ranks, padded, rank)
        keep = mbs < num_microbatches
        rows.append((kinds[keep], stages[keep], mbs[keep]))
    return v_placement(num_ranks, 2), rows


def _naive(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    m = num_microbatches
    every = np.arange(m)
    return contiguous_placement(num_ranks), [
        _blocks(np.tile([KIND_F, KIND_B], (m, 1)), np.full((m, 2), rank), np.stack([every, every], axis=1),
                np.ones((m, 2), dtype=bool)) for rank in range(num_ranks)]


def _dualpipe_v_row(num_ranks: int, num_microbatches: int, rank: int) -> Row:
    """`dualpipe_v.rank_order` (m >= 2p) built from its phases' repeated patterns: forwards numbered
    per stage, B and I sharing one count per stage (two ways of running one backward), and the k-th
    W taking the k-th I's stage and micro-batch (the builder's queue of pending weights)."""
    p, m, r = num_ranks, num_microbatches, rank
    # Codes kind * 2 + which (0: the stage down, 1: up); a W's which is filled in from its I.
    f0, f1, b0, b1 = 2 * KIND_F, 2 * KIND_F + 1, 2 * KIND_B, 2 * KIND_B + 1
    i0, i1, w = 2 * KIND_I, 2 * KIND_I + 1, 2 * KIND_W
    # The cool-down, as `rank_order` runs it: the second half of the backwards split, W's where pending.
    tail: list[int] = []
    pending = 0
    split = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        tail.append(i1 if split else b1)
        pending += split
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        tail.append(i0 if split else b0)
        pending += split
    for _ in range(p - r - 1):
        if pending:
            tail.append(w)
            pending -= 1
        tail.append(i0 if split else b0)
        pending += split
    tail += [w] * min(pending, r + 1)
    coded = _repeated(([f0], 2 * (p - r - 1)), ([f0, f1], r + 1), ([i1, w, f1], p - r - 1),
                      ([f0, b1, f1, b0], m - 2 * p + r + 1), ([b1, f1, b0], p - r - 1), (tail, 1))
    kinds = coded >> 1
    which = coded & 1
    # One count per (F or backward, stage): I's counted with B's; W's apart (numbered below).
    group = np.select([kinds == KIND_F, kinds == KIND_W], [which, 4], 2 + which)
    microbatches = _running_counts(group, 5)
    stages = np.where(which == 1, 2 * p - 1 - r, r)
    weights, inputs = np.flatnonzero(kinds == KIND_W), np.flatnonzero(kinds == KIND_I)
    stages[weights] = stages[inputs[:len(weights)]]
    microbatches[weights] = microbatches[inputs[:len(weights)]]
    return kinds, stages, microbatches


def _dualpipe_v(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    padded = max(num_microbatches, 2 * num_ranks)
    rows = []
    for rank in range(num_ranks):
        kinds, stages, mbs = _dualpipe_v_row(num_ranks, padded, rank)
        keep = mbs < num_microbatches
        rows.append((kinds[keep], stages[keep], mbs[keep]))
    return v_placement(num_ranks, 2), rows


def _greedy_v(num_ranks: int, num_microbatches: int, cap: int) -> list[Row]:
    return [_row(*row) for row in greedy_v_order(num_ranks, num_microbatches, cap)]


def _v_min(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    return v_placement(num_ranks, 2), _greedy_v(num_ranks, num_microbatches, v_min_cap(num_ranks))


def _v_half(num_ranks: int, num_microbatches: int, num_virtual: int) -> tuple[tuple[int, ...], list[Row]]:
    return v_placement(num_ranks, 2), _greedy_v(num_ranks, num_microbatches, v_half_cap(num_ranks))


_GENERATORS: dict[str, Callable[[int, int, int], tuple[tuple[int, ...], list[Row]]]] = {
    "1f1b": _one_f_one_b,
    "interleaved-1f1b": _interleaved,
    "gpipe": _gpipe,
    "looped-bfs": _looped_bfs,
    "zb-h1": _zb_h1,
    "zb-h2": _zb_h2,
    "zb-v": _zb_v,
    "v-min": _v_min,
    "v-half": _v_half,
    "naive": _naive,
    "dualpipe-v": _dualpipe_v,
}
"""The flush families generated here; `family(name).check` has refused bad sizes before."""


def _contiguous(num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    return contiguous_placement(num_ranks)


def _v(num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    return v_placement(num_ranks, 2)


_PLACEMENTS: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "1f1b": _contiguous, "interleaved-1f1b": looped_placement, "gpipe": _contiguous,
    "looped-bfs": looped_placement, "zb-h1": _contiguous, "zb-h2": _contiguous, "zb-v": _v, "v-min": _v,
    "v-half": _v, "naive": _contiguous, "dualpipe-v": _v,
}
"""Each family's stage -> rank placement, as its generator above gives it (without generating)."""


def fast_placement(name: str, num_ranks: int, num_virtual: int) -> tuple[int, ...] | None:
    """`fast_order(name, ...).placement` without the order (the V families' one-micro-batch orders
    are padded to 2p, so generating one to read its placement is not free); None as `fast_order`."""
    placement = _PLACEMENTS.get(name)
    return None if placement is None else placement(num_ranks, num_virtual)


def fast_order(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Order | None:
    """The family's order generated as arrays; None for a family without a generator here."""
    generate = _GENERATORS.get(name)
    if generate is None:
        return None
    placement, rows = generate(num_ranks, num_microbatches, num_virtual)
    return Order(name, num_ranks, len(placement), num_microbatches, placement, tuple(rows))


def fast_families() -> tuple[str, ...]:
    """The families `fast_order` generates."""
    return tuple(_GENERATORS)

