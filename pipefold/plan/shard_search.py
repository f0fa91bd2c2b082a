"""How the planner's search treats the data-parallel layouts: replicate, ZeRO-1 and full sharding.

`PlanOptions(shard="auto")` (`pipefold plan --shard auto`) searches every layout the degree allows
for each configuration; "replicate", "zero1" and "full" pin one. A layout is a field of the
configuration (`Config.shard`, `Config.free_between`), so the search prices, prunes and ranks
the layouts of one configuration like its other settings:

- replicate and ZeRO-1: the gradient all-reduce (and ZeRO-1's weight all-gather) after the
  schedule (`search.replica_sync_time`);
- full sharding: the schedule with its UNSHARD / REDUCE_GRAD / RESHARD actions
  (`pipefold.schedule.add_sharding`) simulated with each stage's all-gather and reduce-scatter
  on the data-parallel link, and a rank's bytes as `pipefold.plan.shard_layout.layout_bytes`
  counts them (its weight shards, the whole weights gathered, the whole gradients, 1/dp of the
  optimizer state). With several stages per rank, freeing between micro-batches is searched too.

See docs/plan.md, "Data-parallel layout". No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import allgather_time
from pipefold.plan.memory import RankMemory
from pipefold.schedule import Schedule, add_sharding
from pipefold.simulate import CostModel, Link, simulate
from pipefold.timeline import Timeline

__all__ = [
    "SHARD_CHOICES", "check_shard", "searched_layouts", "sharded_memory", "sharded_static_bytes",
    "simulate_sharded", "layout_text",
]

SHARD_CHOICES = ("replicate", "zero1", "full", "auto")
"""`PlanOptions.shard`: a layout pinned, or "auto" (each configuration's layouts searched)."""


def check_shard(shard: object, zero: bool) -> None:
    """ConfigError unless `shard` is one of `SHARD_CHOICES` and agrees with `zero`."""
    if shard not in SHARD_CHOICES:
        raise ConfigError(f"shard = {shard!r}; use one of {', '.join(SHARD_CHOICES)}")
    if zero and shard not in ("replicate", "zero1"):
        raise ConfigError(
            f"zero = True with shard = {shard!r}: zero pins ZeRO-1; leave zero out "
            "(shard = 'zero1' is the same)"
        )


def searched_layouts(
    shard: str, zero: bool, num_data_parallel: int, num_tensor_parallel: int, num_virtual: int
) -> tuple[tuple[str, bool], ...]:
    """The (layout, free_between) pairs searched for one configuration: one replica has only
    "replicate"; ZeRO-1 needs tp = 1 (the runtime refuses it with tp); freeing between
    micro-batches changes nothing with one stage per rank, so it is searched only with several."""
    if num_data_parallel == 1:
        return (("replicate", False),)
    zero1 = (("zero1", False),) if num_tensor_parallel == 1 else ()
    full = (("full", False),) + ((("full", True),) if num_virtual > 1 else ())
    if shard == "auto":
        return (("replicate", False), *zero1, *full)
    if shard == "full":
        return full
    if shard == "zero1" or zero:
        return zero1 or (("replicate", False),)
    return (("replicate", False),)


def _owned(model: CostModel, placement: tuple[int, ...], num_ranks: int) -> tuple[list[int], list[int]]:
    """Per rank: its stages' weight bytes, and its largest stage's."""
    owned, largest = [0] * num_ranks, [0] * num_ranks
    for stage, rank in enumerate(placement):
        owned[rank] += model.weight_bytes[stage]
        largest[rank] = max(largest[rank], model.weight_bytes[stage])
    return owned, largest


def _shard_and_gathered(
    model: CostModel, placement: tuple[int, ...], num_ranks: int, num_data_parallel: int, free_between: bool
) -> list[int]:
    """Per rank, the weight bytes held at a step's peak under full sharding: the 1/dp shards
    (rounded up, as FSDP pads) beside the whole weights gathered (all its stages, or its
    largest one when freed between micro-batches)."""
    owned, largest = _owned(model, placement, num_ranks)
    return [
        -(-owned[rank] // num_data_parallel) + (largest[rank] if free_between else owned[rank])
        for rank in range(num_ranks)
    ]


def sharded_memory(
    memory: Sequence[RankMemory], model: CostModel, placement: tuple[int, ...], num_data_parallel: int,
    free_between: bool,
) -> tuple[RankMemory, ...]:
    """`memory` of the unsharded schedule (the costs' optimizer state already 1/dp) with the
    weights full sharding holds at its peak. Gradients stay whole: they accumulate until the
    stage's reduce-scatter."""
    weights = _shard_and_gathered(model, placement, len(memory), num_data_parallel, free_between)
    return tuple(replace(held, weights=weights[rank]) for rank, held in enumerate(memory))


def sharded_static_bytes(
    costs: ModelCosts, model: CostModel, placement: tuple[int, ...], num_ranks: int, num_data_parallel: int,
    free_between: bool,
) -> tuple[int, ...]:
    """Per rank, weights, gradients and optimizer state at a fully sharded step's peak: a lower
    bound on its peak, rounded part by part as `sharded_memory` is."""
    owned, _ = _owned(model, placement, num_ranks)
    weights = _shard_and_gathered(model, placement, num_ranks, num_data_parallel, free_between)
    return tuple(
        weights[rank]
        + round(owned[rank] * costs.gradient_bytes_per_parameter_byte)
        + round(owned[rank] * costs.optimizer_bytes_per_parameter_byte)
        for rank in range(num_ranks)
    )


def simulate_sharded(
    schedule: Schedule, model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link,
    free_between: bool,
) -> Timeline:
    """The schedule with its sharding actions, each stage's weights all-gathered and its gradients
    reduce-scattered (ring collectives, `pipefold.plan.degree`) over the replicas' `link`."""
    sharded = add_sharding(schedule, free_between=free_between)
    gather = tuple(allgather_time(w, num_data_parallel, link) for w in model.weight_bytes)
    # A ring reduce-scatter moves what an all-gather of its result moves.
    reduce_scatter = tuple(
        allgather_time(round(w * costs.gradient_bytes_per_parameter_byte), num_data_parallel, link)
        for w in model.weight_bytes
    )
    return simulate(sharded, replace(model, gather=gather, reduce_scatter=reduce_scatter))


def layout_text(shard: str, free_between: bool) -> str:
    """'replicate', 'zero1', 'full' or 'full, freed between micro-batches'."""
    return f"{shard}, freed between micro-batches" if free_between else shard

