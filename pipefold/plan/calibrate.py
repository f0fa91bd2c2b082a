"""Measured costs made to extrapolate over rows, and the step's costs outside the actions.

    costs = with_fixed_costs(ModelCosts.from_profile(at_4, rows=4), ModelCosts.from_profile(at_1, rows=1))
    costs = replace(costs, action_overhead_s=..., update_s_per_parameter_byte=...)  # measured by the runtime
    update_time(costs, weights_per_rank)   # seconds the step spends on the optimizer update
    model = first_stage_backward(stage_cost_model(costs, layout, ...), costs, layout.bounds)

The planner scales a layer's measured time linearly with the micro-batch's rows
(docs/decisions.md, "Cost scaling"). A layer of small tensors is not linear: every call pays
its torch calls' fixed cost whatever the rows, so costs measured at 4 rows, scaled to 1 row,
price one-row micro-batches too cheaply and many micro-batches look free. `with_fixed_costs`
takes the same layers measured at two row counts and splits each layer's F and B into a fixed
part per call (`LayerCost.fixed_s`) and a part per row, which reproduces both measurements'
F + B (docs/decisions.md, "Fixed cost per call").

Each layer's I is profiled with a float input that takes a gradient, but the first stage of a
model fed token ids has no input gradient to compute: the runtime's I of that stage only
enters and leaves and its W runs the whole backward (docs/plan.md, "What the one-process
profile misprices"). `first_stage_backward` moves that stage's I, but for its fixed cost per
call, into its W (B is unchanged), so the simulator places the first stage's backward work
where the runtime runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.simulate import CostModel

__all__ = ["first_stage_backward", "fixed_seconds", "update_time", "with_fixed_costs"]


def fixed_seconds(at_rows: LayerCost, rows: int, at_other: LayerCost, other_rows: int) -> float:
    """One layer's seconds per call that do not scale with rows: the mean of the F and B
    intercepts of the lines through the two measurements, kept within [0, the smaller of F and B
    at `rows`] (a negative intercept is measurement noise; a fixed part larger than an action
    would leave it a negative share per row)."""
    if rows == other_rows:
        raise ConfigError(f"rows = other_rows = {rows}; measure the layers at two different row counts")
    intercepts = []
    for here, there in ((at_rows.forward_s, at_other.forward_s), (at_rows.backward_s, at_other.backward_s)):
        slope = (there - here) / (other_rows - rows)
        intercepts.append(here - slope * rows)
    ceiling = min(at_rows.forward_s, at_rows.backward_s) if at_rows.backward_s > 0 else 0.0
    return min(max(sum(intercepts) / len(intercepts), 0.0), ceiling)


def with_fixed_costs(costs: ModelCosts, other: ModelCosts) -> ModelCosts:
    """`costs` (measured at its `reference_rows`) with each layer's fixed seconds per call, fitted
    against `other`, the same layers measured at other rows: the fixed part moves from
    `forward_s` and `backward_s` (and W's share of the backward) into `fixed_s`."""
    if other.num_layers != costs.num_layers:
        raise ConfigError(
            f"the two measurements have {costs.num_layers} and {other.num_layers} layers; measure the same "
            "model at both row counts"
        )
    layers = []
    for layer, again in zip(costs.layers, other.layers, strict=True):
        fixed = fixed_seconds(layer, costs.reference_rows, again, other.reference_rows)
        backward = layer.backward_s - fixed if layer.backward_s > 0 else 0.0
        weight = layer.weight_grad_s
        if weight is not None and layer.backward_s > 0:
            weight *= backward / layer.backward_s  # W keeps its share of what scales with rows
        layers.append(replace(layer, forward_s=layer.forward_s - fixed, backward_s=backward,
                              weight_grad_s=weight, fixed_s=layer.fixed_s + fixed))
    rows = f"{other.reference_rows} row{'s' if other.reference_rows > 1 else ''}"
    source = f"{costs.source}; fixed cost per call fitted against {rows}"
    return replace(costs, layers=tuple(layers), source=source)


def update_time(costs: ModelCosts, weight_bytes_per_rank: Sequence[int]) -> float:
    """Seconds of the step outside the pipeline's actions: the optimizer update (step, zero_grad,
    the gradient norm) of the rank holding the most parameter bytes, which the others wait for
    at the next step's first exchange."""
    largest = max(weight_bytes_per_rank, default=0)
    return costs.update_s_per_parameter_byte * largest


def first_stage_backward(model: CostModel, costs: ModelCosts, bounds: Sequence[int]) -> CostModel:
    """`model` (the stage costs of the partition `bounds`) with the first stage's I moved into its
    W where the model input takes no gradient (`costs.input_requires_grad` false: token ids).
    Its I keeps the layers' fixed seconds per call (and a recomputed stage's forward, which the
    runtime reruns there); B is unchanged."""
    if costs.input_requires_grad or not bounds or bounds[0] != 0 or model.num_stages == 0:
        return model
    own = sum(layer.fixed_s for layer in costs.layers[bounds[0]:bounds[1]])
    # b = fixed + own + I + W and w = fixed + W (a recomputed stage adds its forward to both),
    # so b - w - own is the stage's I work, whatever the rows, speeds and recompute were.
    moved = max(model.b[0] - model.w[0] - own, 0.0)
    moved = min(moved, model.i[0])
    if moved == 0.0:
        return model
    i = (model.i[0] - moved, *model.i[1:])
    w = (model.w[0] + moved, *model.w[1:])
    return replace(model, i=i, w=w)
