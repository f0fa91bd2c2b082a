"""The family orders the planner prices, generated once per size and kept (and compiled) for reuse.

    schedule = family_schedule("1f1b", num_ranks, num_microbatches, num_virtual)
    order = family_order("1f1b", num_ranks, num_microbatches, num_virtual)   # integer arrays
    run = compiled_family("1f1b", num_ranks, num_microbatches, num_virtual).run(cost_model)

What the search needs of an order (its backward kind, held counts, compiled graph) is read from
`family_order`, which the flush families generate as arrays without `Action` objects
(`pipefold.plan.fast_orders`); `family_schedule` is built only where a `Schedule` is simulated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from pipefold.plan.bounds import Backward
from pipefold.plan.fast_orders import (
    KIND_B,
    KIND_F,
    KIND_I,
    KIND_W,
    Order,
    fast_order,
    fast_placement,
    order_of,
    sorted_unique,
)
from pipefold.schedule import Schedule, build
from pipefold.schedule.ir import WeightUpdate
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel
from pipefold.simulate.compiled import CompiledSchedule

__all__ = [
    "family_schedule", "family_order", "compiled_family", "compiles_order", "family_backward",
    "family_placement",
    "compiles", "held_counts_of", "split_held_counts", "order_peaks", "order_peaks_and_later",
]


@functools.lru_cache(maxsize=512)
def family_schedule(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """`build(name, ...)`, kept; large ones generated without `validate`."""
    if num_ranks * num_microbatches <= 256:
        return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    # A large family schedule is generated without `validate`, which costs as much as simulating it
    # (seconds at 64 ranks x 512 micro-batches, and most of a search's time at sizes in between):
    # the families are validated at many sizes by their tests, and the compiled simulation refuses
    # an order that deadlocks.
    entry = family(name)
    entry.check(num_ranks, num_microbatches, num_virtual)
    return entry.generate(num_ranks, num_microbatches, num_virtual)


@functools.lru_cache(maxsize=64)
def family_order(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Order:
    """The family's order as integer arrays: generated so where `pipefold.plan.fast_orders` has the
    family (the same order as `family_schedule`), else read from `family_schedule`."""
    if num_ranks * num_microbatches <= 256:
        return order_of(family_schedule(name, num_ranks, num_microbatches, num_virtual))  # (validated)
    family(name).check(num_ranks, num_microbatches, num_virtual)
    fast = fast_order(name, num_ranks, num_microbatches, num_virtual)
    if fast is not None:
        return fast
    return order_of(family_schedule(name, num_ranks, num_microbatches, num_virtual))


@functools.lru_cache(maxsize=32)  # up to about 50 MB each (64 ranks x 2 stages x 512 micro-batches)
def compiled_family(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> CompiledSchedule:
    """`family_schedule(...)` compiled for repeated timing (`pipefold.simulate.compiled`), from its
    `family_order`."""
    order = family_order(name, num_ranks, num_microbatches, num_virtual)
    return CompiledSchedule(order.shell(), order.rows)


_FIXED_BACKWARD: dict[str, Backward] = {
    "naive": "B", "gpipe": "B", "1f1b": "B", "interleaved-1f1b": "B", "looped-bfs": "B", "pipedream": "B",
    "pipedream-2bw": "B", "zb-h1": "I", "zb-h2": "I", "zb-v": "I", "v-half": "I", "v-min": "I",
}
"""The built-in families whose orders run the same backward kind at every size (a name is registered
once, so these cannot be replaced): the search reads it without generating the order, which at
cluster sizes cost seconds (the greedy V orders most). dualpipe-v's depends on the size.
`tests/plan/test_plan_orders_backward.py` checks the table against generated orders."""


@functools.lru_cache(maxsize=512)
def family_backward(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Backward:
    """Whether the family's order at this size runs B, I + W, or both (as
    `pipefold.plan.bounds.backward_kind`)."""
    fixed = _FIXED_BACKWARD.get(name)
    if fixed is not None:
        family(name).check(num_ranks, num_microbatches, num_virtual)
        return fixed
    return generated_backward(name, num_ranks, num_microbatches, num_virtual)


def generated_backward(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Backward:
    """`family_backward` read from the generated order."""
    return _backward_of(family_order(name, num_ranks, num_microbatches, num_virtual))


def _backward_of(order: Order) -> Backward:
    used = order.kinds_used() & {KIND_B, KIND_I}
    if used == {KIND_B}:
        return "B"
    if used == {KIND_I}:
        return "I"
    return "any"


@functools.lru_cache(maxsize=1024)
def family_placement(name: str, num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    """The stage -> rank placement, which does not depend on m: told by the one-micro-batch order
    (generated without `validate`, which took most of the search's set-up at 64 ranks)."""
    if num_ranks < 1 or num_virtual < 1:
        return family_schedule(name, num_ranks, 1, num_virtual).placement  # (which refuses them)
    entry = family(name)
    entry.check(num_ranks, 1, num_virtual)
    fast = fast_placement(name, num_ranks, num_virtual)
    return fast if fast is not None else entry.generate(num_ranks, 1, num_virtual).placement


def compiles(schedule: Schedule, model: CostModel) -> bool:
    """Whether the compiled engine times this as `simulate` would, memory included: a flush
    (weights held once, so memory needs no timeline) on ranks that do not share cores."""
    return schedule.weight_update is WeightUpdate.FLUSH and CompiledSchedule.supports(model, schedule)


def compiles_order(order: Order, model: CostModel) -> bool:
    """`compiles` for the schedule `order` is the order of."""
    return order.weight_update is WeightUpdate.FLUSH and not model.shares_cores(order.num_ranks)


_ABSORBED = 1e-15
"""As `pipefold.simulate.compiled`: a duration below this share of the step could vanish in a sum."""


@functools.lru_cache(maxsize=4096)
def split_held_counts(name: str, num_ranks: int, num_microbatches: int, num_virtual: int
                      ) -> tuple[tuple[tuple[int, ...], np.ndarray, int], ...]:
    """Per rank, its stages and every distinct (activations held, W inputs held) count vector per
    stage after each of its actions, in the family's order (`held_counts_of`), split at the rank's
    first backward (B or I): the activation peak under any costs is the largest product of these
    with the per-stage bytes (`order_peaks`), without compiling. Per rank its stages, the
    distinct count vectors up to that backward's start and then (a second set) those from its end
    on, where its gradients exist (`CompiledSchedule.order_peaks_and_later`'s later peaks), and how
    many rows the first set has; a rank without a backward has all of them in both. One pass, and
    one product per rank prices both (`order_peaks_and_later`)."""
    found = []
    for kinds, stages_of, _ in family_order(name, num_ranks, num_microbatches, num_virtual).rows:
        packed = _packed_codes(kinds, stages_of)
        if packed is not None:
            stages, codes, decode = packed
            before = sorted_unique(_part(codes, kinds, "before"))
            rows = decode(np.concatenate([before, sorted_unique(_part(codes, kinds, "after"))]), unique=False)
            if rows is not None:
                found.append((stages, rows, len(before)))
                continue
        stages, first = _held_counts_of_row(kinds, stages_of, "before")
        after = _held_counts_of_row(kinds, stages_of, "after")[1]
        found.append((stages, np.concatenate([first, after]), len(first)))
    return tuple(found)


def held_counts_of(order: Order) -> tuple[tuple[tuple[int, ...], np.ndarray], ...]:
    """Per rank, its stages and every distinct (activations held, W inputs held) count vector per
    stage after each of its actions, of any order."""
    return tuple(_packed_held_counts(kinds, stages_of) or _held_counts_of_row(kinds, stages_of)
                 for kinds, stages_of, _ in order.rows)


_HELD = np.array([1, -1, -1, 0, 0], dtype=np.int64)
"""Per kind (F, B, I, W, STEP) its change to its stage's activations held."""
_WAITING = np.array([0, 0, 1, -1, 0], dtype=np.int64)
"""Per kind its change to its stage's inputs held for a W."""


def _packed_held_counts(kinds: np.ndarray, stages_of: np.ndarray, part: str = "all"
                        ) -> tuple[tuple[int, ...], np.ndarray] | None:
    """`_held_counts_of_row` with each count vector packed into one integer as it is summed: every
    count offset by half its field (so a field never borrows), the first column most significant
    (so the codes sort as the rows do); one cumulative sum and one sort of integers. None
    where the fields would not fit 62 bits, or a count is negative. `part` as `_held_counts_of_row`'s."""
    packed = _packed_codes(kinds, stages_of)
    if packed is None:
        return None
    stages, codes, decode = packed
    rows = decode(_part(codes, kinds, part))
    return None if rows is None else (stages, rows)


def _packed_codes(kinds: np.ndarray, stages_of: np.ndarray
                  ) -> tuple[tuple[int, ...], np.ndarray, Callable[..., np.ndarray | None]] | None:
    """A row's stages, its packed count vector before and after each action (`_packed_held_counts`),
    and what decodes a set of them into distinct rows (None where a count is negative; `unique=False`:
    codes already distinct, decoded in their order)."""
    if not len(stages_of) or int(stages_of.min()) < 0:
        return None
    stages = np.flatnonzero(np.bincount(stages_of))  # (a rank's stages: a few small numbers)
    width = len(stages)
    bits = (len(kinds) + 1).bit_length() + 1  # any count, plus or minus, fits half the field
    if 2 * width * bits > 62:
        return None
    # Per (kind, stage) its packed change: the activations' field of the stage's column, and the W
    # inputs' width fields lower; one gather per action.
    shift = (2 * width - 1 - np.arange(width, dtype=np.int64)) * bits
    change = np.zeros((len(_HELD), int(stages[-1]) + 1), dtype=np.int64)
    change[:, stages] = (_HELD[:, None] << shift) + (_WAITING[:, None] << (shift - width * bits))
    bias = 1 << (bits - 1)
    shifts = np.arange(2 * width - 1, -1, -1, dtype=np.int64) * bits
    start = int((bias << shifts).sum())
    codes = np.concatenate([[start], start + np.cumsum(change[kinds, stages_of])])

    def decode(part: np.ndarray, unique: bool = True) -> np.ndarray | None:
        if unique:
            part = sorted_unique(part)
        rows = ((part[:, None] >> shifts) & ((1 << bits) - 1)) - bias
        if rows.size and int(rows.min()) < 0:
            return None
        decoded: np.ndarray = rows.astype(np.float64)
        return decoded

    return tuple(int(stage) for stage in stages), codes, decode


def _part(totals: np.ndarray, kinds: np.ndarray, part: str) -> np.ndarray:
    """Of a row's count vectors before and after each of its `kinds` (one more than actions), all;
    those up to its first backward's start ("before"); or those from its end on ("after"). A row
    without a backward: all of them for either."""
    if part == "all":
        return totals
    backwards = np.flatnonzero((kinds == KIND_B) | (kinds == KIND_I))
    if not len(backwards):
        return totals
    cut = backwards[0] + 1  # (vector j: after action j - 1)
    return totals[:cut] if part == "before" else totals[cut:]


def _held_counts_of_row(kinds: np.ndarray, stages_of: np.ndarray, part: str = "all"
                        ) -> tuple[tuple[int, ...], np.ndarray]:
    """One rank's held counts, from its table of count vectors; `part` "before": those up to the start
    of its first B or I, "after": those from its end on (`_part`)."""
    stages, column = np.unique(stages_of, return_inverse=True)
    width = len(stages)
    counted = kinds <= KIND_W  # F, B, I, W change the counts; a STEP does not
    kinds, column = kinds[counted], column.reshape(-1)[counted]
    steps = len(kinds)
    # Per action its change to the count vector: F +1 activation, B -1, I -1 activation and +1
    # W input, W -1 W input; summed cumulatively from all zeros.
    changes = np.zeros((steps + 1, 2 * width), dtype=np.int64)
    at = np.arange(1, steps + 1)
    held = np.select([kinds == KIND_F, (kinds == KIND_B) | (kinds == KIND_I)], [1, -1], 0)
    waiting = np.select([kinds == KIND_I, kinds == KIND_W], [1, -1], 0)
    changes[at, column] = held
    changes[at, column + width] = waiting
    totals = _part(np.cumsum(changes, axis=0), kinds, part)
    seen = _distinct_rows(totals)
    return tuple(int(stage) for stage in stages), seen.astype(np.float64).reshape(len(seen), 2 * width)


def _distinct_rows(table: np.ndarray) -> np.ndarray:
    """`np.unique(table, axis=0)`'s rows (the same set, sorted), packed into one integer per row
    where they fit: the row-wise unique sorts structured views and was most of the held counts."""
    if table.size == 0:
        return table
    low, high = int(table.min()), int(table.max())
    bits = max(1, high.bit_length())
    if low < 0 or bits * table.shape[1] > 62:
        return np.unique(table, axis=0)
    shifts = np.arange(table.shape[1] - 1, -1, -1, dtype=np.int64) * bits
    packed = sorted_unique((table << shifts).sum(axis=1))
    rows: np.ndarray = (packed[:, None] >> shifts) & ((1 << bits) - 1)
    return rows


def order_peaks(name: str, num_ranks: int, num_microbatches: int, num_virtual: int, costs: CostModel
                ) -> tuple[int, ...] | None:
    """Per rank, the activation peak `CompiledSchedule.order_activation_peaks` gives, from the cached
    counts of the family's order (`split_held_counts`); None where that one would say None (a
    duration so small that the order alone cannot tell which of two actions ends first)."""
    both = order_peaks_and_later(name, num_ranks, num_microbatches, num_virtual, costs)
    return None if both is None else both[0]


def order_peaks_and_later(name: str, num_ranks: int, num_microbatches: int, num_virtual: int, costs: CostModel
                          ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """`order_peaks`, and per rank the later peak `CompiledSchedule.order_peaks_and_later` gives (the
    most held from the end of its first backward on), from the cached counts; None where
    `order_peaks` is."""
    if not _order_tells(name, num_ranks, num_microbatches, num_virtual, costs):
        return None
    peaks, later = [], []
    for stages, counts, num_before in split_held_counts(name, num_ranks, num_microbatches, num_virtual):
        products = counts @ _stage_weights(stages, costs)
        peaks.append(int(round(float(products.max()))) if counts.size else 0)
        after = products[num_before:]
        later.append(int(round(float(after.max()))) if len(after) else peaks[-1])
    return tuple(peaks), tuple(later)


def _order_tells(name: str, num_ranks: int, num_microbatches: int, num_virtual: int, costs: CostModel
                 ) -> bool:
    """Whether the order alone tells the peaks (no duration so small that it could vanish in a sum)."""
    # An upper bound on the compiled check's longest step (every action at the longest duration,
    # overhead and send), so this says False wherever that check says None.
    compute = [d for table in (costs.f, costs.b, costs.i, costs.w) for d in table]
    placement = family_placement(name, num_ranks, num_virtual)
    sends = [costs.transfer_time(s, placement[s], placement[t]) for s in range(costs.num_stages - 1)
             for t in (s, s + 1)] + [costs.transfer_time(s, placement[s + 1], placement[s])
                                     for s in range(costs.num_stages - 1)]
    num_actions = 4 * num_microbatches * costs.num_stages
    occupied = max((costs.send_time(s) for s in range(costs.num_stages - 1)), default=0.0)
    longest = num_actions * (max(compute, default=0.0) + costs.action_overhead + occupied
                             + 3 * costs.num_stages * max(sends, default=0.0))
    if compute and min(compute) <= longest * _ABSORBED:
        return False
    return True


def _stage_weights(stages: tuple[int, ...], costs: CostModel) -> np.ndarray:
    """The bytes each count column stands for: the stages' activations, then their W inputs."""
    held = [costs.activation_bytes[s] for s in stages] + [costs.weight_grad_bytes[s] for s in stages]
    return np.array(held, dtype=np.float64)
