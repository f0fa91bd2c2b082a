"""A rank's actions priced slower the more activation memory the rank holds.

    slope = fit_held_slope(base_seconds, more_seconds, base_bytes, more_bytes, kind="F")
    peaks = order_held_bytes(costs, bounds, rows, "gpipe", num_ranks, num_microbatches)
    model = with_held_cost(model, costs, placement, peaks)       # F, I, W and B per rank

On a CPU host a rank's actions run slower while it holds more activations: GPipe on 1F1B's own
two stages (the same layers, calls and messages) ran F 1.23-1.26x and B 1.06-1.12x 1F1B's,
holding 4-8x the bytes (docs/decisions.md, "A stage costs what its layers cost, with no
part of its own"). The calibration measures 1F1B, which holds the least, so without this term
a candidate that holds more is priced too cheaply. `pipefold plan --profile`'s calibration runs a short GPipe block on
its stages and fits, per action kind, the extra fraction of an action's time per byte held
(`ModelCosts.held_forward_per_byte`, `held_backward_per_byte`); the planner then slows each
rank's actions by `1 + slope * max(0, held - ModelCosts.held_reference_bytes)`, held being the
rank's activation peak in the planner's memory model (which the order fixes, not the timing).

The bytes on both sides are the planner's modelled peaks, not the run's measured ones: the
slope is applied to modelled bytes, so a model that counts a byte more or less than the
runtime does would otherwise scale the slope by its error. A factor never below 1 keeps every
lower bound on the step (`pipefold.plan.bounds`, `pipefold.plan.held`) valid: they are taken on
the unslowed costs. Costs without a fitted slope (hardware presets, profiles without the block)
price as before, and nothing extra is computed for them (`prices_held`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.orders import family_schedule
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link, simulate

__all__ = ["fit_held_slope", "held_extra", "order_held_bytes", "prices_held", "with_held_cost"]


def prices_held(costs: ModelCosts) -> bool:
    """Whether `costs` slow a rank's actions by the activations it holds (a fitted slope)."""
    return costs.held_forward_per_byte > 0 or costs.held_backward_per_byte > 0


def fit_held_slope(
    base_seconds: Sequence[float], more_seconds: Sequence[float], base_bytes: Sequence[float],
    more_bytes: Sequence[float], kind: str = "F",
) -> float:
    """The extra fraction of an action's time per byte its rank holds: per stage, the same action
    measured while its rank held `base_bytes` and `more_bytes` (`base_seconds`, `more_seconds`),
    fitted as `more / base - 1 = slope * (more_bytes - base_bytes)` by least squares through the
    origin over the stages. Kept >= 0: a negative fit is noise, and a factor below 1 would break
    the search's lower bounds. `kind` names the action in errors."""
    lengths = {"base_seconds": len(base_seconds), "more_seconds": len(more_seconds),
               "base_bytes": len(base_bytes), "more_bytes": len(more_bytes)}
    if len(set(lengths.values())) != 1 or not base_seconds:
        raise ConfigError(f"held-memory fit of {kind}: lengths {lengths}; give one value per stage in each "
                          "(the same stages measured twice)")
    for name, values in (("base_seconds", base_seconds), ("more_seconds", more_seconds),
                         ("base_bytes", base_bytes), ("more_bytes", more_bytes)):
        bad = [value for value in values if not value > 0]
        if bad:
            raise ConfigError(f"held-memory fit of {kind}: {name} holds {bad[0]!r}; give positive values "
                              "(an action's seconds, a rank's activation bytes held)")
    deltas = [more - base for base, more in zip(base_bytes, more_bytes, strict=True)]
    if all(delta <= 0 for delta in deltas):
        raise ConfigError(f"held-memory fit of {kind}: more_bytes {list(more_bytes)} is nowhere above "
                          f"base_bytes {list(base_bytes)}; measure a block that holds more (gpipe against 1f1b)")
    slowdowns = [more / base - 1 for base, more in zip(base_seconds, more_seconds, strict=True)]
    slope = sum(s * d for s, d in zip(slowdowns, deltas, strict=True)) / sum(d * d for d in deltas)
    return max(slope, 0.0)


def held_extra(costs: ModelCosts, peaks: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """Per rank, the extra fraction of its F and of its B (I and W alike) for holding `peaks[rank]`
    activation bytes: slope times the bytes beyond `costs.held_reference_bytes` (none below it)."""
    extra = []
    for peak in peaks:
        beyond = max(0.0, float(peak) - costs.held_reference_bytes)
        extra.append((costs.held_forward_per_byte * beyond, costs.held_backward_per_byte * beyond))
    return tuple(extra)


def with_held_cost(model: CostModel, costs: ModelCosts, placement: Sequence[int], peaks: Sequence[int]
                   ) -> CostModel:
    """`model` with each stage's F scaled by `1 +` its rank's F extra and its I, W and B by `1 +`
    the B extra (`held_extra`); `model` itself where no rank holds more than the reference."""
    extra = held_extra(costs, peaks)
    if all(f == 0 and b == 0 for f, b in extra):
        return model
    forward = [1 + extra[placement[stage]][0] for stage in range(model.num_stages)]
    backward = [1 + extra[placement[stage]][1] for stage in range(model.num_stages)]
    return replace(
        model,
        f=tuple(t * k for t, k in zip(model.f, forward, strict=True)),
        i=tuple(t * k for t, k in zip(model.i, backward, strict=True)),
        w=tuple(t * k for t, k in zip(model.w, backward, strict=True)),
        b=tuple(t * k for t, k in zip(model.b, backward, strict=True)),
    )


def order_held_bytes(costs: ModelCosts, bounds: Sequence[int], rows: int, family: str, num_ranks: int,
                     num_microbatches: int) -> tuple[int, ...]:
    """Per rank, the activation peak the planner's memory model gives `family` (one stage per rank)
    on the partition `bounds` at `rows` per micro-batch, no stage recomputed: what a calibration
    block held, in the units the planner prices candidates in."""
    model = stage_cost_model(costs, StageLayout(tuple(bounds), rows), (), Link())
    schedule = family_schedule(family, num_ranks, num_microbatches, 1)
    return tuple(simulate(schedule, model).activation_bytes_peak)
