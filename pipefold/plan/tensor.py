"""The tensor-parallel degree: what one tp rank's share of each layer costs.

`split_costs(costs, tp, link)` is the model as one tp rank sees it, and the rest of the
search runs on it unchanged; what it divides, adds and keeps whole, with and without
sequence parallelism: docs/decisions.md, "Tensor-parallel cost model".
"""

from __future__ import annotations

from dataclasses import replace

from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.simulate import Link

__all__ = [
    "GPT_BLOCK_SEQUENCE_PARALLEL_SHARE",
    "LinearCosts",
    "gpt_block_cast_parameters",
    "gpt_block_parameters",
    "split_costs",
    "tensor_parallel_problem",
    "with_gpt_tensor_parallel",
]

GPT_BLOCK_SEQUENCE_PARALLEL_SHARE = 1.0
"""The share of a GPT block's activation bytes sequence parallelism divides over the tp ranks:
all of them, since its column-split projections keep the sequence slice and all-gather it
again in backward (`ColwiseFromSequence`). Measured with saved-tensor hooks at d=256, T=128,
tp=2 (`benchmarks/sequence_parallel.py`): 4.01 of 8.02 MiB kept, exactly half (plain tensor
parallelism: 5.01 MiB, the 0.75 share)."""


def _allreduce(num_bytes: float, degree: int, link: Link) -> tuple[float, float]:
    """(seconds that scale with the bytes, fixed seconds) of one ring all-reduce over `degree` ranks."""
    steps = 2 * (degree - 1)
    return steps / degree * num_bytes / link.bandwidth, steps * link.latency


def _split_temporary(layer: LayerCost, keep: float, activation_keep: float) -> tuple[int, int]:
    """A tp rank's share of the layer's measured backward temporaries (`backward_temporary_bytes`,
    its fixed part): the fixed part is a new weight gradient, which splits as the weights do
    (`keep`); the part that grows with the rows is gradients of the layer's activations (an MLP's
    hidden gradient splits, a layer norm's and the residual stream's do not, unless sequence
    parallelism splits them by position), priced as the activations split (`activation_keep`).
    Returns (bytes, fixed bytes)."""
    fixed = min(layer.backward_temporary_fixed_bytes, layer.backward_temporary_bytes)
    split_fixed = round(fixed * keep)
    return split_fixed + round((layer.backward_temporary_bytes - fixed) * activation_keep), split_fixed


def _split_from_boundary(layer: LayerCost, activation_keep: float, degree: int, by_position: bool
                         ) -> int | None:
    """A tp rank's `activation_bytes_from_boundary`: its split activations less what a 16-bit input
    saves less, which is the residual stream's (on CPU a layer norm's 16-bit input), kept whole by
    tensor parallelism and split by position by sequence parallelism."""
    if layer.activation_bytes_from_boundary is None:
        return None
    fewer = (layer.activation_bytes - layer.activation_bytes_from_boundary) / (degree if by_position else 1)
    return max(round(layer.activation_bytes * activation_keep - fewer), 0)


def _split_layer(layer: LayerCost, degree: int, link: Link, sequence_parallel: bool) -> LayerCost:
    share = layer.tensor_parallel_share
    by_position = sequence_parallel and layer.sequence_parallel_activation_share is not None
    if share == 0 and not by_position:
        return layer
    # A boundary after a layer of the split stream carries this tp rank's positions only.
    output_bytes = layer.output_bytes // degree if by_position else layer.output_bytes
    # So does its output inside a stage (what the next layer keeps under recomputation).
    inside: dict[str, int] = {}
    if by_position:
        names = ("stage_output_bytes", "stage_output_bytes_from_boundary")
        sizes = {name: getattr(layer, name) for name in names}
        inside = {name: size // degree for name, size in sizes.items() if size is not None}
    if share == 0:  # the position embedding: computed whole, its output split
        return replace(layer, output_bytes=output_bytes, sequence_parallel_activation_share=None, **inside)
    keep = 1 - share + share / degree
    time_keep = 1 / degree if by_position else keep
    cast_share = share if layer.tensor_parallel_cast_share is None else layer.tensor_parallel_cast_share
    saved_share = cast_share if layer.tensor_parallel_saved_cast_share is None else (
        layer.tensor_parallel_saved_cast_share
    )
    activation_share = share if layer.tensor_parallel_activation_share is None else (
        layer.tensor_parallel_activation_share
    )
    if by_position:
        activation_share = layer.sequence_parallel_activation_share or 0.0
    activation_keep = 1 - activation_share + activation_share / degree
    temporary, temporary_fixed = _split_temporary(layer, keep, activation_keep)
    n = layer.num_tensor_parallel_allreduces
    # Priced on the whole output: the all-gather + reduce-scatter of sequence parallelism move
    # what the all-reduce would.
    moving, fixed = _allreduce(layer.output_bytes, degree, link)
    # W all-gathers each column-split projection's input again (ColwiseFromSequence).
    regather = n * moving / 2 if by_position else 0.0
    weight = layer.weight_s * time_keep + regather
    return replace(
        layer,
        forward_s=layer.forward_s * time_keep + n * moving,
        # The backward's all-reduces are the input-gradient half's: W keeps its share only.
        backward_s=layer.backward_s * time_keep + n * moving + regather,
        weight_grad_s=weight,
        fixed_s=layer.fixed_s + n * fixed,
        activation_bytes=round(layer.activation_bytes * activation_keep),
        activation_bytes_from_boundary=_split_from_boundary(layer, activation_keep, degree, by_position),
        backward_temporary_bytes=temporary,
        backward_temporary_fixed_bytes=temporary_fixed,
        output_bytes=output_bytes,
        **inside,
        parameter_bytes=round(layer.parameter_bytes * keep),
        # The share applies to the undecayed part too: a block's biases split with their matrices,
        # its norms do not, so this errs by the norms' few bytes (the built-in GPT's estimate
        # prices each degree's own: `pipefold.plan.estimate`).
        no_decay_parameter_bytes=min(round(layer.no_decay_parameter_bytes * keep),
                                     round(layer.parameter_bytes * keep)),
        # The norm's largest tensors are the split matrices where the layer splits (an upper bound
        # where a whole norm or bias is among them).
        gradient_norm_bytes=round(layer.gradient_norm_bytes * keep),
        cast_bytes=round(layer.cast_bytes * (1 - cast_share + cast_share / degree)),  # a shard's copies
        # The weights' copies, split by their own share (a bias kept whole is cast, not saved).
        saved_cast_bytes=None if layer.saved_cast_bytes is None else min(
            round(layer.saved_cast_bytes * (1 - saved_share + saved_share / degree)),
            round(layer.cast_bytes * (1 - cast_share + cast_share / degree))),
        # What is left of the layer is a tp rank's slice: it does not split again.
        tensor_parallel_share=0.0,
        tensor_parallel_activation_share=None,
        tensor_parallel_cast_share=None,
        tensor_parallel_saved_cast_share=None,
        num_tensor_parallel_allreduces=0,
        sequence_parallel_activation_share=None,
    )


def split_costs(costs: ModelCosts, degree: int, link: Link, *, sequence_parallel: bool = False) -> ModelCosts:
    """`costs` as one of `degree` tensor-parallel ranks sees them (docs/decisions.md,
    "Tensor-parallel cost model"), with sequence parallelism where `sequence_parallel`; `link`
    is the one between the tp ranks of a stage. Degree 1 returns `costs`."""
    if degree == 1:
        return costs
    layers = tuple(_split_layer(layer, degree, link, sequence_parallel) for layer in costs.layers)
    how = "tensor and sequence parallelism" if sequence_parallel else "tensor parallelism"
    source = f"{costs.source}; split {degree} ways by {how}" if costs.source else ""
    # A tied weight sized apart from its layers splits as the most split of its holders (so it
    # stays within each: a tied layer split by tp splits the tied weight with it).
    tied = tuple(max(1, round(size * min(layers[i].parameter_bytes / costs.layers[i].parameter_bytes
                                         for i in group)))
                 for size, group in zip(costs.tied_parameter_bytes, costs.tied_layers, strict=True)
                 ) if costs.tied_parameter_bytes else ()
    return replace(costs, layers=layers, source=source, tensor_parallel_degrees=(), tied_parameter_bytes=tied)


def gpt_block_parameters(d_model: int) -> int:
    """A GPT decoder block's parameters: 12 d^2 for q/k/v, the projection and the 4x MLP, 13 d
    for their biases and the two layer norms."""
    return 12 * d_model * d_model + 13 * d_model


def gpt_block_cast_parameters(d_model: int) -> int:
    """The parameters of a GPT decoder block that autocast casts to 16 bits (and holds for a step):
    the 12 d^2 weights of its four linear layers and their 9 d biases (not the layer norms)."""
    return 12 * d_model * d_model + 9 * d_model


def with_gpt_tensor_parallel(
    costs: ModelCosts, *, num_layers: int, d_model: int, num_heads: int, activation_share: float = 0.75
) -> ModelCosts:
    """The built-in GPT's costs (layers of `pipefold.model.zoo.gpt_layers`) with its decoder
    blocks marked as `gpt_tensor_parallel_plan` splits them: attention by heads and the MLP,
    every weight but the two layer norms and the row-split linears' biases, two all-reduces
    per forward (and two per backward), `activation_share` of the activations (three quarters
    where every saved value has the same bytes: the layer norms' inputs and outputs stay whole;
    less under autocast over fp32 weights, whose norms save fp32), degrees dividing `num_heads`; and, for
    sequence parallelism, the layers whose output it splits (the position embedding and
    the blocks)."""
    d = d_model
    parameters = gpt_block_parameters(d)
    split = parameters - 6 * d  # all but 2 layer norms (4d) and the proj / fc_out biases (2d)
    blocks = range(2, 2 + num_layers)
    layers = tuple(
        replace(
            layer,
            tensor_parallel_share=split / parameters,
            tensor_parallel_activation_share=activation_share,
            # Of its cast weights and biases, all but the row-split linears' biases (2d); of the
            # copies its forward saves (the weights'), all.
            tensor_parallel_cast_share=1 - 2 * d / gpt_block_cast_parameters(d),
            tensor_parallel_saved_cast_share=1.0,
            num_tensor_parallel_allreduces=2,
            sequence_parallel_activation_share=GPT_BLOCK_SEQUENCE_PARALLEL_SHARE,
        )
        if index in blocks
        # The position embedding ends the whole stream: under sequence parallelism its output
        # is split, its work is not.
        else replace(layer, sequence_parallel_activation_share=0.0)
        if index == 1
        else layer
        for index, layer in enumerate(costs.layers)
    )
    degrees = tuple(t for t in range(1, num_heads + 1) if num_heads % t == 0)
    return replace(costs, layers=layers, tensor_parallel_degrees=degrees)


class LinearCosts:
    """`ModelCosts` as a `CostSource`: the same costs at every rows (the search scales them
    linearly), split over tp by `split_costs`."""

    def __init__(self, costs: ModelCosts) -> None:
        self._costs = costs

    @property
    def base(self) -> ModelCosts:
        return self._costs

    def at(self, rows: int, tensor_parallel: int, link: Link, sequence_parallel: bool) -> ModelCosts:
        return split_costs(self._costs, tensor_parallel, link, sequence_parallel=sequence_parallel)


def tensor_parallel_problem(costs: ModelCosts) -> str:
    """Why the model's costs allow no tp degree but 1, or which ones they allow."""
    if not costs.splits:
        return (
            "no layer of the model's costs has a tensor-parallel share (LayerCost.tensor_parallel_share), "
            "so nothing would split"
        )
    return (
        "the model's split layers allow tp in "
        f"{', '.join(map(str, costs.tensor_parallel_degrees))} (e.g. divisors of the head count)"
    )
