"""A stage's F and B over rows, as the calibration run measured them: `fit_stage_line` fits one
line per stage through its sizes (one fixed part per call shared by F and B, a part per row each),
`priced_on_line` prices the stage's layers on it (the profile giving only their shares), and
`scaled_to_run` scales them to a run measured at one size (`pipefold.plan.calibrate.at_run_prices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.split_fit import ratio
from pipefold.plan.stages import StageLayout
from pipefold.simulate import CostModel

__all__ = ["StageLine", "fit_stage_line", "priced_on_line", "scaled_to_run"]


@dataclass(frozen=True)
class StageLine:
    """One stage's F and B over rows: `fixed_s + forward_s_per_row * rows` and `fixed_s +
    backward_s_per_row * rows` (seconds)."""

    fixed_s: float
    forward_s_per_row: float
    backward_s_per_row: float
    error: float = 0.0
    """The largest relative miss of a measured F or B."""


def fit_stage_line(points: Sequence[tuple[int, float, float]]) -> StageLine:
    """The line through (rows, F seconds, B seconds) measured at two or more row counts, by least
    relative squares. F and B share the fixed part: a layer's fixed seconds per call price its
    forward and its backward alike (`LayerCost.fixed_s`). The fixed part is kept within [0, 90%
    of the smallest measured action] (a negative one is noise; a larger one would leave a part per
    row near zero or negative)."""
    if len({rows for rows, _, _ in points}) < 2:
        raise ConfigError(f"points at rows {[rows for rows, _, _ in points]}; measure two different row "
                          "counts")
    floor = 1e-12  # a zero measurement (no work) weighs as a tiny one
    rows = np.asarray([float(r) for r, _, _ in points])
    f = np.maximum([float(x) for _, x, _ in points], floor)
    b = np.maximum([float(x) for _, _, x in points], floor)
    zeros = np.zeros_like(rows)
    # Each row divided by its measurement: relative misses weigh alike at every size.
    matrix = np.concatenate([np.stack([1 / f, rows / f, zeros], axis=1),
                             np.stack([1 / b, zeros, rows / b], axis=1)])
    solved = np.linalg.lstsq(matrix, np.ones(2 * len(rows)), rcond=None)[0]
    smallest = float(min(f[np.argmin(rows)], b[np.argmin(rows)]))
    fixed = min(max(float(solved[0]), 0.0), 0.9 * smallest)

    def per_row(measured: np.ndarray) -> float:
        # The best part per row with the fixed part set: least relative squares in one unknown.
        weights = rows / measured
        return max(float(np.sum(weights * (measured - fixed) / measured) / np.sum(weights * weights)), 0.0)

    forward, backward = per_row(f), per_row(b)
    error = max(float(np.max(np.abs(fixed + slope * rows - measured) / measured))
                for slope, measured in ((forward, f), (backward, b)))
    return StageLine(fixed, forward, backward, error)


def priced_on_line(layers: Sequence[LayerCost], line: StageLine, reference_rows: int) -> list[LayerCost]:
    """A stage's layers priced on `line`: the fixed part shared in proportion to their fixed
    seconds (else their time, else alike), F and B per row in proportion to theirs (else alike);
    each layer keeps its W share of B."""

    def shares(values: Sequence[float]) -> list[float]:
        total = sum(values)
        return [value / total for value in values] if total > 0 else [1 / len(values)] * len(values)

    fixed = shares([layer.fixed_s for layer in layers]) if sum(layer.fixed_s for layer in layers) > 0 else (
        shares([layer.forward_s + layer.backward_s for layer in layers]))
    forward = shares([layer.forward_s for layer in layers])
    backward = shares([layer.backward_s for layer in layers])
    priced = []
    for index, layer in enumerate(layers):
        b = line.backward_s_per_row * reference_rows * backward[index]
        w_share = 0.5 if layer.weight_grad_s is None or layer.backward_s <= 0 else (
            layer.weight_grad_s / layer.backward_s)
        priced.append(replace(layer, fixed_s=line.fixed_s * fixed[index],
                              forward_s=line.forward_s_per_row * reference_rows * forward[index],
                              backward_s=b,
                              weight_grad_s=None if layer.weight_grad_s is None else b * w_share))
    return priced


def scaled_to_run(costs: ModelCosts, run: CostModel, layout: StageLayout) -> list[LayerCost]:
    """The layers with each stage's F and B scaled to the run's at the layout's rows (one size
    measured: the profile's growth with rows kept)."""
    scale = layout.rows / costs.reference_rows
    layers = list(costs.layers)
    for stage in range(layout.num_stages):
        start, stop = layout.bounds[stage], layout.bounds[stage + 1]
        shared = costs.overhead_s * (stop - start)  # per layer and action, one for the whole model: kept
        own = sum(layer.fixed_s for layer in layers[start:stop])
        forward_rows = scale * sum(layer.forward_s for layer in layers[start:stop])
        backward_rows = scale * sum(layer.backward_s for layer in layers[start:stop])
        f = ratio(run.f[stage] - shared, own + forward_rows)
        # B = shared + own * f + backward_rows * b reproduces the run's B, with the fixed part as F's.
        b = ratio(run.b[stage] - shared - own * f, backward_rows) if backward_rows > 0 else 1.0
        for index in range(start, stop):
            layer = layers[index]
            weight = None if layer.weight_grad_s is None else layer.weight_grad_s * b
            layers[index] = replace(layer, forward_s=layer.forward_s * f, fixed_s=layer.fixed_s * f,
                                    backward_s=layer.backward_s * b, weight_grad_s=weight)
    return layers
