"""The family orders the planner prices, generated once per size and kept (and compiled) for reuse.

    schedule = family_schedule("1f1b", num_ranks, num_microbatches, num_virtual)
    run = compiled_family("1f1b", num_ranks, num_microbatches, num_virtual).run(cost_model)
"""

from __future__ import annotations

import functools

from pipefold.plan.bounds import Backward, backward_kind
from pipefold.schedule import Schedule, build
from pipefold.schedule.ir import WeightUpdate
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel
from pipefold.simulate.compiled import CompiledSchedule

__all__ = ["family_schedule", "compiled_family", "family_backward", "family_placement", "compiles"]


@functools.lru_cache(maxsize=512)
def family_schedule(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """`build(name, ...)`, kept; large ones generated without `validate`."""
    if num_ranks * num_microbatches <= 4096:
        return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    # A large family schedule is generated without `validate`, which costs as much as simulating it
    # (seconds at 64 ranks x 512 micro-batches): the families are validated at many sizes by their
    # tests, and the compiled simulation refuses an order that deadlocks.
    entry = family(name)
    entry.check(num_ranks, num_microbatches, num_virtual)
    return entry.generate(num_ranks, num_microbatches, num_virtual)


@functools.lru_cache(maxsize=8)  # tens of MB each at 64 ranks x 512 micro-batches
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
