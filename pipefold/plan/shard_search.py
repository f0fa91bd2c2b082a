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

Stages of one rank that hold one weight (`ModelCosts.tied_layers`: the GPT's tied embedding and
head, or a Hugging Face model's, both on rank 0 under zb-v and dualpipe-v) gather as one unit, as
the runtime does
(`pipefold.schedule.shard_units`): one all-gather of the union's bytes (the weight once) at the
unit's first UNSHARD, held until its last RESHARD, one reduce-scatter at its last REDUCE_GRAD;
`stage_ties` cuts the tied layers at a partition and every function here takes its result.

See docs/plan.md, "Data-parallel layout". No torch.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from pipefold.errors import ConfigError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import allgather_time
from pipefold.plan.memory import RankMemory
from pipefold.plan.orders import family_schedule
from pipefold.schedule import Op, Schedule, add_sharding, shard_units, unit_costs
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
    "GATHER_LOOKAHEADS", "NO_TIES", "SHARD_CHOICES", "ShardedConfig", "StageTies", "check_shard",
    "gather_exposed", "gathered_bytes", "layout_subject", "stage_ties",
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


@dataclass(frozen=True)
class StageTies:
    """The weights several layers hold (`ModelCosts.tied_layers`), cut at a partition."""

    groups: tuple[tuple[tuple[tuple[int, int], ...], int], ...] = ()
    """Per weight: ((stage, how many of its layers that stage holds), ...) and its bytes."""

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        """Per weight held by several stages, those stages (`shard_units`' `tied`)."""
        return tuple(found for found in (tuple(stage for stage, _ in counts) for counts, _ in self.groups)
                     if len(found) > 1)

    def units(self, placement: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """Every rank's full-sharding units (`pipefold.schedule.shard_units`)."""
        return shard_units(placement, self.stages)

    def bytes_of(self, stages: Iterable[int], weight_bytes: Sequence[int]) -> int:
        """The weight bytes of `stages` held together: their `weight_bytes`, each tied weight once."""
        held = set(stages)
        total = sum(weight_bytes[stage] for stage in held)
        for counts, size in self.groups:
            copies = sum(count for stage, count in counts if stage in held)
            total -= max(copies - 1, 0) * size
        return total


NO_TIES = StageTies()
"""A model without tied layers: each stage is its own unit."""


def stage_ties(costs: ModelCosts, bounds: Sequence[int]) -> StageTies:
    """`costs.tied_layers` at the partition `bounds` (stage s owns layers [bounds[s], bounds[s+1])):
    each tied weight's stages and its bytes (`ModelCosts.tied_bytes`: `tied_parameter_bytes`, or
    the smallest of its layers' `parameter_bytes`, one module's where the layers are one module)."""
    groups = []
    for group, size in zip(costs.tied_layers, costs.tied_bytes, strict=True):
        counts = Counter(bisect.bisect_right(bounds, layer) - 1 for layer in group)
        groups.append((tuple(sorted(counts.items())), size))
    return StageTies(tuple(groups))


def _owned(
    model: CostModel, placement: tuple[int, ...], num_ranks: int, ties: StageTies = NO_TIES
) -> list[int]:
    """Per rank: its stages' weight bytes (a weight its stages share, once: FSDP shards it once)."""
    stages: list[list[int]] = [[] for _ in range(num_ranks)]
    for stage, rank in enumerate(placement):
        stages[rank].append(stage)
    return [ties.bytes_of(mine, model.weight_bytes) for mine in stages]


@functools.lru_cache(maxsize=1024)
def _held_together(
    name: str, num_ranks: int, num_microbatches: int, num_virtual: int, free_between: bool, lookahead: int,
    tied: tuple[tuple[int, ...], ...] = (),
) -> tuple[tuple[frozenset[int], ...], ...]:
    """Per rank, the sets of stages whose whole weights the family's sharded schedule holds at
    once, right after each of its gathers starts (where the held bytes peak); `tied` as
    `StageTies.stages`."""
    family = family_schedule(name, num_ranks, num_microbatches, num_virtual)
    schedule = add_sharding(family, free_between=free_between, lookahead=lookahead,
                            units=shard_units(family.placement, tied))
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
    free_between: bool, lookahead: int, ties: StageTies = NO_TIES,
) -> tuple[int, ...]:
    """Per rank, the most whole (gathered) weight bytes the family `name` holds at once under full
    sharding with these options, walked from its rows: a rank runs its row in order, so this is
    `pipefold.simulate.memory.gathered_weight_bytes_peak(timeline, model, ties.groups)` of any
    simulation of that schedule (a unit holds a tied weight once)."""
    held = _held_together(name, num_ranks, num_microbatches, num_virtual, free_between, lookahead,
                          ties.stages)
    return tuple(max((ties.bytes_of(stages, weight_bytes) for stages in sets), default=0) for sets in held)


def _shard_and_gathered(
    model: CostModel, config: ShardedConfig, placement: tuple[int, ...], num_ranks: int,
    num_data_parallel: int, ties: StageTies,
) -> list[int]:
    """Per rank, the weight bytes held at a step's peak under full sharding: the 1/dp shards
    (rounded up, as FSDP pads) beside the whole weights gathered at once (`gathered_bytes`)."""
    owned = _owned(model, placement, num_ranks, ties)
    gathered = gathered_bytes(config.schedule, num_ranks, config.num_microbatches, config.num_virtual,
                              model.weight_bytes, config.free_between, config.gather_lookahead, ties)
    return [-(-owned[rank] // num_data_parallel) + gathered[rank] for rank in range(num_ranks)]


def sharded_memory(
    memory: Sequence[RankMemory], model: CostModel, config: ShardedConfig, placement: tuple[int, ...],
    num_data_parallel: int, ties: StageTies = NO_TIES, costs: ModelCosts | None = None,
) -> tuple[RankMemory, ...]:
    """`memory` of the unsharded schedule (the costs' optimizer state already 1/dp) with the
    weights full sharding holds at its peak under `config`'s free / look-ahead. Gradients stay
    whole: they accumulate until the stage's reduce-scatter. With `ties` and the `costs` the
    memory was priced from, a weight several of a rank's stages hold (one unit) counts once in
    its gradients and optimizer state too."""
    weights = _shard_and_gathered(model, config, placement, len(memory), num_data_parallel, ties)
    # The gathered weights are cast at every forward: no copies held for the step (each micro-batch
    # keeps its own among its activations: `pipefold.plan.precision_costs.recast_every_forward`).
    memory = [replace(held, casts=0) for held in memory]
    if costs is None or not ties.groups:
        return tuple(replace(held, weights=weights[rank]) for rank, held in enumerate(memory))
    owned = _owned(model, placement, len(memory), ties)
    return tuple(
        replace(held, weights=weights[rank],
                gradients=round(owned[rank] * costs.gradient_bytes_per_parameter_byte),
                optimizer=round(owned[rank] * costs.optimizer_bytes_per_parameter_byte))
        for rank, held in enumerate(memory)
    )


def sharded_static_bytes(
    costs: ModelCosts, model: CostModel, config: ShardedConfig, placement: tuple[int, ...], num_ranks: int,
    num_data_parallel: int, ties: StageTies = NO_TIES,
) -> tuple[int, ...]:
    """Per rank, weights, gradients and optimizer state at a fully sharded step's peak: a lower
    bound on its peak, rounded part by part as `sharded_memory` is."""
    owned = _owned(model, placement, num_ranks, ties)
    weights = _shard_and_gathered(model, config, placement, num_ranks, num_data_parallel, ties)
    return tuple(
        weights[rank]
        + round(owned[rank] * costs.gradient_bytes_per_parameter_byte)
        + round(owned[rank] * costs.optimizer_bytes_per_parameter_byte)
        for rank in range(num_ranks)
    )


def _collective_model(
    model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link, placement: Sequence[int],
    ties: StageTies,
) -> CostModel:
    """`model` with each unit's weight all-gather on its first stage and gradient reduce-scatter
    on its last (ring collectives, `pipefold.plan.degree`, of the union's bytes) over the
    replicas' `link` (`pipefold.schedule.unit_costs`)."""

    def gather(unit: Sequence[int]) -> float:
        return allgather_time(ties.bytes_of(unit, model.weight_bytes), num_data_parallel, link)

    def reduce_scatter(unit: Sequence[int]) -> float:
        # A ring reduce-scatter moves what an all-gather of its result moves.
        whole = round(ties.bytes_of(unit, model.weight_bytes) * costs.gradient_bytes_per_parameter_byte)
        return allgather_time(whole, num_data_parallel, link)

    gathers, reductions = unit_costs(ties.units(placement), model.num_stages, gather, reduce_scatter)
    return replace(model, gather=gathers, reduce_scatter=reductions)


def _sharded(schedule: Schedule, free_between: bool, lookahead: int, ties: StageTies) -> Schedule:
    return add_sharding(schedule, free_between=free_between, lookahead=lookahead,
                        units=ties.units(schedule.placement))


def simulate_sharded(
    schedule: Schedule, model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link,
    free_between: bool, lookahead: int = 0, ties: StageTies = NO_TIES,
) -> Timeline:
    """The schedule with its sharding actions (`free_between`, `lookahead` as `add_sharding`
    takes them, a rank's stages that hold one weight one unit), each unit's weights
    all-gathered and its gradients reduce-scattered over the replicas' `link`."""
    sharded = _sharded(schedule, free_between, lookahead, ties)
    collective = _collective_model(model, costs, num_data_parallel, link, schedule.placement, ties)
    return simulate(sharded, collective)


def gather_exposed(
    schedule: Schedule, model: CostModel, costs: ModelCosts, num_data_parallel: int, link: Link,
    free_between: bool, lookahead: int, makespan: float, ties: StageTies = NO_TIES,
) -> float:
    """Seconds the weight gathers add to the step: `makespan` (`simulate_sharded`'s) less the same
    sharded schedule simulated with gathers that take no time. 0 where every gather overlaps
    compute (or waits that happen anyway); a look-ahead exists to shrink it."""
    sharded = _sharded(schedule, free_between, lookahead, ties)
    collective = _collective_model(model, costs, num_data_parallel, link, schedule.placement, ties)
    return max(makespan - simulate(sharded, replace(collective, gather=())).makespan, 0.0)


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
