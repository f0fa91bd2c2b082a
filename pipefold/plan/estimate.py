"""`gpt_costs`: a FLOP-based *estimate* of the built-in GPT's layer costs, no device needed.

The layer list is `pipefold.model.zoo.gpt_layers`: token embedding, position
embedding, `num_layers` decoder blocks, final norm, output head (tied to the token
embedding unless `tie_embeddings=False`). Per sample of T tokens, width d,
vocabulary V, and b bytes per value:
- a block's forward does 24·T·d² FLOPs of matrix products (qkv, projection, MLP)
  plus 4·T²·d for attention; its backward twice that, half of the products' share
  being the weight gradient (W = 24·T·d²);
- a block keeps 16·T·d values for its backward (layer-norm inputs, q/k/v, attention
  output, MLP input, pre- and post-activation: no dropout, fused attention, so no
  T² scores), and emits T·d;
- the head does 2·T·d·V FLOPs forward and keeps its input and the logits (T·(d+V));
- parameters: 12·d² + 13·d per block, V·d per embedding table (held by each of the
  two tied layers), T·d for positions.
The blocks carry what `pipefold train --tensor-parallel` splits (`with_gpt_tensor_parallel`
in tensor.py). Times are FLOPs / `flops` (the device's sustained rate). Real layers run below peak,
and small ones far below: treat the result as a shape, not a measurement.
"""

from __future__ import annotations

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.tensor import gpt_block_parameters, with_gpt_tensor_parallel

__all__ = ["PRECISION_BYTES", "gpt_costs"]

PRECISION_BYTES = {"fp32": (4, 4), "bf16": (2, 4), "fp16": (2, 4)}
"""`pipefold train --precision` -> (bytes_per_value, parameter_bytes_per_value) of `gpt_costs`:
mixed precision computes and sends activations in 16 bits and keeps fp32 master weights."""


def gpt_costs(
    *,
    num_layers: int,
    d_model: int,
    num_heads: int,
    seq_len: int,
    vocab_size: int = 256,
    flops: float = 1e12,
    bytes_per_value: int = 4,
    tie_embeddings: bool = True,
    overhead_s: float = 0.0,
    parameter_bytes_per_value: int | None = None,
) -> ModelCosts:
    """Per-sample costs (reference_rows = 1) of `gpt_layers(vocab_size, d_model, num_heads, num_layers,
    seq_len)`, estimated as the module docstring says. `bytes_per_value` prices activations and
    boundaries, `parameter_bytes_per_value` (default the same) weights: mixed precision keeps
    fp32 weights (4) and 16-bit activations (2); see `PRECISION_BYTES`."""
    if parameter_bytes_per_value is None:
        parameter_bytes_per_value = bytes_per_value
    sizes = {"num_layers": num_layers, "d_model": d_model, "num_heads": num_heads, "seq_len": seq_len,
             "vocab_size": vocab_size, "bytes_per_value": bytes_per_value,
             "parameter_bytes_per_value": parameter_bytes_per_value}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"gpt_costs: {name} = {value!r}; give an integer >= 1")
    if d_model % num_heads:
        raise ConfigError(f"gpt_costs: d_model={d_model} is not divisible by num_heads={num_heads}")
    if not flops > 0:
        raise ConfigError(f"gpt_costs: flops = {flops!r}; give the device's FLOP/s, e.g. 1e14")
    t, d, v, b = seq_len, d_model, vocab_size, bytes_per_value
    hidden = t * d * b

    def layer(fwd_flops: float, weight_flops: float, kept: int, params: int) -> LayerCost:
        return LayerCost(
            forward_s=fwd_flops / flops,
            backward_s=2 * fwd_flops / flops,
            weight_grad_s=weight_flops / flops,
            activation_bytes=kept,
            output_bytes=hidden,
            parameter_bytes=params * parameter_bytes_per_value,
        )

    products = 24 * t * d * d
    block = layer(products + 4 * t * t * d, products, 16 * t * d * b, gpt_block_parameters(d))
    head_flops = 2 * t * d * v
    layers = [
        layer(0.0, 0.0, 0, v * d),  # a gather: no FLOPs worth counting; ids are not kept as floats
        layer(t * d, 0.0, 0, t * d),
        *([block] * num_layers),
        layer(8 * t * d, 2 * t * d, t * d * b, 2 * d),
        layer(head_flops, head_flops, t * (d + v) * b, v * d),
    ]
    costs = ModelCosts(
        layers=tuple(layers),
        reference_rows=1,
        input_bytes=t * 8,  # int64 token ids
        overhead_s=overhead_s,
        source=(
            f"FLOP estimate for a GPT (layers={num_layers}, d_model={d_model}, heads={num_heads}, "
            f"seq_len={seq_len}, vocab={vocab_size}) at {flops:.3g} FLOP/s, not a measurement"
        ),
    )
    return with_gpt_tensor_parallel(costs, num_layers=num_layers, d_model=d_model, num_heads=num_heads)
