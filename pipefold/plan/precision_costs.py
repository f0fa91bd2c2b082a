"""What autocast's 16-bit weight copies cost a step, in time and memory, as the runtime makes them.

    step_time += cast_time(costs, model, config.schedule, shard)        # casts held for the step
    model = recast_every_forward(model, costs, recompute)               # full sharding: every F
    transient = transient_bytes(..., rerun_copies(costs, schedule, shard))  # ... every rerun F
    memory = without_held_casts(memory)                                  # ... and none held once

Under mixed precision (bf16, fp16: fp32 weights, forwards under autocast) the runtime holds
autocast's casts for a flush step (`pipefold.runtime.stage.held_casts`): a stage's first
forward of the step casts its matrix weights and every later forward and recomputation takes
those copies, held once per rank (`RankMemory.casts`). The fill's chain of first forwards passes
every stage in turn, each waiting on the one before, so the step is priced the casts of all the
pipeline's stages once (`cast_time`).

Where the weights are gathered per step by full sharding (`shard="full"`), or change inside the
step (an asynchronous schedule), the runtime holds no casts: every forward, and every
recomputing backward's forward, casts its stage's weights again, and each micro-batch's backward
keeps its own copies until it runs (`recast_every_forward`, `without_held_casts`); a recomputing
backward holds its rerun layer's copies beside its rebuilt activations (`rerun_copies`).

Each stage's copies, and their time, are its own layers' (`LayerCost.cast_bytes`, summed per
stage into `CostModel.cast_bytes`: `stage_cast_seconds`); costs whose layers carry none are
priced by one ratio per weight byte (`ModelCosts.cast_bytes_per_parameter_byte`). A tied weight
that several layers cast is one copy per stage, and while the casts are held one per rank
(`ModelCosts.tied_copies`, `CostModel.tied_casts`, `pipefold.plan.memory.repeated_casts`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from pipefold.plan.costs import ModelCosts
from pipefold.plan.memory import RankMemory, repeated_casts
from pipefold.plan.space import is_asynchronous
from pipefold.simulate import CostModel

__all__ = [
    "casts_every_forward", "cast_time", "recast_every_forward", "recast_for", "rerun_copies",
    "stage_cast_seconds", "without_held_casts",
]


def casts_every_forward(schedule: str, shard: str) -> bool:
    """Whether the runtime casts the weights at every forward (holds no casts for the step)."""
    return shard == "full" or is_asynchronous(schedule)


def cast_time(costs: ModelCosts, model: CostModel, schedule: str, shard: str,
              placement: Sequence[int] | None = None) -> float:
    """Seconds the step adds for the casts held once a step: every stage's first forward casts its
    weights (`ModelCosts.cast_s_per_parameter_byte`), one after another along the fill; a tied
    weight several stages of one rank cast, once (`placement`: each stage's rank; None: one rank
    a stage). 0 where every forward casts (priced in the forwards: `recast_every_forward`)."""
    if not costs.cast_s_per_parameter_byte or casts_every_forward(schedule, shard):
        return 0.0
    seconds = sum(stage_cast_seconds(costs, model))
    if placement is None or not any(model.cast_bytes):
        return seconds
    return seconds - costs.cast_s_per_cast_byte * sum(repeated_casts(model, placement, max(placement) + 1))


def stage_cast_seconds(costs: ModelCosts, model: CostModel) -> list[float]:
    """Per stage, the seconds its casts take: its own copies' bytes (`CostModel.cast_bytes`) at
    the model's seconds per copied byte where it has them, else its weights at the ratio."""
    if any(model.cast_bytes):
        per_byte = costs.cast_s_per_cast_byte
        return [per_byte * copies for copies in model.cast_bytes]
    return [costs.cast_s_per_parameter_byte * weights for weights in model.weight_bytes]


def recast_every_forward(model: CostModel, costs: ModelCosts, recompute: Collection[int],
                         bounds: Sequence[int]) -> CostModel:
    """`model` (of the stages cut at `bounds`) where each forward casts its stage's weights: F,
    and the forward a recomputed stage reruns in B, I and W, take the casts' time; a stage not
    recomputed keeps the copies its forward saves per micro-batch in flight, as activations: its
    layers' weights' copies (`LayerCost.saved_casts`: not the biases', which no backward needs; a
    tied weight's once), where a recomputed stage's checkpointed forward saves none."""
    seconds = costs.cast_s_per_parameter_byte
    per_byte = costs.cast_bytes_per_parameter_byte
    if not seconds and not per_byte and not any(model.cast_bytes):
        return model
    cast = stage_cast_seconds(costs, model)
    again = [cast[stage] if stage in recompute else 0.0 for stage in range(model.num_stages)]
    # Each stage's own copies where the layers carry them, else by the ratio.
    if any(model.cast_bytes):
        own = costs.saved_casts_between(bounds)
        for counts, size in model.tied_casts:
            for stage, count in counts:  # one copy of a tied weight per forward (autocast's cache)
                own[stage] -= (count - 1) * size
    else:
        own = [round(per_byte * w) for w in model.weight_bytes]
    copies = [0 if stage in recompute else own[stage] for stage in range(model.num_stages)]
    return replace(
        model,
        f=_plus(model.f, cast), b=_plus(model.b, again), i=_plus(model.i, again), w=_plus(model.w, again),
        activation_bytes=_plus_bytes(model.activation_bytes, copies),
        weight_grad_bytes=_plus_bytes(model.weight_grad_bytes, copies),
    )


def rerun_copies(costs: ModelCosts, schedule: str, shard: str) -> tuple[int, ...]:
    """Per layer, the 16-bit weight copies a recomputing backward's rerun of it holds at its peak
    beside its rebuilt activations (`pipefold.plan.stages.transient_bytes`); () where the step
    holds its casts (the rerun takes the held copies).

    A recomputed stage checkpoints each layer apart, so each backward reruns one layer at a time
    and the rerun's copies die with its activations, before the next layer's (counted on a
    runtime `Stage`: tests/model/test_profile_precision.py). Under full sharding the gathered
    weights are leaves, whose casts autocast caches for the rerun: until it ends, the cache holds
    the layer's biases' copies too (`LayerCost.cast_bytes`). A weight stash's weights (an
    asynchronous schedule) are not leaves, so autocast caches none: a bias's copy dies with its
    product and the rerun holds its weights' copies (`LayerCost.saved_casts`). Costs whose layers
    carry no copies: each layer's weights at the model's ratio."""
    if not casts_every_forward(schedule, shard):
        return ()
    if costs.casts_per_layer:
        if is_asynchronous(schedule):
            return tuple(layer.saved_casts for layer in costs.layers)
        return tuple(layer.cast_bytes for layer in costs.layers)
    ratio = costs.cast_bytes_per_parameter_byte
    return tuple(round(ratio * layer.parameter_bytes) for layer in costs.layers) if ratio else ()


def recast_for(
    model: CostModel, costs: ModelCosts, schedule: str, shard: str, recompute: Collection[int],
    bounds: Sequence[int],
) -> CostModel:
    """`model` as `schedule` under `shard` runs it: `recast_every_forward` where it holds no casts."""
    if casts_every_forward(schedule, shard):
        return recast_every_forward(model, costs, recompute, bounds)
    return model


def without_held_casts(memory: Sequence[RankMemory]) -> tuple[RankMemory, ...]:
    """`memory` with no copies held for the step (they are in the activations instead)."""
    return tuple(replace(rank, casts=0) for rank in memory)


def _plus(values: Sequence[float], extra: Sequence[float]) -> tuple[float, ...]:
    return tuple(value + more for value, more in zip(values, extra, strict=True))


def _plus_bytes(values: Sequence[int], extra: Sequence[int]) -> tuple[int, ...]:
    return tuple(value + more for value, more in zip(values, extra, strict=True))
