"""A rank's actions priced slower the more activation memory the rank holds.

    curve = fit_held_curve(forward_points, backward_points)   # (bytes beyond, ratio) per stage
    peaks = order_held_bytes(costs, bounds, rows, "gpipe", num_ranks, num_microbatches)
    model = with_held_cost(model, costs, placement, peaks, bounds)   # F, I, W and B per stage

On a CPU host a rank's actions run slower while it holds more activations: GPipe on 1F1B's own
two stages (the same layers, calls and messages) ran F 1.23-1.26x and B 1.06-1.12x 1F1B's,
holding 4-8x the bytes (docs/decisions.md, "A stage costs what its layers cost, with no
part of its own"). The calibration measures 1F1B, which holds the least, so without this term
a candidate that holds more is priced too cheaply.

The slowdown is concave in the bytes: zb-h1's last rank, holding ~9 MiB more than in 1F1B,
already ran F 7-11% slower, GPipe's ranks (+48-63 MiB) 11-37% (BENCHMARKS.md, "the lean of v=2
[3,1,1,3] and zb-h2"). So `pipefold plan --profile`'s calibration measures it at every point its
blocks give (GPipe's ranks and, from its zb-h1 block, the ranks that hold more there than in
1F1B) and the costs carry a curve through them (`ModelCosts.held_curve`: knots of bytes beyond
the reference, F factor, B factor; `fit_held_curve`), linear in bytes between knots from
(0, 1, 1), flat past the last (`held_factor`). A layer's reference is what its own calibration
rank held (`ModelCosts.held_reference_layer_bytes`): each layer's measured time is its time at
those bytes, so a layer is slowed by the curve at its rank's activation peak less its own
reference, and a stage by its layers' factors weighted by their time (`stage_held_factors`).
Costs of older calibrations (a slope per byte, `held_forward_per_byte`, over one
`held_reference_bytes`) price as they did: `1 + slope * max(0, peak - reference)`.

The bytes are the planner's modelled peaks, not the run's measured ones: the curve is applied to
modelled bytes, so a model that counts a byte more or less than the runtime does would otherwise
shift it by its error. Every factor is at least 1 (the knots are, and the curve is monotone), so
every lower bound on the step (`pipefold.plan.bounds`, `pipefold.plan.held`), taken on the
unslowed costs, stays valid. Costs without a curve or slope (hardware presets, profiles without
the blocks) price as before, and nothing extra is computed for them (`prices_held`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.deferred_weight import stage_deferred_factors, stage_deferred_shares
from pipefold.plan.held_curve import HeldCurve, check_held_curve, fit_held_curve, held_factor
from pipefold.plan.held_states import stage_state_factors, stage_state_weights
from pipefold.plan.orders import family_schedule
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule.ir import Schedule
from pipefold.schedule.split_backward import SPLIT_SUFFIX, build_named
from pipefold.simulate import CostModel, Link, simulate

__all__ = ["HeldCurve", "check_held_curve", "family_deferred_shares", "family_state_weights",
           "fit_held_curve", "fit_held_slope",
           "held_extra", "held_factor",
           "order_held_bytes", "prices_held", "stage_held_factors", "with_held_cost"]


def prices_held(costs: ModelCosts) -> bool:
    """Whether `costs` slow a rank's actions by the activations it holds (a curve or a fitted slope)."""
    return (bool(costs.held_curve) or costs.held_forward_per_byte > 0 or costs.held_backward_per_byte > 0
            or costs.held_state_forward > 0 or costs.deferred_weight_grad > 0)


def fit_held_slope(
    base_seconds: Sequence[float], more_seconds: Sequence[float], base_bytes: Sequence[float],
    more_bytes: Sequence[float], kind: str = "F",
) -> float:
    """The extra fraction of an action's time per byte its rank holds, a straight line: per stage,
    the same action measured while its rank held `base_bytes` and `more_bytes` (`base_seconds`,
    `more_seconds`), fitted as `more / base - 1 = slope * (more_bytes - base_bytes)` by least
    squares through the origin over the stages (what calibrations priced before `fit_held_curve`).
    Kept >= 0: a negative fit is noise, and a factor below 1 would break the search's lower
    bounds. `kind` names the action in errors."""
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
                          f"base_bytes {list(base_bytes)}; measure a block that holds more "
                          "(gpipe against 1f1b)")
    slowdowns = [more / base - 1 for base, more in zip(base_seconds, more_seconds, strict=True)]
    slope = sum(s * d for s, d in zip(slowdowns, deltas, strict=True)) / sum(d * d for d in deltas)
    return max(slope, 0.0)


def _factors(costs: ModelCosts, peak: float, reference: float) -> tuple[float, float]:
    """F and B factors of a layer whose calibration rank held `reference` bytes, on a rank that
    holds `peak`."""
    if costs.held_curve:
        return held_factor(costs.held_curve, float(peak) - reference)
    beyond = max(0.0, float(peak) - reference)
    return 1 + costs.held_forward_per_byte * beyond, 1 + costs.held_backward_per_byte * beyond


def _layers_factor(costs: ModelCosts, start: int, stop: int, peak: float) -> tuple[float, float]:
    """F and B factors of layers [start, stop) on a rank holding `peak` bytes: one layer's, where
    they share one reference (older costs: every layer), else their factors weighted by their
    time at the reference rows (F: forward and fixed seconds; B: backward and fixed)."""
    references = costs.held_reference_layer_bytes
    if not references or len(set(references[start:stop])) <= 1:
        reference = references[start] if references and stop > start else costs.held_reference_bytes
        return _factors(costs, peak, reference)
    layers = costs.layers[start:stop]
    factors = [_factors(costs, peak, references[index]) for index in range(start, stop)]
    result = []
    for kind, weights in ((0, [layer.forward_s + layer.fixed_s for layer in layers]),
                          (1, [layer.backward_s + layer.fixed_s for layer in layers])):
        total = sum(weights)
        if total <= 0:
            weights, total = [1.0] * len(layers), float(len(layers))
        result.append(sum(w * factor[kind] for w, factor in zip(weights, factors, strict=True)) / total)
    return result[0], result[1]


def _check_stages(bounds: Sequence[int], placement: Sequence[int], peaks: Sequence[int]) -> None:
    if len(bounds) != len(placement) + 1 or any(rank < 0 or rank >= len(peaks) for rank in placement):
        raise ConfigError(f"held-memory price: bounds {list(bounds)} for placement {list(placement)} over "
                          f"{len(peaks)} ranks' peaks; give one bound more than stages, each stage on a rank "
                          "with a peak")


def stage_held_factors(
    costs: ModelCosts, bounds: Sequence[int], placement: Sequence[int], peaks: Sequence[int]
) -> tuple[tuple[float, float], ...]:
    """Per stage of the partition `bounds` (stage s on rank `placement[s]`), the factor of its F
    and of its B, I and W for the activations its rank holds (`peaks[rank]`)."""
    _check_stages(bounds, placement, peaks)
    return tuple(_layers_factor(costs, start, stop, peaks[rank])
                 for start, stop, rank in zip(bounds, bounds[1:], placement, strict=False))


def held_extra(costs: ModelCosts, peaks: Sequence[int], placement: Sequence[int], bounds: Sequence[int],
               state_weights: Sequence[float] = ()) -> tuple[tuple[float, float], ...]:
    """Per rank, the extra fraction of its F and of its B (I and W alike) for holding `peaks[rank]`
    activation bytes (and, with `state_weights`, F for the I states it holds: `with_held_cost`):
    its stages' factors (`_layers_factor`) weighted by their layers' time, less 1."""
    _check_stages(bounds, placement, peaks)
    states = _state_factors(costs, state_weights, len(bounds) - 1)
    extra = []
    for rank, peak in enumerate(peaks):
        parts = [(_with_states(_layers_factor(costs, start, stop, peak), states[stage]),
                  sum(layer.forward_s + layer.fixed_s for layer in costs.layers[start:stop]),
                  sum(layer.backward_s + layer.fixed_s for layer in costs.layers[start:stop]))
                 for stage, (start, stop, on) in enumerate(zip(bounds, bounds[1:], placement, strict=False))
                 if on == rank]
        forward = _weighted([(factor[0], weight) for factor, weight, _ in parts])
        backward = _weighted([(factor[1], weight) for factor, _, weight in parts])
        extra.append((forward - 1, backward - 1))
    return tuple(extra)


def _state_factors(costs: ModelCosts, state_weights: Sequence[float], num_stages: int) -> tuple[float, ...]:
    """Per stage, its F's I-state factor (`stage_state_factors`), 1 where the costs price none or
    no weights are given; refused where the weights are not the partition's stages'."""
    if not state_weights or costs.held_state_forward <= 0:
        return (1.0,) * num_stages
    if len(state_weights) != num_stages:
        raise ConfigError(f"held I-state price: state_weights for {len(state_weights)} stages, the partition "
                          f"{num_stages}; price the order on its own partition")
    return stage_state_factors(state_weights, costs.held_state_forward)


def _with_states(factors: tuple[float, float], state_factor: float) -> tuple[float, float]:
    """F and B factors with F's I-state factor in (B holds no I state)."""
    return factors[0] * state_factor, factors[1]


def _weighted(pairs: Sequence[tuple[float, float]]) -> float:
    """The mean of (value, weight) pairs by weight (alike where the weights are 0; 1 for none)."""
    if not pairs:
        return 1.0
    total = sum(weight for _, weight in pairs)
    if total <= 0:
        return sum(value for value, _ in pairs) / len(pairs)
    return sum(value * weight for value, weight in pairs) / total


def _deferred_factors(costs: ModelCosts, deferred_shares: Sequence[float], num_stages: int,
                      weight_s: Sequence[float]) -> tuple[float, ...]:
    """Per stage, its W's factor for running away from its own I (`stage_deferred_factors`; its
    extra seconds capped by `ModelCosts.deferred_weight_most_s` against the stage's W, `weight_s`),
    1 where the costs price none or no shares are given; refused where the shares are not the
    partition's stages'."""
    if not deferred_shares or costs.deferred_weight_grad <= 0:
        return (1.0,) * num_stages
    if len(deferred_shares) != num_stages:
        raise ConfigError(f"deferred W price: deferred_shares for {len(deferred_shares)} stages, the "
                          f"partition {num_stages}; price the order on its own partition")
    factors = stage_deferred_factors(deferred_shares, costs.deferred_weight_grad,
                                     costs.deferred_weight_most_s, weight_s)
    if not costs.input_requires_grad:
        # A first stage fed token ids has no I work: its W is its whole backward, a B wherever it
        # runs (`pipefold.plan.calibrate.first_stage_backward`), not a W reading I's gradients.
        factors = (1.0, *factors[1:])
    return factors


def with_held_cost(model: CostModel, costs: ModelCosts, placement: Sequence[int], peaks: Sequence[int],
                   bounds: Sequence[int], state_weights: Sequence[float] = (),
                   deferred_shares: Sequence[float] = ()) -> CostModel:
    """`model` (the stages of the partition `bounds`) with each stage's F scaled by its F factor and
    its I, W and B by its B factor (`stage_held_factors`); `model` itself where every factor is 1.
    With `state_weights` (the order's `pipefold.plan.held_states.stage_state_weights`) and costs
    that price held I states (`ModelCosts.held_state_forward`), each stage's F also by its
    I-state factor (`stage_state_factors`); empty: none counted. With `deferred_shares` (the
    order's `pipefold.plan.deferred_weight.stage_deferred_shares`) and costs that price a W away
    from its I (`ModelCosts.deferred_weight_grad`), each stage's W also by that factor (its extra
    seconds at most `ModelCosts.deferred_weight_most_s`, against the stage's W in `model`)."""
    factors = stage_held_factors(costs, bounds, placement, peaks)
    states = _state_factors(costs, state_weights, len(factors))
    late = _deferred_factors(costs, deferred_shares, len(factors), model.w)
    if all(f == 1 and b == 1 for f, b in factors) and all(k == 1 for k in (*states, *late)):
        return model
    forward = [f * k for (f, _), k in zip(factors, states, strict=True)]
    backward = [b for _, b in factors]
    return replace(
        model,
        f=tuple(t * k for t, k in zip(model.f, forward, strict=True)),
        i=tuple(t * k for t, k in zip(model.i, backward, strict=True)),
        w=tuple(t * k * d for t, k, d in zip(model.w, backward, late, strict=True)),
        b=tuple(t * k for t, k in zip(model.b, backward, strict=True)),
    )


@functools.lru_cache(maxsize=256)
def family_deferred_shares(family: str, num_ranks: int, num_microbatches: int, num_virtual: int
                           ) -> tuple[float, ...]:
    """`stage_deferred_shares` of a family's order, kept per order (as `family_state_weights`)."""
    return stage_deferred_shares(_family_order(family, num_ranks, num_microbatches, num_virtual))


@functools.lru_cache(maxsize=256)
def family_state_weights(family: str, num_ranks: int, num_microbatches: int, num_virtual: int
                         ) -> tuple[float, ...]:
    """`stage_state_weights` of a family's order (`FAMILY+split` as `order_held_bytes` builds it),
    kept per order (a tuple of floats per stage): the planner prices each family at many partitions."""
    return stage_state_weights(_family_order(family, num_ranks, num_microbatches, num_virtual))


def _family_order(family: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """A family's order as the planner prices it (`family_schedule`), or for `FAMILY+split` that
    family with every B split in place (`pipefold.schedule.split_backward`)."""
    if family.endswith(SPLIT_SUFFIX):
        return build_named(family, num_ranks=num_ranks, num_microbatches=num_microbatches,
                           num_virtual=num_virtual)
    return family_schedule(family, num_ranks, num_microbatches, num_virtual)


def order_held_bytes(costs: ModelCosts, bounds: Sequence[int], rows: int, family: str, num_ranks: int,
                     num_microbatches: int) -> tuple[int, ...]:
    """Per rank, the activation peak the planner's memory model gives `family` (one stage per rank;
    `FAMILY+split`: that family with every B split in place, `pipefold.schedule.split_backward`)
    on the partition `bounds` at `rows` per micro-batch, no stage recomputed: what a calibration
    block held, in the units the planner prices candidates in."""
    model = stage_cost_model(costs, StageLayout(tuple(bounds), rows), (), Link())
    return tuple(simulate(_family_order(family, num_ranks, num_microbatches, 1), model).activation_bytes_peak)
