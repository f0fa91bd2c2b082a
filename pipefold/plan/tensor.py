"""The tensor-parallel degree: what one tp rank's share of each layer costs.

[Note: tensor-parallel cost model]
With `tp` ranks per stage (the runtime's "tp" mesh dim, docs/parallelism.md), every tp
rank of a stage runs the schedule on its slice of the split layers, so the planner
plans one tp rank: `split_costs(costs, tp, link)` is the model as one tp rank sees it,
and the rest of the search (partition, schedule, recompute, memory) runs on it
unchanged. Per layer, with share s = `tensor_parallel_share` and n =
`num_tensor_parallel_allreduces`:
- time: forward and backward (both halves) take (1 - s + s / tp) of the layer's; the
  part s is divided, the rest (layer norms, residual adds) runs whole on every tp rank;
- communication: each forward adds n ring all-reduces of the layer's output over the tp
  ranks (Megatron's row-parallel outputs), and each backward's input-gradient half (I,
  or B whole) n of the input gradient, as large: 2 (tp - 1) / tp x bytes / bandwidth,
  which scales with rows like the rest of the layer, plus 2 (tp - 1) x latency per
  all-reduce, which does not (`LayerCost.fixed_s`). W communicates nothing;
- memory: parameter bytes (and so gradients and optimizer state) take (1 - s + s / tp);
  activation bytes (1 - a + a / tp) with a = `tensor_parallel_activation_share`
  (Megatron without sequence parallelism keeps the layer-norm inputs and outputs whole
  on every tp rank: a = 0.75 for a GPT block);
- stage boundaries stay whole (every tp rank sends the whole boundary to its peer in
  the next stage), so `output_bytes` is unchanged.
The devices are then dp x pp x tp. Only flush schedules: the runtime refuses
asynchronous ones with tensor parallelism (their weight stashes copy whole tensors).
"""

from __future__ import annotations

from dataclasses import replace

from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.simulate import Link

__all__ = ["gpt_block_parameters", "split_costs", "with_gpt_tensor_parallel"]


def _allreduce(num_bytes: float, degree: int, link: Link) -> tuple[float, float]:
    """(seconds that scale with the bytes, fixed seconds) of one ring all-reduce over `degree` ranks."""
    steps = 2 * (degree - 1)
    return steps / degree * num_bytes / link.bandwidth, steps * link.latency


def _split_layer(layer: LayerCost, degree: int, link: Link) -> LayerCost:
    share = layer.tensor_parallel_share
    if share == 0:
        return layer
    keep = 1 - share + share / degree
    activation_share = share if layer.tensor_parallel_activation_share is None else (
        layer.tensor_parallel_activation_share
    )
    n = layer.num_tensor_parallel_allreduces
    moving, fixed = _allreduce(layer.output_bytes, degree, link)
    weight = layer.weight_s * keep
    return replace(
        layer,
        forward_s=layer.forward_s * keep + n * moving,
        # The backward's all-reduces are the input-gradient half's: W keeps its share only.
        backward_s=layer.backward_s * keep + n * moving,
        weight_grad_s=weight,
        fixed_s=layer.fixed_s + n * fixed,
        activation_bytes=round(layer.activation_bytes * (1 - activation_share + activation_share / degree)),
        parameter_bytes=round(layer.parameter_bytes * keep),
        # What is left of the layer is a tp rank's slice: it does not split again.
        tensor_parallel_share=0.0,
        tensor_parallel_activation_share=None,
        num_tensor_parallel_allreduces=0,
    )


def split_costs(costs: ModelCosts, degree: int, link: Link) -> ModelCosts:
    """`costs` as one of `degree` tensor-parallel ranks sees them (see [Note: tensor-parallel cost
    model]); `link` is the one between the tp ranks of a stage. Degree 1 returns `costs`."""
    if degree == 1:
        return costs
    layers = tuple(_split_layer(layer, degree, link) for layer in costs.layers)
    source = f"{costs.source}; split {degree} ways by tensor parallelism" if costs.source else ""
    return replace(costs, layers=layers, source=source, tensor_parallel_degrees=())


def gpt_block_parameters(d_model: int) -> int:
    """A GPT decoder block's parameters: 12 d^2 for q/k/v, the projection and the 4x MLP, 13 d
    for their biases and the two layer norms."""
    return 12 * d_model * d_model + 13 * d_model


def with_gpt_tensor_parallel(
    costs: ModelCosts, *, num_layers: int, d_model: int, num_heads: int
) -> ModelCosts:
    """The built-in GPT's costs (layers of `pipefold.model.zoo.gpt_layers`) with its decoder
    blocks marked as `gpt_tensor_parallel_plan` splits them: attention by heads and the MLP,
    every weight but the two layer norms and the row-split linears' biases, two all-reduces
    per forward (and two per backward), three quarters of the activations (the
    layer norms' inputs and outputs stay whole), degrees dividing `num_heads`."""
    d = d_model
    parameters = gpt_block_parameters(d)
    split = parameters - 6 * d  # all but 2 layer norms (4d) and the proj / fc_out biases (2d)
    blocks = range(2, 2 + num_layers)
    layers = tuple(
        replace(
            layer,
            tensor_parallel_share=split / parameters,
            tensor_parallel_activation_share=0.75,
            num_tensor_parallel_allreduces=2,
        )
        if index in blocks
        else layer
        for index, layer in enumerate(costs.layers)
    )
    degrees = tuple(t for t in range(1, num_heads + 1) if num_heads % t == 0)
    return replace(costs, layers=layers, tensor_parallel_degrees=degrees)
