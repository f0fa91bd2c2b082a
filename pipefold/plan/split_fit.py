"""The split backward's price from a calibration run's split block ("1f1b+split": 1F1B's order
with each B run as I then W, on the same stages): what I and W take beyond B, as a share of
each stage's backward work and in seconds per action, and W's share of each stage's backward.

    priced, fit = split_prices(costs, run, split, layout, split_stages, load, held_backward)
    fit.weight_share          # per stage, W's share of its backward as measured
    priced.split_backward_share, priced.split_overhead_s

Used by `pipefold.plan.calibrate.at_run_prices` (docs/plan.md, "Forecast and measurement").

    prior = profile_split_share(layer_split, layout.bounds, split_stages)   # the profile's estimate
    share = pooled_split_share(block_share, prior)

The split block's share comes from three kept steps and moves between calibrations (24 quiet
stored ones: 0.008-0.066 of the stage's backward work, quartiles 0.030-0.050; a quiet planner
run fitted 0.019 where the two before it fitted 0.050 and 0.054). The one-process profile that
`plan --profile` runs first times each layer's I, W and B apart, so its `(I + W - B) / 2B` over
the same stages is a second, independent estimate of the same share (nine profiles of train's
default GPT, layers 4:8 at 4 rows: 0.026-0.068, median 0.050, quartiles 0.031-0.053;
BENCHMARKS.md, "A deferred W's extra over rows; the split share pooled"), as spread as the
blocks and centred near them: the two are averaged with equal weights (inverse-variance weights
of equal spreads), so one noisy block moves the priced share half as far.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.stages import StageLayout
from pipefold.simulate import CostModel

__all__ = ["SplitFit", "pooled_split_share", "profile_split_share", "ratio", "split_prices"]


def ratio(measured: float, priced: float) -> float:
    """`measured / priced`, 1.0 where either is not positive (nothing to scale by)."""
    return measured / priced if measured > 0 and priced > 0 else 1.0


@dataclass(frozen=True)
class SplitFit:
    weight_share: tuple[float, ...] = ()
    action_overhead_s: float = 0.0
    block_share: float = 0.0
    """The split block's own `split_backward_share`, before it was pooled with the profile's."""
    profile_share: float | None = None
    """The profile's estimate of it (`profile_split_share`); None: none given."""


def profile_split_share(layer_split: Sequence[tuple[float, float, float]], bounds: Sequence[int],
                        split_stages: Collection[int]) -> float | None:
    """The one-process profile's estimate of `ModelCosts.split_backward_share` on the calibration's
    partition `bounds`: per stage in `split_stages`, half of what its layers' I + W took beyond
    their B, over that B (`layer_split`: per layer, the profile's (I, W, B) seconds), the stages'
    mean, kept in [0, `_LARGEST_SPLIT_SHARE`] as the block's fit is. None where no such stage has
    a timed backward (a profile without the I/W split, or no split stage)."""
    if len(layer_split) != bounds[-1]:
        raise ConfigError(f"the profile's I/W split has {len(layer_split)} layers, the partition "
                          f"{tuple(bounds)} covers {bounds[-1]}; give one (I, W, B) per profiled layer")
    shares = []
    for stage, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if stage not in split_stages:
            continue
        backward = sum(b for _, _, b in layer_split[start:stop])
        if backward > 0:
            shares.append(sum(i + w - b for i, w, b in layer_split[start:stop]) / (2 * backward))
    if not shares:
        return None
    return min(max(statistics.fmean(shares), 0.0), _LARGEST_SPLIT_SHARE)


def pooled_split_share(block: float, profile: float | None) -> float:
    """The split share priced: the mean of the block's fit and the profile's estimate, which
    measure the same share apart and read alike on this host's stored runs (module docstring);
    the block's alone without a profile's."""
    return block if profile is None else (block + profile) / 2


def split_prices(costs: ModelCosts, run: CostModel, split: CostModel, layout: StageLayout,
                  split_stages: frozenset[int], load: float | None = None,
                  held_backward: Sequence[float] | None = None,
                  layer_split: Sequence[tuple[float, float, float]] | None = None,
                  ) -> tuple[ModelCosts, SplitFit]:
    """`costs` (priced at the run's F and B) with I and W priced as `split` (a split-backward
    phase of the run, same partition, at `layout.rows`) measured them.

    The split block's times are first scaled by the host's drift between the blocks, `load` (the
    calibration's block drift: from the stages that ran 1F1B's actions at its bytes there), or
    where none is given, per stage by the 1F1B block's F over its own (the same F at the same
    size: what moved is the host's load), and divided by each stage's held B factor,
    `held_backward` (its rank's slowdown for the bytes it held beyond 1F1B's, which the held curve
    prices apart, so it is priced once: by the curve, at any candidate's bytes). What each I and W
    takes beyond its part of B: per stage, half of what its I + W took beyond the run's B (less
    the layers' fixed seconds, which I and W pay each: `stage_arrays`) over the stage's backward
    work (B less those seconds), the stages' mean (`split_backward_share`: in one process these
    seconds grew with the rows as B did, 5-7% of it from 1 to 16 rows, so a constant fitted at one
    size priced other sizes wrong); and apart, in seconds per action (`split_overhead_s`), the
    split phase's longer gap between actions (three gaps per micro-batch and stage, paid by I and
    W), which the executor pays whatever the rows (a shorter gap, noise, lowers the share). Then
    each stage's layers move W's share of their backward by one factor, so the stage's W takes the
    measured share of its work; B is unchanged. A first stage fed token ids has no I work (its W
    runs the whole backward: `first_stage_backward`), so its layers take the other stages' mean
    factor, and so does a stage outside `split_stages` (its I and W not run apart), which adds no
    extra. With `layer_split` (the one-process profile's (I, W, B) seconds per layer), the share
    priced is the block's pooled with the profile's estimate (`pooled_split_share`); W's share per
    stage stays the block's."""
    spans = list(zip(layout.bounds, layout.bounds[1:], strict=False))
    # Both blocks ran the same F at the same size: a stage's F moving between them is the host's
    # load, so the split block's times are taken at the 1F1B block's level.
    drift = ([ratio(run.f[stage], split.f[stage]) for stage in range(layout.num_stages)] if load is None
             else [load] * layout.num_stages)
    held = [1.0] * layout.num_stages if held_backward is None else list(held_backward)
    i = [split.i[stage] * drift[stage] / held[stage] for stage in range(layout.num_stages)]
    w = [split.w[stage] * drift[stage] / held[stage] for stage in range(layout.num_stages)]
    measured = [stage for stage in range(layout.num_stages) if stage in split_stages]
    if not measured:
        return costs, SplitFit()
    # Per stage, its backward work in the run (B less the runtime's seconds per layer and action):
    # the split's own seconds inside the actions grow with it (`ModelCosts.split_backward_share`).
    work = {stage: max(run.b[stage] - costs.overhead_s * (spans[stage][1] - spans[stage][0]), 0.0)
            for stage in measured}
    extras = {stage: (i[stage] + w[stage] - run.b[stage]
                      - costs.overhead_s * (spans[stage][1] - spans[stage][0])) / 2 for stage in measured}
    gap = 1.5 * (split.action_overhead * statistics.fmean(drift) - run.action_overhead)
    # Inside the actions' measured seconds, as a share of each stage's work (kept below 0.5: a
    # larger one would leave I or W no part of B).
    inside = _share_of_work([extras[stage] for stage in measured], [work[stage] for stage in measured])
    # The longer gaps between a split stage's actions do not grow with its work: seconds per
    # action; a shorter gap (noise) is taken from the share instead, as from the seconds before.
    extra = max(gap, 0.0)
    share = inside if gap >= 0 else _share_of_work([extras[stage] + gap for stage in measured],
                                                   [work[stage] for stage in measured])
    scale = layout.rows / costs.reference_rows
    layers = list(costs.layers)
    shares: list[float | None] = []
    factors: list[float | None] = []
    for stage, (start, stop) in enumerate(spans):
        if (stage == 0 and not costs.input_requires_grad) or stage not in split_stages:
            shares.append(None)
            factors.append(None)
            continue
        fixed = costs.overhead_s * (stop - start)
        own = sum(layer.fixed_s for layer in layers[start:stop])
        own_split = inside * work[stage]
        weight_work = max(w[stage] - fixed - own_split, 0.0)
        input_work = max(i[stage] - fixed - own - own_split, 0.0)
        weight_now = scale * sum(layer.weight_s for layer in layers[start:stop])
        backward_now = scale * sum(layer.backward_s for layer in layers[start:stop])
        if weight_work + input_work <= 0 or weight_now <= 0:
            shares.append(None)
            factors.append(None)
            continue
        weight_share = weight_work / (weight_work + input_work)
        shares.append(weight_share)
        factors.append(weight_share * backward_now / weight_now)
    known = [factor for factor in factors if factor is not None]
    mean = statistics.fmean(known) if known else 1.0
    for stage, (start, stop) in enumerate(spans):
        factor = factors[stage]
        for index in range(start, stop):
            layer = layers[index]
            weight = min(layer.weight_s * (mean if factor is None else factor), layer.backward_s)
            layers[index] = replace(layer, weight_grad_s=weight)
    # A stage not measured (a first stage of token ids) reports the share its layers now hold.
    shares_now = tuple(
        found if found is not None else _weight_share(layers[start:stop])
        for found, (start, stop) in zip(shares, spans, strict=True))
    prior = None if layer_split is None else profile_split_share(layer_split, layout.bounds, measured)
    pooled = pooled_split_share(share, prior)
    priced = replace(costs, layers=tuple(layers), split_overhead_s=extra, split_backward_share=pooled)
    return priced, SplitFit(shares_now, split.action_overhead, share, prior)


_LARGEST_SPLIT_SHARE = 0.45
"""The most of a stage's backward work the fit lets each I and W take beyond its part of B (a
share of 0.5 or more would leave B no part to split; `ModelCosts.split_backward_share`)."""


def _share_of_work(extras: Sequence[float], work: Sequence[float]) -> float:
    """The stages' mean of each one's extra seconds per split action over its backward work, kept
    in [0, `_LARGEST_SPLIT_SHARE`] (a negative mean is noise); a stage without work counts 0."""
    ratios = [extra / seconds if seconds > 0 else 0.0 for extra, seconds in zip(extras, work, strict=True)]
    return min(max(statistics.fmean(ratios), 0.0), _LARGEST_SPLIT_SHARE)


def _weight_share(layers: Sequence[LayerCost]) -> float:
    backward = sum(layer.backward_s for layer in layers)
    return sum(layer.weight_s for layer in layers) / backward if backward > 0 else 0.0
