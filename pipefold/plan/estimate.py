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
  T² scores), and emits T·d; under autocast over fp32 weights the two layer-norm inputs (and the
  final norm's) are the fp32 residual stream, 4 bytes each (CUDA's autocast: its norms save an
  fp32 copy of a 16-bit input too, so a stage's first block saves as much);
- the head does 2·T·d·V FLOPs forward and keeps its input (T·d), the loss its fp32
  log-probabilities (T·V·max(b, 4): `loss_bytes`, held on the last stage, recomputed or not);
- each layer's backward holds temporaries beyond what its forward saved, and the loss's backward
  two fp32 logits-sized gradients, as `GptEstimate` prices them (`estimate_temporaries`);
- parameters: 12·d² + 13·d per block, V·d per embedding table (held by each of the
  two tied layers), T·d for positions.
The blocks carry what `pipefold train --tensor-parallel` splits (`with_gpt_tensor_parallel`
in tensor.py). Times are FLOPs / `flops` (the device's sustained rate). Real layers run below peak,
and small ones far below: treat the result as a shape, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.estimate_temporaries import GptTemporaryShape, gpt_backward_temporaries
from pipefold.plan.hardware import Hardware
from pipefold.plan.tensor import gpt_block_cast_parameters, gpt_block_parameters, with_gpt_tensor_parallel
from pipefold.plan.update_memory import layer_norm_bytes, update_temporaries
from pipefold.simulate import Link

__all__ = [
    "gpt_parameter_numels",
    "gpt_parameter_no_decay",
    "PRECISION_BYTES",
    "GptEstimate",
    "decoder_flops_per_token",
    "gpt_costs",
    "gpt_flops_per_token",
    "model_flops_utilization",
]

PRECISION_BYTES = {"fp32": (4, 4), "bf16": (2, 4), "fp16": (2, 4), "bf16-pure": (2, 2)}
"""`pipefold train --precision` -> (bytes_per_value, parameter_bytes_per_value) of `gpt_costs`:
mixed precision computes and sends activations in 16 bits and keeps fp32 weights; bf16-pure
holds the weights in bf16 too (its fp32 master copies are optimizer state)."""


def gpt_flops_per_token(*, num_layers: int, d_model: int, seq_len: int, vocab_size: int = 256) -> float:
    """Training FLOPs per token of the built-in GPT, forward + backward, the matrix products
    `gpt_costs` counts: 6 N + 12 L T d, where N = 12 L d^2 + V d are the weights of the matrix products
    (the blocks' and the head's; embedding lookups and norms are not products) and
    12 L T d the attention scores and their weighting (4 T d per layer forward, twice that
    backward). The PaLM paper's MFU convention: no recomputation counted."""
    products = 12 * num_layers * d_model * d_model + vocab_size * d_model
    return float(6 * products + 12 * num_layers * seq_len * d_model)


def decoder_flops_per_token(
    *,
    num_layers: int,
    hidden_size: int,
    seq_len: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    gated_mlp: bool,
) -> float:
    """Training FLOPs per token of a decoder-only transformer described by its sizes (a Hugging
    Face config: `pipefold.hf.files.ModelFiles`), in `gpt_flops_per_token`'s convention: 6 N +
    12 L T (heads x head_dim). N counts the weights of the matrix products: per block the query
    and output projections (d x heads x head_dim each), the key and value projections (d x
    kv_heads x head_dim each: grouped-query attention), the MLP's 2 (or, gated, 3) d x
    intermediate matrices; and the head, V x d (tied or not, it is a product)."""
    attention_width = num_heads * head_dim
    per_block = (
        2 * hidden_size * attention_width
        + 2 * hidden_size * num_kv_heads * head_dim
        + (3 if gated_mlp else 2) * hidden_size * intermediate_size
    )
    products = num_layers * per_block + vocab_size * hidden_size
    return float(6 * products + 12 * num_layers * seq_len * attention_width)


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """MFU: the model's FLOPs per second over the devices' peak (every device's, summed)."""
    if not peak_flops > 0:
        raise ConfigError(f"model_flops_utilization: peak_flops = {peak_flops!r}; give the devices' FLOP/s")
    return flops_per_token * tokens_per_s / peak_flops


def gpt_parameter_numels(num_layers: int, d_model: int, seq_len: int, vocab_rows: int, tensor_parallel: int,
                         *, tied: bool) -> list[int]:
    """The elements of each parameter of the built-in GPT on one tp rank, in the order a rank
    visits them (`pipefold.model.zoo.gpt_layers`): token and position embeddings, per block two
    layer norms' gains and biases around attention (qkv, proj) and the MLP (fc_in, fc_out), the
    final norm, the head unless tied. `vocab_rows`: the embedding's rows on this tp rank."""
    layers = gpt_layer_numels(num_layers, d_model, seq_len, vocab_rows, tensor_parallel)
    return [numel for layer in (layers if not tied else layers[:-1]) for numel in layer]


def gpt_layer_numels(num_layers: int, d_model: int, seq_len: int, vocab_rows: int, tensor_parallel: int
                     ) -> list[list[int]]:
    """`gpt_parameter_numels` per layer (embeddings, blocks, final norm, head), the head's whether
    tied or not (a tied head holds the embedding's table)."""
    h, t = d_model, tensor_parallel
    attention = [h, h, 3 * h * h // t, 3 * h // t, h * h // t, h]  # ln_1, qkv, proj (its bias whole)
    block = [*attention, h, h, 4 * h * h // t, 4 * h // t, 4 * h * h // t, h]  # ln_2, fc_in, fc_out
    return [[vocab_rows * h], [seq_len * h], *[block] * num_layers, [h, h], [vocab_rows * h]]


def gpt_parameter_no_decay(num_layers: int, *, tied: bool) -> list[bool]:
    """Per parameter of `gpt_parameter_numels`, whether `pipefold.job.optim.parameter_groups` puts it
    in the group without weight decay: the embeddings, the norms' gains and biases, every bias;
    the matrices (and an untied head) decay."""
    block = [True, True, False, True, False, True] * 2  # ln, qkv/fc_in (weight, bias), proj/fc_out
    return [True, True, *block * num_layers, True, True, *([] if tied else [False])]


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
    memory_bandwidth: float | None = None,
) -> ModelCosts:
    """Per-sample costs (reference_rows = 1) of `gpt_layers(vocab_size, d_model, num_heads, num_layers,
    seq_len)`, estimated as the module docstring says. `bytes_per_value` prices activations and
    boundaries, `parameter_bytes_per_value` (default the same) weights: mixed precision keeps
    fp32 weights (4) and 16-bit activations (2); see `PRECISION_BYTES`. There autocast's 16-bit
    copies of the matrix products' weights and biases are each layer's `cast_bytes`, and with the
    device's `memory_bandwidth` (bytes/s) their making is timed as a copy (read the weights, write
    the copies); without it the casts take no time."""
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
    if memory_bandwidth is not None and not memory_bandwidth > 0:
        raise ConfigError(f"gpt_costs: memory_bandwidth = {memory_bandwidth!r}; give the device's bytes/s, "
                          "e.g. 2e12 (or None: the casts take no time)")
    t, d, v, b, p = seq_len, d_model, vocab_size, bytes_per_value, parameter_bytes_per_value
    hidden = t * d * b

    mixed = b < p  # 16-bit values with wider weights: autocast casts the products' weights

    def layer(fwd_flops: float, weight_flops: float, kept: int, params: int, cast: int = 0,
              saved: int = 0) -> LayerCost:
        return LayerCost(
            forward_s=fwd_flops / flops,
            backward_s=2 * fwd_flops / flops,
            weight_grad_s=weight_flops / flops,
            activation_bytes=kept,
            output_bytes=hidden,
            parameter_bytes=params * parameter_bytes_per_value,
            cast_bytes=cast * b if mixed else 0,
            saved_cast_bytes=saved * b if mixed else None,  # the weights' copies, not the biases'
        )

    products = 24 * t * d * d
    # The norms save their inputs, the residual stream: fp32 under autocast over fp32 weights (in a
    # stage and, CUDA's autocast, from a 16-bit boundary: an fp32 copy), else the values' bytes.
    norm_input = 4 if mixed else b
    whole, split = 2 * t * d * (norm_input + b), 12 * t * d * b  # tp keeps LN, qkv and MLP inputs whole
    block = layer(products + 4 * t * t * d, products, whole + split, gpt_block_parameters(d),
                  gpt_block_cast_parameters(d), 12 * d * d)
    head_flops = 2 * t * d * v
    embed, position, norm = layer(0.0, 0.0, 0, v * d), layer(t * d, 0.0, 0, t * d), layer(
        8 * t * d, 2 * t * d, t * d * norm_input, 2 * d)
    if mixed:
        # Inside a stage the residual stream is in the weights' dtype from the embeddings on, and
        # a block handed a 16-bit boundary passes it on in 16 bits; the final norm returns fp32
        # (CUDA's autocast) whatever it is handed (`pipefold.plan.in_stage`).
        stream = t * d * p
        embed, position, norm = (replace(cost, stage_output_bytes=stream) for cost in (embed, position, norm))
        block = replace(block, stage_output_bytes=stream, stage_output_bytes_from_boundary=hidden)
    # The head keeps its input; the loss its fp32 log-probabilities (`loss_bytes`), as `GptEstimate`.
    head = layer(head_flops, head_flops, t * d * b, v * d, v * d, v * d)  # no bias, tied or not
    # What each backward allocates beyond its saved tensors, as `GptEstimate` prices it
    # (estimate_temporaries; the built-in GPT: fused attention, no dropout).
    shape = GptTemporaryShape(rows=1, seq_len=t, d_model=d, num_heads=num_heads, vocab_size=v,
                              value_bytes=b, parameter_bytes=p)
    embed, position, block, norm, head = (
        replace(cost, backward_temporary_bytes=total, backward_temporary_fixed_bytes=fixed)
        for cost, (total, fixed) in zip(
            (embed, position, block, norm, head),
            gpt_backward_temporaries(shape, block_saved_bytes=block.activation_bytes), strict=True))
    layers = [
        # A gather (autocast casts no embedding): no FLOPs worth counting; ids are not kept as floats.
        embed,
        position,
        *([block] * num_layers),
        norm,
        head,
    ]
    cast_elements = sum(layer.cast_bytes for layer in layers) // b
    parameters = sum(layer.parameter_bytes for layer in layers)
    costs = ModelCosts(
        layers=tuple(layers),
        reference_rows=1,
        input_bytes=t * 8,  # int64 token ids
        loss_bytes=t * v * max(b, 4),
        # The loss's backward holds the gradients of the fp32 log-probabilities and of the logits.
        loss_backward_bytes=2 * t * v * 4,
        # Adam's two moments in the weights' dtype; with 16-bit weights fp32 moments and master
        # copies (12 bytes per weight: 6 per byte of a bf16 weight), as `GptEstimate` prices them.
        optimizer_bytes_per_parameter_byte=2.0 if p >= 4 else 12 / p,
        # Each layer's own copies price its stage; the ratio only sums them up.
        cast_bytes_per_parameter_byte=cast_elements * b / parameters,
        # A cast reads each weight and writes its copy, at the device's memory bandwidth.
        cast_s_per_parameter_byte=(
            cast_elements * (p + b) / memory_bandwidth / parameters if memory_bandwidth else 0.0
        ),
        overhead_s=overhead_s,
        tied_layers=((0, len(layers) - 1),) if tie_embeddings else (),  # the head is the embedding
        source=(
            f"FLOP estimate for a GPT (layers={num_layers}, d_model={d_model}, heads={num_heads}, "
            f"seq_len={seq_len}, vocab={vocab_size}) at {flops:.3g} FLOP/s, not a measurement"
            + (f"; weight casts at {memory_bandwidth:.3g} B/s" if mixed and memory_bandwidth else "")
        ),
    )
    return with_gpt_tensor_parallel(costs, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                                    activation_share=split / (whole + split))


@dataclass(frozen=True)
class GptEstimate:
    """The built-in GPT (or Megatron-LM's, `megatron=True`) priced on a hardware file, per (rows, tp).

    A `pipefold.plan.CostSource`: `plan(GptEstimate(...), options)` asks it for one tp rank's
    costs at each micro-batch size it searches, so a small micro-batch runs its matrix products
    at the efficiency the hardware's curve gives their size, not at a linear share of a large
    one's. Per decoder block, micro-batch of b sequences of s tokens, width h, a heads, tp = t,
    v bytes per value (docs/plan.md, "What the estimate prices"):

    - time: each matrix product (qkv, projection, two MLP products; the attention core's batched
      products) at peak x efficiency(its FLOPs); element-wise work (norms, GELU, residuals,
      softmax, dropout) as bytes moved / memory bandwidth; backward = 2 x forward, W = the
      linear products' weight gradients; 2 all-reduces of b s h v bytes over tp per forward and
      per backward on the tp link;
    - activations (Korthikanti et al. 2022, Table 2, for v bytes per value and 1-byte dropout
      masks): 16 sbh values (LN inputs, qkv input, q, k, v, projection input, MLP input, GELU input
      and output) plus, unless the attention is fused (flash), a s^2 b softmax output and, with
      dropout, its dropped copy, and masks of a s^2 b + 2 sbh bytes; tp splits all but the LN
      inputs, qkv and MLP inputs and masks of the stream, sequence parallelism splits everything;
      `megatron` at v = 2 gives Korthikanti's sbh (34 + 5 a s / h). Under autocast over fp32
      weights the LN inputs (and the final norm's) are the fp32 residual stream (a CPU's norms
      handed a 16-bit stage input save it in 16 bits: `activation_bytes_from_boundary`), and on a
      CPU the fused core saves q, k, v and its output in fp32 (the built-in GPT runs it in fp32
      there) beside the projection's 16-bit input; the norms' per-token mean and 1/std and the
      fused core's log-sum-exp (fp32, 16 + 4 a bytes per token) are left out;
    - selective recomputation (`recompute_attention`): the softmax, dropout and their s^2 terms
      are not kept, and the backward runs the attention core's forward again.
    - the token embedding and output layer: split over the vocabulary under tp where
      `vocab_parallel` (Megatron's VocabParallelEmbedding, whose forward all-reduces b s h v bytes,
      and the head's backward, likewise), whole on every tp rank otherwise (the runtime today);
      the head keeps its input, and the loss its log-probabilities (fp32: 4 s b V / t bytes) as
      `ModelCosts.loss_bytes`: held by the last stage per micro-batch, recomputed or not (the
      loss runs outside the stage's checkpoints).
    - weights, gradients and optimizer state: `parameter_bytes` per element, gradients and
      optimizer state as `gradient_bytes` and `optimizer_bytes` per element (mixed-precision Adam:
      2, 2 (4 for fp32 main gradients), 12; fp32 Adam: 4, 4, 8).
    """

    num_layers: int
    d_model: int
    num_heads: int
    seq_len: int
    vocab_size: int
    hardware: Hardware
    dtype: str = ""
    """A key of the hardware's peak_flops; empty: its default dtype."""
    tie_embeddings: bool = True
    megatron: bool = False
    """Megatron-LM's GPT: dropout, unfused attention (softmax kept), vocabulary-parallel embedding
    and output layer, mixed-precision Adam. False: pipefold's built-in GPT (no dropout, fused
    attention, whole embedding and head)."""
    recompute_attention: bool = False
    """Selective recomputation of the attention core (Korthikanti et al. 2022)."""
    parameter_bytes: int = 0
    """Bytes per weight element; 0: the dtype's (2 for bf16 / fp16, 4 otherwise)."""
    gradient_bytes: int = 0
    """Bytes per gradient element; 0: as the weights."""
    optimizer_bytes: int = 0
    """Bytes of optimizer state per element; 0: Adam's, 12 in mixed precision (fp32 master
    weights and two moments), 8 in fp32 (two moments)."""
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        sizes = {"num_layers": self.num_layers, "d_model": self.d_model, "num_heads": self.num_heads,
                 "seq_len": self.seq_len, "vocab_size": self.vocab_size}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GptEstimate: {name} = {value!r}; give an integer >= 1")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"GptEstimate: d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        object.__setattr__(self, "dtype", self.dtype or self.hardware.default_dtype)
        self.hardware.peak(self.dtype)  # refuses a dtype the file has no peak for
        for name in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"GptEstimate: {name} = {value!r}; give bytes per element (0: the default)")

    def attention_recomputed(self) -> GptEstimate:
        """This estimate with the attention core recomputed (the planner's selective option)."""
        return replace(self, recompute_attention=True)

    @property
    def value_bytes(self) -> int:
        return 2 if self.dtype in ("bf16", "fp16") else 4

    @property
    def dropout(self) -> bool:
        return self.megatron

    @property
    def fused_attention(self) -> bool:
        return not self.megatron

    @property
    def vocab_parallel(self) -> bool:
        return self.megatron

    @property
    def base(self) -> ModelCosts:
        return self.at(1, 1, Link(), False)

    def _gemm(self, flops: float) -> float:
        peak = self.hardware.peak(self.dtype)
        return flops / (peak * self.hardware.matmul_for(self.dtype)(flops)) if flops > 0 else 0.0

    @property
    def stream_bytes(self) -> int:
        """Bytes per value of the residual stream inside a stage: fp32 under autocast over fp32
        weights (the embeddings' tables are fp32, and an fp32 tensor plus a 16-bit one is fp32),
        else the compute dtype's."""
        return 4 if self.parameter_element_bytes > self.value_bytes else self.value_bytes

    @property
    def core_bytes(self) -> int:
        """Bytes per value of what the fused attention core saves: fp32 on a CPU in 16 bits (the
        built-in GPT runs its core in fp32 there: `pipefold.model.zoo.gpt._attention_core`), else
        the compute dtype's. A recomputed core keeps only its 16-bit inputs."""
        fp32_core = (self.fused_attention and not self.recompute_attention and self.hardware.device == "cpu"
                     and self.value_bytes < 4)
        return 4 if fp32_core else self.value_bytes

    def block_activation_bytes(self, rows: int, tensor_parallel: int, sequence_parallel: bool, *,
                               from_boundary: bool = False) -> int:
        """What one decoder block keeps for its backward (module docstring; Korthikanti Table 2,
        with the dtypes the runtime saves in). `from_boundary`: the block handed its stage's 16-bit
        input, whose layer norms save that input as it is on a CPU (`activation_bytes_from_boundary`;
        CUDA's autocast saves an fp32 copy either way)."""
        whole, split = self._block_activation_parts(rows, from_boundary=from_boundary)
        t = tensor_parallel
        if sequence_parallel:
            return (whole + split) // t
        return whole + split // t

    def block_tensor_parallel_share(self) -> float:
        """The share of a block's activation bytes tensor parallelism divides (`LayerCost.
        tensor_parallel_activation_share`): 0.75 where every value has the compute dtype's bytes,
        less where the layer norms' fp32 inputs, kept whole, weigh more."""
        whole, split = self._block_activation_parts(1, from_boundary=False)
        return split / (whole + split)

    def _block_activation_parts(self, rows: int, *, from_boundary: bool) -> tuple[int, int]:
        """(kept whole, split by tp) bytes of one block's saved tensors, whole (tp = 1)."""
        s, b, h, a, v = self.seq_len, rows, self.d_model, self.num_heads, self.value_bytes
        sbh = s * b * h
        mask = 1 if self.dropout else 0
        # The two LN inputs are the residual stream (fp32 under autocast over fp32 weights; on a
        # CPU a 16-bit stream passed on from a boundary stays 16-bit).
        norm_input = v if from_boundary and self.hardware.device == "cpu" else self.stream_bytes
        # Kept whole on every tp rank without sequence parallelism: the two LN inputs, the qkv and
        # MLP inputs (4 sbh values) and the two stream dropout masks.
        whole = 2 * sbh * norm_input + 2 * sbh * v + 2 * sbh * mask
        # Split by tp: q, k, v, the projection input, GELU input and output (12 sbh values); a core
        # run in fp32 saves q, k, v and its output in fp32, and the projection its 16-bit copy.
        core = self.core_bytes
        split = 4 * sbh * core + (sbh * v if core != v else 0) + 8 * sbh * v
        if not self.fused_attention and not self.recompute_attention:
            split += a * s * s * b * (v + (v + mask if self.dropout else 0))
        return whole, split

    def at(self, rows: int, tensor_parallel: int, link: Link, sequence_parallel: bool) -> ModelCosts:
        s, b, h, a, t = self.seq_len, rows, self.d_model, self.num_heads, tensor_parallel
        vocab = self.vocab_size
        v, bandwidth = self.value_bytes, self.hardware.memory_bandwidth
        sbh = s * b * h
        mask = 1 if self.dropout else 0
        sp = sequence_parallel and t > 1

        def allreduce(num_bytes: float) -> float:
            if t == 1:
                return 0.0
            return 2 * (t - 1) / t * num_bytes / link.bandwidth + 2 * (t - 1) * link.latency

        # The block's forward: its linear products, the attention core, element-wise passes.
        linear = [2 * s * b * h * 3 * h / t, 2 * s * b * h * h / t, 2 * s * b * h * 4 * h / t,
                  2 * s * b * 4 * h * h / t]
        linear_s = sum(self._gemm(f) for f in linear)
        core_s = 2 * self._gemm(2 * b * (a // t if a >= t else 1) * s * s * (h // a))
        stream = 14 * sbh * v + 2 * sbh * mask  # 2 LN (r+w), 2 residual adds (2r+w), dropouts
        stream_s = stream / (t if sp else 1) / bandwidth
        mlp_s = 2 * 4 * sbh * v / t / bandwidth  # GELU read + write
        scores = a * s * s * b / t
        softmax_s = 0.0 if self.fused_attention else (2 * v + (2 * v + mask) * mask) * scores / bandwidth
        forward = linear_s + core_s + stream_s + mlp_s + softmax_s
        comm = 2 * allreduce(sbh * v)
        backward = 2 * forward + comm
        if self.recompute_attention:
            backward += core_s + softmax_s
        block = LayerCost(
            forward_s=forward + comm + self.overhead_s,
            backward_s=backward + self.overhead_s,
            weight_grad_s=linear_s,
            activation_bytes=self.block_activation_bytes(rows, t, sp),
            output_bytes=sbh * v // (t if sp else 1),
            parameter_bytes=round(((12 * h * h + 7 * h) / t + 6 * h) * self.parameter_element_bytes),
            # Its biases (the column-split ones on this tp rank) and its norms: no weight decay.
            no_decay_parameter_bytes=round((7 * h / t + 6 * h) * self.parameter_element_bytes),
        )
        vt = t if self.vocab_parallel else 1
        pe = self.parameter_element_bytes
        embed_comm = allreduce(sbh * v) if self.vocab_parallel else 0.0
        embed = LayerCost(
            forward_s=2 * sbh * v / bandwidth + embed_comm,
            backward_s=2 * sbh * v / bandwidth,
            weight_grad_s=2 * sbh * v / bandwidth,
            activation_bytes=0,
            output_bytes=sbh * v,
            parameter_bytes=vocab * h // vt * pe,
            no_decay_parameter_bytes=vocab * h // vt * pe,
        )
        position = LayerCost(
            forward_s=(3 * sbh * v + sbh * mask) / bandwidth,
            backward_s=(3 * sbh * v + sbh * mask) / bandwidth,
            weight_grad_s=sbh * v / bandwidth,
            activation_bytes=sbh * mask // (t if sp else 1),
            output_bytes=sbh * v // (t if sp else 1),
            parameter_bytes=s * h * pe,
            no_decay_parameter_bytes=s * h * pe,
        )
        norm_s = 4 * sbh * v / (t if sp else 1) / bandwidth
        norm = LayerCost(
            forward_s=norm_s, backward_s=2 * norm_s, weight_grad_s=norm_s / 2,
            # It saves its input, the residual stream (fp32 under autocast over fp32 weights).
            activation_bytes=sbh * self.stream_bytes // (t if sp else 1), output_bytes=sbh * v,
            parameter_bytes=2 * h * pe,
            no_decay_parameter_bytes=2 * h * pe,
        )
        head_flops = 2 * sbh * vocab / vt
        head_s = self._gemm(head_flops)
        logits = s * b * vocab // vt
        head = LayerCost(
            forward_s=head_s + 2 * logits * max(v, 4) / bandwidth,
            backward_s=2 * head_s + 2 * logits * max(v, 4) / bandwidth
            + (allreduce(sbh * v) if vt > 1 else 0.0),
            weight_grad_s=head_s,
            activation_bytes=sbh * v,
            output_bytes=logits * max(v, 4),
            parameter_bytes=vocab * h // vt * pe,
            # A tied head is the token embedding (no decay); an untied one a decayed matrix.
            no_decay_parameter_bytes=vocab * h // vt * pe if self.tie_embeddings else 0,
        )
        # fp32 weights under 16-bit autocast: each product's weight and bias shard is cast once a
        # step (the blocks' row-split biases whole), a copy timed at the memory bandwidth.
        casting = pe > v
        block_casts = round((12 * h * h + 7 * h) / t + 2 * h) if casting else 0
        head_casts = vocab * h // vt if casting else 0
        # A forward saves the weights' copies for its backward, not the biases'.
        block = replace(block, cast_bytes=block_casts * v,
                        saved_cast_bytes=round(12 * h * h / t) * v if casting else None)
        head = replace(head, cast_bytes=head_casts * v, saved_cast_bytes=head_casts * v if casting else None)
        if casting:
            embed, position, block, norm = self._stage_outputs(rows, t, sp, (embed, position, block, norm))
        # Each layer's gradient-norm copies (the blocks alike but for the first's preceding tensor:
        # their largest for all).
        norms = layer_norm_bytes(gpt_layer_numels(self.num_layers, h, s, vocab // vt, t))
        block = replace(block, gradient_norm_bytes=max(norms[2:-2]))
        embed, position, norm, head = (
            replace(layer, gradient_norm_bytes=bytes_) for layer, bytes_ in
            zip((embed, position, norm, head), (*norms[:2], *norms[-2:]), strict=True))
        # What each backward allocates beyond its saved tensors (estimate_temporaries).
        temporaries = self.backward_temporaries(rows, t, sp)
        embed, position, block, norm, head = (
            replace(layer, backward_temporary_bytes=total, backward_temporary_fixed_bytes=fixed)
            for layer, (total, fixed) in zip((embed, position, block, norm, head), temporaries, strict=True))
        layers = (embed, position, *([block] * self.num_layers), norm, head)
        cast_s = (self.num_layers * block_casts + head_casts) * (pe + v) / bandwidth
        degrees = tuple(d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0)
        shape = (f"layers={self.num_layers}, d_model={self.d_model}, heads={self.num_heads}, "
                 f"seq_len={self.seq_len}, "
                 f"vocab={self.vocab_size}")
        what = "Megatron-LM's GPT" if self.megatron else "the built-in GPT"
        costs = ModelCosts(
            layers=layers,
            reference_rows=rows,
            input_bytes=s * b * 8,
            gradient_bytes_per_parameter_byte=self.gradient_element_bytes / pe,
            optimizer_bytes_per_parameter_byte=self.optimizer_element_bytes / pe,
            tied_layers=((0, len(layers) - 1),) if self.tie_embeddings else (),  # the head is the embedding
            loss_bytes=logits * max(v, 4),
            # The loss's backward holds the gradients of the fp32 log-probabilities and of the
            # logits at once.
            loss_backward_bytes=2 * logits * 4,
            # The CPU runtime keeps its receive buffers between steps (none on CUDA).
            keeps_receive_buffers=self.hardware.device == "cpu",
            cast_s_per_parameter_byte=cast_s / sum(layer.parameter_bytes for layer in layers),
            # The update's temporaries on the hardware's device (AdamW foreach on CUDA), from one
            # tp rank's tensors: pipefold.plan.update_memory.
            **update_temporaries(
                gpt_parameter_numels(self.num_layers, h, s, vocab // vt, t, tied=self.tie_embeddings),
                value_bytes=pe, foreach=self.hardware.device == "cuda",
                masters=self.optimizer_element_bytes > 2 * pe,
                no_decay=gpt_parameter_no_decay(self.num_layers, tied=self.tie_embeddings)),
            source=(f"estimate for {what} ({shape}) on {self.hardware.name} in {self.dtype}"
                    + (", attention core recomputed" if self.recompute_attention else "")
                    + ", not a measurement"),
        )
        if t > 1:
            return costs
        # At tp = 1 the blocks carry their tp shares, so the planner knows which degrees split (the
        # split itself is priced by `at`, not by `split_costs`).
        marked = with_gpt_tensor_parallel(costs, num_layers=self.num_layers, d_model=self.d_model,
                                          num_heads=self.num_heads,
                                          activation_share=self.block_tensor_parallel_share())
        return replace(marked, tensor_parallel_degrees=degrees)

    def _stage_outputs(self, rows: int, tensor_parallel: int, sequence_parallel: bool,
                       layers: tuple[LayerCost, LayerCost, LayerCost, LayerCost]
                       ) -> tuple[LayerCost, LayerCost, LayerCost, LayerCost]:
        """The token embedding, position embedding, a block and the final norm with their outputs
        inside a stage under autocast (`LayerCost.stage_output_bytes`, what a recomputed stage's
        next layer keeps: `pipefold.plan.in_stage`): the residual stream is fp32 from the
        embeddings on (fp32 tables; an fp32 tensor plus a 16-bit one is fp32), and a block handed
        a 16-bit boundary passes it on in 16 bits. The final norm returns fp32 on CUDA (autocast's
        fp32 list), its input's dtype on CPU. On CPU a block or the final norm handed that 16-bit
        stream saves its norms' inputs in 16 bits (`activation_bytes_from_boundary`); CUDA's
        autocast saves their fp32 copies, as from the fp32 stream."""
        embed, position, block, norm = layers
        stream = self.seq_len * rows * self.d_model * 4
        split = tensor_parallel if sequence_parallel else 1
        cpu = self.hardware.device == "cpu"
        from_boundary = norm.output_bytes if cpu else stream
        block_saved = self.block_activation_bytes(rows, tensor_parallel, sequence_parallel,
                                                  from_boundary=True) if cpu else None
        norm_saved = self.seq_len * rows * self.d_model * self.value_bytes // split if cpu else None
        return (replace(embed, stage_output_bytes=stream),
                replace(position, stage_output_bytes=stream // split),
                replace(block, stage_output_bytes=stream // split,
                        stage_output_bytes_from_boundary=block.output_bytes,
                        activation_bytes_from_boundary=block_saved),
                replace(norm, stage_output_bytes=stream, stage_output_bytes_from_boundary=from_boundary,
                        activation_bytes_from_boundary=norm_saved))

    def backward_temporaries(self, rows: int, tensor_parallel: int, sequence_parallel: bool
                             ) -> tuple[tuple[int, int], ...]:
        """(total, fixed) backward temporary bytes of the token embedding, the position embedding,
        a block, the final norm and the head on one tp rank (`pipefold.plan.estimate_temporaries`)."""
        shape = GptTemporaryShape(
            rows=rows, seq_len=self.seq_len, d_model=self.d_model, num_heads=self.num_heads,
            vocab_size=self.vocab_size, tensor_parallel=tensor_parallel,
            sequence_parallel=sequence_parallel and tensor_parallel > 1, vocab_parallel=self.vocab_parallel,
            value_bytes=self.value_bytes, parameter_bytes=self.parameter_element_bytes)
        saved = self.block_activation_bytes(rows, tensor_parallel, shape.sequence_parallel)
        return gpt_backward_temporaries(
            shape, block_saved_bytes=saved,
            dropout=self.dropout, fused_attention=self.fused_attention,
            recompute_attention=self.recompute_attention)

    @property
    def parameter_element_bytes(self) -> int:
        return self.parameter_bytes or self.value_bytes

    @property
    def gradient_element_bytes(self) -> int:
        return self.gradient_bytes or self.parameter_element_bytes

    @property
    def optimizer_element_bytes(self) -> int:
        if self.optimizer_bytes:
            return self.optimizer_bytes
        return 12 if self.parameter_element_bytes < 4 else 8
