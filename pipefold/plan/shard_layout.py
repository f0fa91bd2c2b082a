"""What each data-parallel layout costs one pipeline rank: replicate, ZeRO-1 or full sharding.

    bytes_ = layout_bytes(owned, num_data_parallel=2, layout="full")   # at rest and at the step's peak
    layout, why = choose_layout(owned, num_data_parallel=2, memory_limit=2**30, activations=...)

`owned` is the bytes of the rank's stages' weights (one version, as `CostModel.weight_bytes`
summed over the rank's stages, a weight several of them hold counted once, as one FSDP unit
holds it: `pipefold.plan.shard_search.StageTies.bytes_of`). Gradients and optimizer state scale
with it as in `ModelCosts` (`gradient_bytes_per_parameter_byte`,
`optimizer_bytes_per_parameter_byte`).
Under full sharding `gathered` is the most whole weights a rank holds at once during a step:
all its stages by default, one unit (a stage, or the stages that hold one weight) with
`free_between_microbatches` (`pipefold.plan.shard_search.gathered_bytes` walks it for a family).
No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipefold.errors import ConfigError
from pipefold.plan.degree import allgather_time, allreduce_time
from pipefold.simulate import Link

__all__ = ["LAYOUTS", "LayoutBytes", "choose_layout", "layout_bytes"]

LAYOUTS = ("replicate", "zero1", "full")
"""In the order `choose_layout` prefers them: replication's all-reduce overlaps the drain
(per stage, after its last backward) and nothing is gathered; ZeRO-1 adds an all-gather of the
updated weights after the optimizer; full sharding gathers weights inside the step."""


@dataclass(frozen=True)
class LayoutBytes:
    """One rank's bytes under one layout, and the data-parallel time it adds per step."""

    layout: str
    weights: int
    """At rest (between steps): whole, or this rank's 1/dp shards under full sharding."""
    gradients: int
    """After the step: whole, or the reduce-scattered shards under full sharding."""
    optimizer: int
    """The optimizer state this rank keeps (1/dp under ZeRO-1 and full sharding)."""
    gathered: int
    """Full sharding: the whole weights held at once during a step (the gather buffers)."""
    step_peak: int
    """The most of these during a step: with full sharding the shards, the gathered weights and
    the whole gradients accumulating until their reduce-scatter."""
    communication_s: float
    """Per step, over the replicas' link: the ring all-reduce of the gradients (replicate),
    plus the all-gather of the updated weights (ZeRO-1), or the weight all-gathers and the
    gradient reduce-scatter (full)."""

    @property
    def at_rest(self) -> int:
        return self.weights + self.gradients + self.optimizer


def layout_bytes(
    owned: int,
    *,
    num_data_parallel: int,
    layout: str,
    gradient_bytes_per_parameter_byte: float = 1.0,
    optimizer_bytes_per_parameter_byte: float = 2.0,
    gathered: int | None = None,
    gathers_per_step: float = 1.0,
    link: Link | None = None,
) -> LayoutBytes:
    """One rank's bytes under `layout` (see the module docstring). Shards are rounded up, as
    a tensor split over dp replicas is (FSDP pads the last shard). `gathers_per_step`: how many
    times each unit's weights are gathered per step (1 unless freed between micro-batches;
    `pipefold.schedule.gathers_per_step` counts them for a sharded schedule)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout = {layout!r}; use one of {', '.join(LAYOUTS)}")
    dp = num_data_parallel
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"num_data_parallel = {dp!r}; give an integer >= 1")
    if layout != "replicate" and dp == 1:
        raise ConfigError(f"layout {layout!r} shards over data-parallel replicas and there are none (dp=1)")
    link = link or Link()
    gradients = round(owned * gradient_bytes_per_parameter_byte)
    optimizer = round(owned * optimizer_bytes_per_parameter_byte)

    def share(num_bytes: int) -> int:
        return -(-num_bytes // dp)

    reduce_s = allreduce_time(gradients, dp, link)
    if layout == "replicate":
        total = owned + gradients + optimizer
        return LayoutBytes(layout, owned, gradients, optimizer, 0, total, reduce_s)
    if layout == "zero1":
        total = owned + gradients + share(optimizer)
        return LayoutBytes(
            layout, owned, gradients, share(optimizer), 0, total, reduce_s + allgather_time(owned, dp, link)
        )
    whole = owned if gathered is None else gathered
    # A reduce-scatter moves what an all-gather of the result moves.
    seconds = gathers_per_step * allgather_time(owned, dp, link) + allgather_time(gradients, dp, link)
    peak = share(owned) + whole + gradients + share(optimizer)
    return LayoutBytes(layout, share(owned), share(gradients), share(optimizer), whole, peak, seconds)


def choose_layout(
    owned: int,
    *,
    num_data_parallel: int,
    memory_limit: float,
    activations: int = 0,
    gradient_bytes_per_parameter_byte: float = 1.0,
    optimizer_bytes_per_parameter_byte: float = 2.0,
    gathered: int | None = None,
    link: Link | None = None,
) -> tuple[str | None, dict[str, str]]:
    """The first of `LAYOUTS` whose step peak plus `activations` fits `memory_limit`, with the
    reason for each layout (why it was taken or passed over); None when none fits. With one
    replica only "replicate" is considered."""
    reasons: dict[str, str] = {}
    chosen: str | None = None
    for layout in LAYOUTS if num_data_parallel > 1 else ("replicate",):
        found = layout_bytes(
            owned, num_data_parallel=num_data_parallel, layout=layout,
            gradient_bytes_per_parameter_byte=gradient_bytes_per_parameter_byte,
            optimizer_bytes_per_parameter_byte=optimizer_bytes_per_parameter_byte,
            gathered=gathered, link=link,
        )
        need = found.step_peak + activations
        if chosen is not None:
            reasons[layout] = f"not needed: {chosen} fits and moves less inside the step"
        elif need <= memory_limit:
            chosen = layout
            reasons[layout] = f"fits: {need} bytes at the step's peak <= {memory_limit:.0f}"
        else:
            reasons[layout] = f"over the limit: {need} bytes at the step's peak > {memory_limit:.0f}"
    return chosen, reasons
