"""What the backward of each of the GPT's layers allocates beyond what its forward saved, analytically.

`GptEstimate` and `gpt_costs` price these as `LayerCost.backward_temporary_bytes` (and the part that
does not grow with the rows as `backward_temporary_fixed_bytes`), as `pipefold profile` measures them
for a layer
(`LayerProfile.backward_temporary_bytes`): the most bytes live at once during one backward from a
gradient the layer above hands it, counted from the end of the forward, so a saved tensor the
backward frees before that moment counts against it. Tokens N = s x b of one micro-batch, width h,
a heads, tensor-parallel degree t; value bytes v (the compute dtype), stream bytes r (the residual
stream and the norms: fp32 under autocast over fp32 weights, else v), new weight-gradient bytes w
(v, and under autocast also its fp32 copy: v + 4). Sequence parallelism divides the stream terms by t.

A decoder block's backward runs the MLP first, then the attention:
- MLP (at fc_out's backward): the stream gradient handed in (r N h), under autocast its 16-bit cast
  for the product (v N h; with dropout the dropout's gradient instead, less its freed 1-byte mask),
  the gradient of the 4h hidden activation (4 v N h / t), and fc_out's new weight and bias
  gradients (w (4 h^2 / t + h)): the fixed part. GELU's backward holds as much (a new 4h gradient
  while fc's saved output is freed), so it does not raise the peak.
- unfused attention with dropout (at the probabilities' dropout backward): the stream gradient and
  two new score-sized tensors (2 v a s^2 b / t: the dropout's masked and scaled gradients; the
  gradient of the dropped probabilities replaces their saved copy, freed), less what the MLP and the
  projection saved and freed already (the second norm's input r N h, fc's input v N h, GELU's input
  and output 8 v N h / t, the projection's input v N h / t, the two 1-byte stream masks). With the
  attention core recomputed (selective), the rebuilt softmax output, mask and dropped
  probabilities ((2 v + 1) a s^2 b / t) are allocated in the backward too.
- fused attention (flash): its gradients of q, k and v (3 v N h / t) come after the MLP's saved
  tensors are freed; the MLP's moment is the larger.
The token embedding's backward holds the gradient handed in and a new dense table gradient (V h);
the position embedding the gradient, the gradient it hands on and two position-table-sized sums;
the final norm the gradient, the one it hands on and its gain and bias gradients; the head the
logits' gradient, its input gradient and a new table gradient (w V h / t under vocabulary
parallelism). Full recomputation is the stage walk's (`pipefold.plan.stages.backward_temporaries`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipefold.errors import ConfigError

__all__ = ["GptTemporaryShape", "block_backward_temporary", "embedding_backward_temporary",
           "gpt_backward_temporaries", "head_backward_temporary", "norm_backward_temporary",
           "position_backward_temporary"]


@dataclass(frozen=True)
class GptTemporaryShape:
    """The sizes the temporaries depend on, for one micro-batch on one tensor-parallel rank."""

    rows: int
    seq_len: int
    d_model: int
    num_heads: int
    vocab_size: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    vocab_parallel: bool = False
    value_bytes: int = 4
    """The compute dtype's bytes per value."""
    parameter_bytes: int = 4
    """Bytes per weight element: above `value_bytes`, autocast (fp32 stream and norms, a 16-bit
    weight gradient and its fp32 copy)."""

    def __post_init__(self) -> None:
        for name in ("rows", "seq_len", "d_model", "num_heads", "vocab_size", "tensor_parallel",
                     "value_bytes", "parameter_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GptTemporaryShape.{name} = {value!r}; give an integer >= 1")

    @property
    def autocast(self) -> bool:
        return self.parameter_bytes > self.value_bytes

    @property
    def stream_bytes(self) -> int:
        return 4 if self.autocast else self.value_bytes

    @property
    def weight_grad_bytes(self) -> int:
        return self.value_bytes + self.parameter_bytes if self.autocast else self.parameter_bytes

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def stream_split(self) -> int:
        return self.tensor_parallel if self.sequence_parallel else 1


def block_backward_temporary(shape: GptTemporaryShape, *, unfused_dropout: bool, saved_bytes: int,
                             recompute_attention: bool = False) -> tuple[int, int]:
    """A decoder block's (total, fixed) backward temporary bytes (module docstring); `saved_bytes`:
    what its forward kept (freed by the end of its backward)."""
    n, h, t, ts = shape.tokens, shape.d_model, shape.tensor_parallel, shape.stream_split
    v, r = shape.value_bytes, shape.stream_bytes
    stream = n * h // ts  # values of one stream-shaped tensor on this rank
    handed = r * stream
    # Under autocast the product's gradient is the 16-bit copy's: its fp32 copy comes at the end.
    fixed = v * (4 * h * h // t + h)
    ending = 0
    if shape.autocast:
        # The casts' backward nodes are older than the block's (the copies are held for the
        # step), so the engine runs them last: every 16-bit weight gradient waits for the end,
        # where each becomes fp32 (fc_out's and fc's are the largest) with the saved tensors freed.
        waiting = v * (12 * h * h // t + 8 * h // t + 2 * h)
        ending_fixed = waiting + shape.parameter_bytes * 4 * h * h // t
        ending = handed + ending_fixed - saved_bytes
    if unfused_dropout:
        into_product = v * stream - stream  # the dropout's gradient, its 1-byte mask freed
    else:
        into_product = v * stream if shape.autocast else 0  # autocast's 16-bit cast of the gradient
    mlp = handed + into_product + 4 * v * n * h // t + fixed
    if ending > mlp:
        return ending, min(ending_fixed, ending)
    if not unfused_dropout:
        return mlp, fixed
    scores = shape.num_heads * shape.seq_len * shape.seq_len * shape.rows // t
    freed = r * stream + v * stream + 2 * stream + 9 * v * n * h // t
    attention = handed + 2 * v * scores - freed
    if recompute_attention:
        attention += (2 * v + 1) * scores
    if attention > mlp:
        return attention, 0
    return mlp, fixed


def gpt_backward_temporaries(shape: GptTemporaryShape, *, block_saved_bytes: int, dropout: bool = False,
                             fused_attention: bool = True, recompute_attention: bool = False
                             ) -> tuple[tuple[int, int], ...]:
    """(total, fixed) backward temporary bytes of the token embedding, the position embedding, a
    block, the final norm and the head on one tp rank, `block_saved_bytes` what a block's forward
    keeps: what both GPT estimates price (`pipefold.plan.gpt_costs`, `pipefold.plan.GptEstimate`)."""
    block = block_backward_temporary(shape, unfused_dropout=not fused_attention,
                                     recompute_attention=recompute_attention, saved_bytes=block_saved_bytes)
    return (embedding_backward_temporary(shape), position_backward_temporary(shape, dropout=dropout), block,
            norm_backward_temporary(shape), head_backward_temporary(shape))


def embedding_backward_temporary(shape: GptTemporaryShape) -> tuple[int, int]:
    """The token embedding's: the gradient handed in and a new dense table gradient (its own rows)."""
    table = shape.vocab_size // (shape.tensor_parallel if shape.vocab_parallel else 1) * shape.d_model
    fixed = shape.parameter_bytes * table
    return shape.stream_bytes * shape.tokens * shape.d_model // shape.stream_split + fixed, fixed


def position_backward_temporary(shape: GptTemporaryShape, *, dropout: bool) -> tuple[int, int]:
    """The position embedding's: the gradient handed in and on, and two table-sized sums over the
    rows; with dropout on the sum, its backward's masked and scaled gradients beside the one handed in."""
    fixed = 2 * shape.stream_bytes * shape.seq_len * shape.d_model
    stream = shape.stream_bytes * shape.tokens * shape.d_model // shape.stream_split
    if dropout and 3 * stream > 2 * stream + fixed:
        return 3 * stream, 0  # the gradient, the dropout's masked and its scaled gradients
    return 2 * stream + fixed, fixed


def norm_backward_temporary(shape: GptTemporaryShape) -> tuple[int, int]:
    """The final norm's: the gradient handed in and on, and new gain and bias gradients (torch's
    layer-norm backward fills buffers of them, then the gradients: 3 pairs of h values)."""
    fixed = 6 * shape.parameter_bytes * shape.d_model
    return 2 * shape.stream_bytes * shape.tokens * shape.d_model // shape.stream_split + fixed, fixed


def head_backward_temporary(shape: GptTemporaryShape) -> tuple[int, int]:
    """The output layer's: the logits' gradient (its vocabulary shard), its input gradient (whole:
    summed over the shards) and a new table gradient."""
    vocab = shape.vocab_size // (shape.tensor_parallel if shape.vocab_parallel else 1)
    v, n, h = shape.value_bytes, shape.tokens, shape.d_model
    fixed = shape.weight_grad_bytes * vocab * h
    return v * n * vocab + v * n * h + fixed, fixed
