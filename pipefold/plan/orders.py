"""The family orders the planner prices, generated once per size and kept (and compiled) for reuse.

    schedule = family_schedule("1f1b", num_ranks, num_microbatches, num_virtual)
    run = compiled_family("1f1b", num_ranks, num_microbatches, num_virtual).run(cost_model)
"""

from __future__ import annotations

import functools

import numpy as np

from pipefold.plan.bounds import Backward, backward_kind
from pipefold.schedule import Schedule, build
from pipefold.schedule.ir import Op, WeightUpdate
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel
from pipefold.simulate.compiled import CompiledSchedule

__all__ = [
    "family_schedule", "compiled_family", "family_backward", "family_placement", "compiles", "held_counts",
    "order_peaks",
]


@functools.lru_cache(maxsize=512)
def family_schedule(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """`build(name, ...)`, kept; large ones generated without `validate`."""
    if num_ranks * num_microbatches <= 256:
        return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    # A large family schedule is generated without `validate`, which costs as much as simulating it
    # (seconds at 64 ranks x 512 micro-batches, and most of a search's time at sizes in between): the families are validated at many sizes by their
    # tests, and the compiled simulation refuses an order that deadlocks.
    entry = family(name)
    entry.check(num_ranks, num_microbatches, num_virtual)
    return entry.generate(num_ranks, num_microbatches, num_virtual)


@functools.lru_cache(maxsize=32)  # up to about 50 MB each (64 ranks x 2 stages x 512 micro-batches)
def compiled_family(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> CompiledSchedule:
    """`family_schedule(...)` compiled for repeated timing (`pipefold.simulate.compiled`)."""
    return CompiledSchedule(family_schedule(name, num_ranks, num_microbatches, num_virtual))


@functools.lru_cache(maxsize=512)
def family_backward(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Backward:
    """Whether the family's order at this size runs B, I + W, or both (`pipefold.plan.bounds`)."""
    return backward_kind(family_schedule(name, num_ranks, num_microbatches, num_virtual))


@functools.lru_cache(maxsize=1024)
def family_placement(name: str, num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    """The stage -> rank placement, which does not depend on m: told by the one-micro-batch order."""
    return family_schedule(name, num_ranks, 1, num_virtual).placement


def compiles(schedule: Schedule, model: CostModel) -> bool:
    """Whether the compiled engine times this as `simulate` would, memory included: a flush
    (weights held once, so memory needs no timeline) on ranks that do not share cores."""
    return schedule.weight_update is WeightUpdate.FLUSH and CompiledSchedule.supports(model, schedule)


_ABSORBED = 1e-15
"""As `pipefold.simulate.compiled`: a duration below this share of the step could vanish in a sum."""


_DELTAS: dict[Op, tuple[tuple[int, int], ...]] = {
    Op.F: ((0, 1),), Op.B: ((0, -1),), Op.I: ((0, -1), (1, 1)), Op.W: ((1, -1),),
}
"""Per compute op, its changes to a rank's count vector: (0: activations held / 1: W inputs held, +-1)."""


@functools.lru_cache(maxsize=4096)
def held_counts(name: str, num_ranks: int, num_microbatches: int, num_virtual: int
                ) -> tuple[tuple[tuple[int, ...], np.ndarray], ...]:
    """Per rank, its stages and every distinct (activations held, W inputs held) count vector per
    stage after each of its actions, in the family's order: the activation peak under any costs is
    the largest product of these with the per-stage bytes (`order_peaks`), without compiling."""
    schedule = family_schedule(name, num_ranks, num_microbatches, num_virtual)
    result = []
    for row in schedule.actions:
        stages = sorted({action.stage for action in row})
        column = {stage: index for index, stage in enumerate(stages)}
        width = len(stages)
        # Each action's change to the count vector as one (column, +-1) entry (an I two), summed
        # cumulatively with numpy: a Python tuple per action was most of this at 64 ranks.
        rows_at: list[int] = []
        columns: list[int] = []
        deltas: list[int] = []
        step = 0
        for action in row:
            delta = _DELTAS.get(action.op)
            if delta is None:
                continue
            step += 1
            index = column[action.stage]
            for offset, change in delta:
                rows_at.append(step)
                columns.append(index + offset * width)
                deltas.append(change)
        changes = np.zeros((step + 1, 2 * width), dtype=np.int64)
        np.add.at(changes, (np.array(rows_at, dtype=np.intp), np.array(columns, dtype=np.intp)),
                  np.array(deltas, dtype=np.int64))
        seen = np.unique(np.cumsum(changes, axis=0), axis=0)
        result.append((tuple(stages), seen.astype(np.float64).reshape(len(seen), 2 * width)))
    return tuple(result)


def order_peaks(name: str, num_ranks: int, num_microbatches: int, num_virtual: int, costs: CostModel
                ) -> tuple[int, ...] | None:
    """Per rank, the activation peak `CompiledSchedule.order_activation_peaks` gives, from the cached
    counts of the family's order (`held_counts`); None where that one would say None (a duration
    so small that the order alone cannot tell which of two actions ends first)."""
    # An upper bound on the compiled check's longest step (every action at the longest duration,
    # overhead and send), so this says None wherever that check would.
    compute = [d for table in (costs.f, costs.b, costs.i, costs.w) for d in table]
    placement = family_placement(name, num_ranks, num_virtual)
    sends = [costs.transfer_time(s, placement[s], placement[t]) for s in range(costs.num_stages - 1)
             for t in (s, s + 1)] + [costs.transfer_time(s, placement[s + 1], placement[s])
                                     for s in range(costs.num_stages - 1)]
    num_actions = 4 * num_microbatches * costs.num_stages
    longest = num_actions * (max(compute, default=0.0) + costs.action_overhead
                             + 3 * costs.num_stages * max(sends, default=0.0))
    if compute and min(compute) <= longest * _ABSORBED:
        return None
    peaks = []
    for stages, counts in held_counts(name, num_ranks, num_microbatches, num_virtual):
        weights = np.array([costs.activation_bytes[s] for s in stages] + [costs.weight_grad_bytes[s] for s in stages],
                           dtype=np.float64)
        peaks.append(int(round(float((counts @ weights).max()))) if counts.size else 0)
    return tuple(peaks)
