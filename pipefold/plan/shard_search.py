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
  optimizer state). With several stages per rank, freeing between micro-batches and the gather
  look-ahead (`GATHER_LOOKAHEADS`) are searched too: each (free, look-ahead) pair is its own
  sharded schedule, simulated for its time (the gathers' exposed part, `gather_exposed`) and
  walked for its gather buffers (`gathered_bytes`: a look-ahead holds the next stage's whole
  weights while the current one's are still there).

See docs/plan.md, "Data-parallel layout". No torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from pipefold.errors import ConfigError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import allgather_time
from pipefold.plan.memory import RankMemory
from pipefold.plan.orders import family_schedule
from pipefold.schedule import Op, Schedule, add_sharding
from pipefold.simulate import CostModel, Link, simulate
from pipefold.timeline import Timeline


class ShardedConfig(Protocol):
    """What the gather buffers depend on: a `pipefold.plan.space.Config` (not imported: space
    imports this module)."""

    @property
    def schedule(self) -> str: ...
    @property
    def num_microbatches(self) -> int: ...
    @property
    def num_virtual(self) -> int: ...
    @property
    def free_between(self) -> bool: ...
    @property
    def gather_lookahead(self) -> int: ...

__all__ = [
    "GATHER_LOOKAHEADS", "SHARD_CHOICES", "ShardedConfig", "check_shard", "gather_exposed", "gathered_bytes",
    "layout_subject",
    "layout_text", "searched_layouts", "sharded_memory", "sharded_static_bytes", "simulate_sharded",
]

GATHER_LOOKAHEADS = (0, 1, 2)
"""Full sharding's gather look-aheads the search tries (`add_sharding(lookahead=k)`, `pipefold
train --gather-lookahead K`): a gather started 1 or 2 actions of the rank's row early overlaps
that compute; further ahead holds the next stage's weights longer and, with the rank's row
alternating stages every action or two, rarely starts a gather any earlier."""

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
) -> tuple[tuple[str, bool, int], ...]:
    """The (layout, free_between, gather look-ahead) triples searched for one configuration: one
    replica has only "replicate"; ZeRO-1 needs tp = 1 (the runtime refuses it with tp). Freeing
    between micro-batches and the look-ahead change nothing with one stage per rank (its row
    starts with the stage's first action, where the one gather goes), so they are searched only
    with several."""
    if num_data_parallel == 1:
        return (("replicate", False, 0),)
    zero1 = (("zero1", False, 0),) if num_tensor_parallel == 1 else ()
    if num_virtual > 1:
        full = tuple(("full", free, ahead) for free in (False, True) for ahead in GATHER_LOOKAHEADS)
    else:
        full = (("full", False, 0),)
    if shard == "auto":
        return (("replicate", False, 0), *zero1, *full)
    if shard == "full":
        return full
    if shard == "zero1" or zero:
        return zero1 or (("replicate", False, 0),)
    return (("replicate", False, 0),)


def _owned(model: CostModel, placement: tuple[int, ...], num_ranks: int) -> list[int]:
    """Per rank: its stages' weight bytes."""
    owned = [0] * num_ranks
    for stage, rank in enumerate(placement):
        owned[rank] += model.weight_bytes[stage]
    return owned


@functools.lru_cache(maxsize=1024)
def _held_together(
    name: str, num_ranks: int, num_microbatches: int, num_virtual: int, free_between: bool, lookahead: int
) -> tuple[tuple[frozenset[int], ...], ...]:
    """Per rank, the sets of stages whose whole weights the family's sharded schedule holds at
    once, right after each of its gathers starts (where the held bytes peak)."""
    schedule = add_sharding(family_schedule(name, num_ranks, num_microbatches, num_virtual),
                            free_between=free_between, lookahead=lookahead)
    found = []
    for row in schedule.actions:
        held: set[int] = set()
        sets: set[frozenset[int]] = set()
        for action in row:
            if action.op is Op.UNSHARD:
                held.add(action.stage)
                sets.add(frozenset(held))
            elif action.op is Op.RESHARD:
                held.discard(action.stage)
        found.append(tuple(sets))
    return tuple(found)


def gathered_bytes(
    name: str, num_ranks: int, num_microbatches: int, num_virtual: int, weight_bytes: Sequence[int],
    free_between: bool, lookahead: int,
) -> tuple[int, ...]:
    """Per rank, the most whole (gathered) weight bytes the family `name` holds at once under full
    sharding with these options, walked from its rows: a rank runs its row in order, so this is
    `pipefold.simulate.memory.gathered_weight_bytes_peak` of any simulation of that schedule."""
    held = _held_together(name, num_ranks, num_microbatches, num_virtual, free_between, lookahead)
    return tuple(max((sum(weight_bytes[stage] for stage in stages) for stages in sets), default=0)
                 for sets in held)


def _shard_and_gathered(
    model: CostModel, config: ShardedConfig, placement: tuple[int, ...], num_ranks: int,
    num_data_parallel: int,
) -> list[int]:
    """Per rank, the weight bytes held at a step's peak under full sharding: the 1/dp shards
    (rounded up, as FSDP pads) beside the whole weights gathered at once (`gathered_bytes`)."""
    owned = _owned(model, placement, num_ranks)
    gathered = gathered_bytes(config.schedule, num_ranks, config.num_microbatches, config.num_virtual,
                              model.weight_bytes, config.free_between, config.gather_lookahead)
    return [-(-owned[rank] // num_data_parallel) + gathered[rank] for rank in range(num_ranks)]


def sharded_memory(
    memory: Sequence[RankMemory], model: CostModel, config: ShardedConfig, placement: tuple[int, ...],
    num_data_parallel: int,
) -> tuple[RankMemory, ...]:
    """`memory` of the unsharded schedule (the costs' optimizer state already 1/dp) with the
    weights full sharding holds at its peak under `config`'s free / look-ahead. Gradients stay
    whole: they accumulate until the stage's reduce-scatter."""
    weights = _shard_and_gathered(model, config, placement, len(memory), num_data_parallel)
    return tuple(replace(held, weights=weights[rank]) for rank, held in enumerate(memory))


def sharded_static_bytes(
    costs: ModelCosts, model: CostModel, config: ShardedConfig, placement: tuple[int, ...], num_ranks: int,
    num_data_parallel: int,
) -> tuple[int, ...]:
    """Per rank, weights, gradients and optimizer state at a fully sharded step's peak: a lower
    bound on its peak, rounded part by part as `sharded_memory` is."""
    owned = _owned(model, placement, num_ranks)
    weights = _shard_and_gathered(model, config, placement, num_ranks, num_data_parallel)
    return tuple(
        weights[rank]
        + round(owned[rank] * costs.gradient_bytes_per_parameter_byte)
        + round(owned[rank] * costs.optimizer_bytes_per_parameter_byte)
        for rank in range(num_ranks)
    )


def _collective_model(model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link) -> CostModel:
    """`model` with each stage's weight all-gather and gradient reduce-scatter (ring collectives,
    `pipefold.plan.degree`) over the replicas' `link`."""
    gather = tuple(allgather_time(w, num_data_parallel, link) for w in model.weight_bytes)
    # A ring reduce-scatter moves what an all-gather of its result moves.
    reduce_scatter = tuple(
        allgather_time(round(w * costs.gradient_bytes_per_parameter_byte), num_data_parallel, link)
        for w in model.weight_bytes
    )
    return replace(model, gather=gather, reduce_scatter=reduce_scatter)


def simulate_sharded(
    schedule: Schedule, model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link,
    free_between: bool, lookahead: int = 0,
) -> Timeline:
    """The schedule with its sharding actions (`free_between`, `lookahead` as `add_sharding`
    takes them), each stage's weights all-gathered and its gradients reduce-scattered over the
    replicas' `link`."""
    sharded = add_sharding(schedule, free_between=free_between, lookahead=lookahead)
    return simulate(sharded, _collective_model(model, costs, num_data_parallel, link))


def gather_exposed(
    schedule: Schedule, model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link,
    free_between: bool, lookahead: int, makespan: float,
) -> float:
    """Seconds the weight gathers add to the step: `makespan` (`simulate_sharded`'s) less the same
    sharded schedule simulated with gathers that take no time. 0 where every gather overlaps
    compute (or waits that happen anyway); a look-ahead exists to shrink it."""
    sharded = add_sharding(schedule, free_between=free_between, lookahead=lookahead)
    free_gathers = replace(_collective_model(model, costs, num_data_parallel, link), gather=())
    return max(makespan - simulate(sharded, free_gathers).makespan, 0.0)


def layout_text(shard: str, free_between: bool, lookahead: int = 0) -> str:
    """'replicate', 'zero1', 'full', 'full, freed between micro-batches' or 'full, gathers 1
    action ahead' (both where both)."""
    text = f"{shard}, freed between micro-batches" if free_between else shard
    if lookahead:
        text += f", gathers {lookahead} action{'s' if lookahead > 1 else ''} ahead"
    return text


def layout_subject(shard: str, free_between: bool, lookahead: int) -> str:
    """A layout's verdict subject: 'shard=full', 'shard=full+free-between',
    'shard=full+lookahead=2', ..."""
    return ("shard=" + shard + ("+free-between" if free_between else "")
            + (f"+lookahead={lookahead}" if lookahead else ""))
