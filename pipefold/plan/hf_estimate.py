"""`hf_costs`: a FLOP-based *estimate* of a Hugging Face decoder's layer costs from its config.json.

    config = json.loads(Path("models/gpt2/config.json").read_text())
    costs = hf_costs(config, seq_len=512, flops=1e14)     # what `pipefold plan --model DIR` plans on

The layers are what `pipefold.split` cuts the model into (and `pipefold train --model`
trains): the prefix (token embedding, GPT-2's position embedding), one layer per decoder
block, the suffix (final norm and head). The FLOP and parameter formulas are the built-in
GPT's (`pipefold.plan.estimate`) with the config's sizes; the saved bytes are what the model's own
code saves (`pipefold.plan.hf_saved`: the activation function, the dropouts, sdpa's math path and
its T x T tensors, RMSNorm's fp32 copies, autocast's copy per linear); per sample of T tokens,
width d, intermediate (MLP) width I, vocabulary V, b bytes per value:
- GPT-2 block: 2·T·(4d² + 2dI) FLOPs of matrix products forward plus 4·T²·d for attention,
  has 4d² + 2dI + 9d + I parameters (I = 4d gives the GPT's 24·T·d² and 12d² + 13d);
- Llama-style block (llama, mistral, qwen2: h query heads of width d/h, g key/value heads,
  gated MLP): 2·T·(2d² + 2d·g·d/h + 3dI) FLOPs plus 4·T²·d,
  2d² + 2d·g·d/h + 3dI + 2d parameters (plus qwen2's query/key/value biases, and llama's with
  `attention_bias` / `mlp_bias`); its output also carries the rotary tables (2·T·d/h);
- backward twice the forward, the products' share of it being the weight gradient;
- mixed precision (16-bit values over fp32 weights: `parameter_bytes_per_value`): autocast's
  16-bit copies of every linear's (GPT-2: Conv1D's) weight and bias, held once a step, are each
  layer's `cast_bytes`: a block's parameters less its norms', the head's V·d, none for the
  embeddings (measured the same, layer by layer, by a bf16 profile: tests/plan/test_hf_estimate.py);
- the head: 2·T·d·V FLOPs, keeps the final norm's and its own inputs; the loss its T·V fp32
  log-probabilities (`loss_bytes`, held per micro-batch in flight with full recomputation too:
  the head's 16-bit logits, b bytes, were priced in its place, 7-9% under the CPU allocator's
  peak of GPipe's recomputing last rank) and, in its backward, two such gradients
  (`loss_backward_bytes`); each layer's backward its temporaries (`pipefold.plan.hf_temporaries`);
  on "cpu" the runtime's kept receive buffers (`keeps_receive_buffers`); a tied head counts the
  V·d table on both ends,
  and the costs' `tied_layers` name the prefix and the suffix as holding that one weight
  (`tied_parameter_bytes`: V·d at the weights' bytes), so the planner counts it once on a rank
  holding both (full sharding on a V schedule's rank 0: one gather unit). The tie is transformers' own rule,
  `tie_word_embeddings` (default: the family's, `hf_ties`), which is what `pipefold.split` finds
  in the built model (`pipefold.model.ties.layer_ties`; a test holds the two equal); measured
  costs (`pipefold profile --model DIR`) take the split's finding directly.
- mixed precision, inside a stage (what a recomputed stage's layers keep: `LayerCost.
  stage_output_bytes`, `stage_output_bytes_from_boundary`): the prefix and each block hand the
  next layer the hidden state (and rotary tables) in fp32, a block handed its stage's 16-bit input
  passes it on in 16 bits (measured the same by a bf16 profile of GPT-2 and Llama).
No tensor-parallel split is priced (train splits these blocks; this estimate does not).
Times are FLOPs / `flops`: a shape, not a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.estimate import decoder_flops_per_token
from pipefold.plan.hf_saved import SAVED_ON, hf_saved_bytes
from pipefold.plan.hf_temporaries import hf_backward_temporaries

__all__ = ["LLAMA_FAMILIES", "LayerTies", "hf_costs", "hf_flops_per_token", "hf_ties"]

LayerTies = tuple[tuple[tuple[int, ...], int], ...]
"""Groups of layers that hold one weight, each with that weight's number of elements:
`(((0, 4), 4096),)` for a tied embedding and head of 4096 values on layers 0 and 4."""

TIED_BY_DEFAULT = {"gpt2": True}
"""transformers' default `tie_word_embeddings` per family where config.json omits it (False for
the others: LlamaConfig, MistralConfig, Qwen2Config)."""

LLAMA_FAMILIES = ("llama", "mistral", "qwen2")
"""model_type values estimated with the Llama block (gated MLP, grouped-query attention, RMSNorm)."""


def _size(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.json: {key} = {value!r}; give an integer >= 1")
        return value
    if default is not None:
        return default
    raise ConfigError(f"config.json gives no {' / '.join(keys)}; the estimate needs it")


def hf_flops_per_token(config: Mapping[str, Any], *, seq_len: int) -> float:
    """Training FLOPs per token of the decoder `config` (a parsed config.json) at `seq_len`, for
    model FLOPs utilization: `decoder_flops_per_token` with the config's sizes (GPT-2: plain MLP
    of `n_inner`, default 4d; llama, mistral, qwen2: gated MLP, grouped-query attention)."""
    gpt2 = str(config.get("model_type", "")) == "gpt2"
    d = _size(config, "n_embd" if gpt2 else "hidden_size")
    num_heads = _size(config, "n_head" if gpt2 else "num_attention_heads")
    inner = _size(config, "n_inner", default=4 * d) if gpt2 else _size(config, "intermediate_size")
    return decoder_flops_per_token(
        num_layers=_size(config, "n_layer" if gpt2 else "num_hidden_layers"),
        hidden_size=d,
        seq_len=seq_len,
        vocab_size=_size(config, "vocab_size"),
        num_heads=num_heads,
        num_kv_heads=num_heads if gpt2 else _size(config, "num_key_value_heads", default=num_heads),
        head_dim=d // num_heads if gpt2 else _size(config, "head_dim", default=d // num_heads),
        intermediate_size=inner,
        gated_mlp=not gpt2,
    )


def hf_ties(config: Mapping[str, Any]) -> LayerTies:
    """The layers of the decoder `config` (a parsed config.json), as `pipefold.split` cuts it, that
    hold one weight: with `tie_word_embeddings` (absent: the family's default, `TIED_BY_DEFAULT`)
    the prefix's token embedding is the suffix's head, V x d values; else none."""
    model_type = str(config.get("model_type", ""))
    tied = config.get("tie_word_embeddings")
    if tied is None:  # absent or null: transformers' default for the family
        tied = TIED_BY_DEFAULT.get(model_type, False)
    if not isinstance(tied, bool):
        raise ConfigError(f"config.json: tie_word_embeddings = {tied!r}; give true or false")
    if not tied:
        return ()
    gpt2 = model_type == "gpt2"
    num_layers = _size(config, "n_layer" if gpt2 else "num_hidden_layers")
    table = _size(config, "vocab_size") * _size(config, "n_embd" if gpt2 else "hidden_size")
    return (((0, num_layers + 1), table),)


def hf_costs(
    config: Mapping[str, Any],
    *,
    seq_len: int | None = None,
    flops: float = 1e12,
    bytes_per_value: int = 4,
    overhead_s: float = 0.0,
    ties: Sequence[tuple[Sequence[int], int]] | None = None,
    parameter_bytes_per_value: int | None = None,
    memory_bandwidth: float | None = None,
    device: str = "cpu",
) -> ModelCosts:
    """Per-sample costs (reference_rows = 1) of the decoder `config` (a parsed config.json) as
    `pipefold.split` layers it, estimated as the module docstring says. `seq_len` defaults to the
    config's maximum positions. `ties`: the layers that hold one weight and its number of values
    (`LayerTies`, as `pipefold.model.ties.layer_ties` finds them in the split model); default
    `hf_ties(config)`. `bytes_per_value` prices activations and boundaries,
    `parameter_bytes_per_value` (default the same) weights, as `gpt_costs` (`PRECISION_BYTES`):
    with 16-bit values over fp32 weights (bf16, fp16) each layer's `cast_bytes` are autocast's
    copies of its linear (GPT-2: Conv1D) weights and biases, timed at `memory_bandwidth` (bytes/s;
    None: no time) as a copy (read 4 bytes, write 2, an element). `device` ("cpu", measured; "cuda",
    assumed) is where the runtime saves the activations (`pipefold.plan.hf_saved`)."""
    model_type = str(config.get("model_type", ""))
    gpt2 = model_type == "gpt2"
    if not gpt2 and model_type not in LLAMA_FAMILIES:
        raise ConfigError(
            f"config.json: model_type={model_type!r} has no cost estimate; estimated: gpt2, "
            f"{', '.join(LLAMA_FAMILIES)} (or measure it: pipefold profile --model DIR)"
        )
    num_layers = _size(config, "n_layer" if gpt2 else "num_hidden_layers")
    d = _size(config, "n_embd" if gpt2 else "hidden_size")
    num_heads = _size(config, "n_head" if gpt2 else "num_attention_heads")
    v = _size(config, "vocab_size")
    max_positions = _size(config, "n_positions" if gpt2 else "max_position_embeddings")
    t = max_positions if seq_len is None else seq_len
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"hf_costs: seq_len = {seq_len!r}; give an integer >= 1")
    if t > max_positions:
        raise ConfigError(
            f"--seq-len = {t} exceeds the model's {max_positions} positions (config.json); give at most that"
        )
    if d % num_heads:
        raise ConfigError(f"config.json: hidden size {d} is not divisible by {num_heads} attention heads")
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, int) or bytes_per_value < 1:
        raise ConfigError(f"hf_costs: bytes_per_value = {bytes_per_value!r}; give 4 (fp32) or 2 (bf16)")
    if not flops > 0:
        raise ConfigError(f"hf_costs: flops = {flops!r}; give the device's FLOP/s, e.g. 1e14")
    p = bytes_per_value if parameter_bytes_per_value is None else parameter_bytes_per_value
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ConfigError(f"hf_costs: parameter_bytes_per_value = {p!r}; give 4 (fp32 weights) or 2 (bf16)")
    if memory_bandwidth is not None and not memory_bandwidth > 0:
        raise ConfigError(f"hf_costs: memory_bandwidth = {memory_bandwidth!r}; give the device's bytes/s, "
                          "e.g. 2e12 (or None: the casts take no time)")
    if device not in SAVED_ON:
        raise ConfigError(f"hf_costs: device = {device!r}; give one of {', '.join(SAVED_ON)}")
    b = bytes_per_value
    mixed = b < p  # 16-bit values with wider weights: autocast casts the linears' weights and biases
    found = hf_ties(config) if ties is None else tuple((tuple(group), size) for group, size in ties)
    tied = bool(found)
    if gpt2:
        inner = _size(config, "n_inner", default=4 * d)
        products = 2 * t * (4 * d * d + 2 * d * inner)
        block_params = 4 * d * d + 2 * d * inner + 9 * d + inner
        carried = t * d
        prefix_params = v * d + max_positions * d
        norm_params = 2 * d
    else:
        inner = _size(config, "intermediate_size")
        head_dim = _size(config, "head_dim", default=d // num_heads)
        kv_width = _size(config, "num_key_value_heads", default=num_heads) * head_dim
        products = 2 * t * (2 * d * d + 2 * d * kv_width + 3 * d * inner)
        block_params = (2 * d * d + 2 * d * kv_width + 3 * d * inner + 2 * d
                        + _llama_biases(config, d, kv_width, inner))
        carried = t * d + 2 * t * head_dim  # the hidden state and the rotary cos/sin tables
        prefix_params = v * d
        norm_params = d

    def layer(fwd_flops: float, weight_flops: float, kept_values: int, output_values: int,
              params: int, cast: int = 0, saved: int = 0) -> LayerCost:
        return LayerCost(
            forward_s=fwd_flops / flops,
            backward_s=2 * fwd_flops / flops,
            weight_grad_s=weight_flops / flops,
            activation_bytes=kept_values * b,
            output_bytes=output_values * b,
            parameter_bytes=params * p,
            cast_bytes=cast * b if mixed else 0,
            saved_cast_bytes=saved * b if mixed else None,  # the weights' copies, not the biases'
        )

    saved = hf_saved_bytes(config, seq_len=t, bytes_per_value=b, parameter_bytes_per_value=p, device=device)
    head_flops = 2 * t * d * v
    norms = 4 * d if gpt2 else 2 * d  # a block's two norms: the only weights autocast does not cast
    prefix = layer(t * d, 0.0, 0, carried, prefix_params)  # embeddings: gathers, nothing cast
    prefix = replace(prefix, activation_bytes=saved.prefix)
    block = layer(products + 4 * t * t * d, products, 0, carried, block_params, block_params - norms,
                  products // (2 * t))
    block = replace(block, activation_bytes=saved.block)
    if mixed:
        # Inside a stage the hidden state (and Llama's rotary tables, made in its dtype) is fp32
        # from the fp32 embeddings on (an fp32 tensor plus a 16-bit one is fp32); a block handed a
        # 16-bit boundary passes it on in 16 bits, as the built-in GPT's (`pipefold.plan.in_stage`).
        stream = carried * 4
        prefix = replace(prefix, stage_output_bytes=stream)
        block = replace(block, stage_output_bytes=stream, stage_output_bytes_from_boundary=block.output_bytes)
    # The head saves the final norm's and its own inputs (`hf_saved_bytes`); the loss's fp32
    # log-probabilities (`next_token_loss` upcasts the logits) are `loss_bytes`: the last stage holds
    # them per micro-batch in flight, recomputed or not, as the loss runs outside its checkpoints.
    suffix = replace(layer(head_flops + 8 * t * d, head_flops + 2 * t * d, t * v, t * v, v * d + norm_params,
                           v * d, v * d), activation_bytes=saved.suffix)
    # What each backward allocates beyond its saved tensors (`pipefold.plan.hf_temporaries`).
    prefix, block, suffix = (
        replace(cost, backward_temporary_bytes=total, backward_temporary_fixed_bytes=fixed)
        for cost, (total, fixed) in zip((prefix, block, suffix), hf_backward_temporaries(
            config, seq_len=t, bytes_per_value=b, parameter_bytes_per_value=p), strict=True))
    layers = [
        prefix,
        *([block] * num_layers),
        suffix,  # the final norm, and the head's V x d weight (no bias) cast
    ]
    cast_elements = sum(layer.cast_bytes for layer in layers) // b
    parameters = sum(layer.parameter_bytes for layer in layers)
    return ModelCosts(
        layers=tuple(layers),
        reference_rows=1,
        input_bytes=t * 8,  # int64 token ids
        loss_bytes=t * v * 4,
        # The loss's backward holds the gradients of the fp32 log-probabilities and of the logits.
        loss_backward_bytes=2 * t * v * 4,
        # The CPU runtime keeps its receive buffers between steps (none on CUDA).
        keeps_receive_buffers=device == "cpu",
        overhead_s=overhead_s,
        # Adam in the weights' dtype; with 16-bit weights fp32 moments and master copies (as gpt_costs).
        optimizer_bytes_per_parameter_byte=2.0 if p >= 4 else 12 / p,
        cast_bytes_per_parameter_byte=cast_elements * b / parameters,
        cast_s_per_parameter_byte=(
            cast_elements * (p + b) / memory_bandwidth / parameters if memory_bandwidth else 0.0
        ),
        tied_layers=tuple(group for group, _ in found),
        tied_parameter_bytes=tuple(size * p for _, size in found),
        source=(
            f"FLOP estimate for a Hugging Face {model_type} (blocks={num_layers}, hidden={d}, "
            f"heads={num_heads}, "
            f"intermediate={inner}, vocab={v}, seq_len={t}{', tied head' if tied else ''}) at {flops:.3g} "
            "FLOP/s, not a measurement"
            + (f"; weight casts at {memory_bandwidth:.3g} B/s" if mixed and memory_bandwidth else "")
        ),
    )


def _llama_biases(config: Mapping[str, Any], d: int, kv_width: int, inner: int) -> int:
    """A Llama-style block's linear biases: qwen2's query, key and value projections'; llama's
    with `attention_bias` (the four attention projections) and `mlp_bias` (the three MLP ones)."""
    model_type = str(config.get("model_type", ""))
    biases = d + 2 * kv_width if model_type == "qwen2" else 0
    if model_type == "llama":
        biases += (2 * d + 2 * kv_width) if config.get("attention_bias") else 0
        biases += (2 * inner + d) if config.get("mlp_bias") else 0
    return biases
