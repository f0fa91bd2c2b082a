"""What a Hugging Face decoder's split layers save for backward, per sample, from its config.json.

    saved = hf_saved_bytes(config, seq_len=512, bytes_per_value=2, parameter_bytes_per_value=4)
    saved.block        # bytes one decoder block's forward keeps until its backward

The terms are the tensors autograd saves as `pipefold train --model DIR` runs the model
(`pipefold.hf.model.load_causal_lm`: transformers' default attention, "sdpa", in train mode),
read off a saved-tensor hook on tiny GPT-2 and Llama configs on CPU with transformers 5 and torch
2.13 (BENCHMARKS.md, "h-hfsaved"). Per token, with width d, d/h-wide heads (h query heads, kv the
key/value width), intermediate width I, b bytes a value, s bytes of the residual stream (4: fp32
weights, fp32 embeddings, under autocast too; b where the weights are 16-bit), sequence length T:

- layer norm (GPT-2): its input, the stream (s·d), and its fp32 mean and 1/std (8);
  RMSNorm (Llama): an fp32 copy of its input (4d), the fp32 1/rms (4), the normalized value
  before the weight in the input's dtype (s·d);
- each linear's input (b·d), made by autocast's cast once per linear where 16-bit values meet an
  fp32 stream: Llama's q, k and v projections each save their own copy (3 b·d), its gate and up
  projections theirs (2 b·d); GPT-2's fused c_attn one; without a cast all share one;
- the activation: `ACTIVATION_SAVES` I-wide values of its own (gelu_new, transformers' Python
  tanh-GELU, keeps 4: its input, 0.5·x, tanh, 1 + tanh; the fused `gelu` / `gelu_pytorch_tanh` /
  `silu` their input; relu its output, which the next linear saves anyway), plus the output
  projection's input (I), plus for the gated MLP the up projection and the product (2 I);
- attention without dropout (`attn_pdrop` / `attention_dropout` 0): sdpa's fused kernel keeps q,
  k, v (2d + 2kv values), its output (d, the output projection's input) and a log-sum-exp
  (4 bytes a head); with dropout, on CPU, sdpa falls back to its math path, which keeps q, k and v
  in fp32 with k and v widened to all heads (12d bytes), its output (b·d) and three fp32 T x T
  tensors a head (probabilities, dropout mask, dropped probabilities: 12·h·T bytes a token);
- Llama's rotary embedding: the cos and sin tables (2·d/h values of the stream's dtype) and,
  since a stage's received tables require grad, q, rotate_half(q), k, rotate_half(k) (2d + 2kv);
- dropout (`resid_pdrop` twice a GPT-2 block, `embd_pdrop` in the prefix): a mask per element in
  the dropped tensor's dtype (b in a block, s in the prefix);
- the prefix: its token ids (int64, 8 bytes); the suffix: the final norm and the head's input.
On "cuda" (assumed, not measured here) dropout masks are bool (1 byte) and sdpa's fused kernels
take dropout, so no T x T term: the no-dropout attention terms hold.

Per sample, as every cost: what is one tensor a micro-batch is priced a sample, so a micro-batch of
r rows counts r copies of Llama's rotary tables where it holds one (2·d/h·s bytes a token each
further row: a small overcount). Not priced: GPT-2's position ids (one (1, T) int64 tensor a
micro-batch); with one row a micro-batch, GPT-2's dropout attention in fp32 keeps v as a view of
c_attn's fused 3d-wide output (8d bytes a token more; from two rows on the math path copies it); that
the blocks of the stage holding the prefix get rotary tables that need no grad and so skip q, k
and their rotations (2d + 2kv values a token less): the estimate is the later stages' (the profile
measures every layer that way). An `_attn_implementation` other than sdpa (eager keeps the scores
and probabilities, T x T a head, also without dropout) is not read: pipefold builds the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipefold.errors import ConfigError

__all__ = ["ACTIVATION_SAVES", "GPT2_DROPOUT", "SAVED_ON", "SavedBytes", "hf_saved_bytes", "probability"]

ACTIVATION_SAVES = {
    "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu": 0, "quick_gelu": 2, "gelu_new": 4,
    "gelu_fast": 7,
}
"""I-wide values an activation function (transformers' ACT2FN name) saves beyond its output, as
measured: quick_gelu x and sigmoid(1.702x); gelu_fast, a Python tanh-GELU of x·(1 + 0.044715·x²), 7."""

SAVED_ON = ("cpu", "cuda")
"""Devices whose saved tensors the estimate knows: "cpu" measured, "cuda" assumed."""


@dataclass(frozen=True)
class SavedBytes:
    """Bytes saved for backward per sample: the prefix, one decoder block, the suffix (the final norm
    and the head's input; the loss's logits are not in it)."""

    prefix: int
    block: int
    suffix: int


GPT2_DROPOUT = 0.1
"""GPT2Config's default `attn_pdrop`, `resid_pdrop` and `embd_pdrop` (where config.json omits them;
the Llama family's `attention_dropout` defaults to 0)."""


def probability(config: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"config.json: {key} = {value!r}; give a dropout probability in [0, 1)")
    return float(value)


def _activation(config: Mapping[str, Any], key: str, default: str) -> int:
    name = config.get(key, default)
    if name not in ACTIVATION_SAVES:
        raise ConfigError(
            f"config.json: {key} = {name!r} has no saved-bytes estimate; estimated: "
            f"{', '.join(sorted(ACTIVATION_SAVES))} (or measure it: pipefold profile --model DIR)"
        )
    return ACTIVATION_SAVES[name]


def hf_saved_bytes(
    config: Mapping[str, Any], *, seq_len: int, bytes_per_value: int, parameter_bytes_per_value: int,
    device: str = "cpu",
) -> SavedBytes:
    """What the prefix, a block and the suffix of the decoder `config` (a parsed config.json of a
    gpt2, llama, mistral or qwen2 model) save per sample of `seq_len` tokens, as the module docstring
    prices it. `bytes_per_value`: the activations' (2 under bf16 autocast); `parameter_bytes_per_value`:
    the weights' (4 under autocast), which set the stream's dtype."""
    if device not in SAVED_ON:
        raise ConfigError(f"hf_saved_bytes: device = {device!r}; give one of {', '.join(SAVED_ON)}")
    t, b = seq_len, bytes_per_value
    s = 4 if parameter_bytes_per_value >= 4 else b  # the stream: fp32 from fp32 embeddings on
    cast = b < s  # each linear casts its fp32 input to 16 bits, a copy per linear
    cuda = device == "cuda"
    mask_bytes = 1 if cuda else b
    gpt2 = str(config.get("model_type", "")) == "gpt2"
    d = int(config["n_embd" if gpt2 else "hidden_size"])
    heads = int(config["n_head" if gpt2 else "num_attention_heads"])
    if gpt2:
        inner = int(config.get("n_inner") or 4 * d)
        kv = d
        attention_dropout = probability(config, "attn_pdrop", GPT2_DROPOUT)
        own = _activation(config, "activation_function", "gelu_new")
    else:
        inner = int(config["intermediate_size"])
        head_dim = int(config.get("head_dim") or d // heads)
        kv = int(config.get("num_key_value_heads") or heads) * head_dim
        attention_dropout = probability(config, "attention_dropout")
        own = _activation(config, "hidden_act", "silu")
    if attention_dropout and not cuda:  # sdpa's math path: fp32 q, k, v over all heads, three T x T
        attention = 12 * d + b * d + 12 * heads * t
    else:
        attention = (2 * d + 2 * kv) * b + 4 * heads
    if gpt2:
        residual_masks = 2 * d * mask_bytes if probability(config, "resid_pdrop", GPT2_DROPOUT) else 0
        per_token = (2 * (s * d + 8) + 2 * b * d + attention + residual_masks + (own + 1) * inner * b)
        embedding_mask = d * (1 if cuda else s) if probability(config, "embd_pdrop", GPT2_DROPOUT) else 0
        prefix = 8 + embedding_mask
        suffix = s * d + 8 + b * d
    else:
        rms = 4 * d + 4 + s * d
        inputs = (5 if cast else 2) * b * d
        rotary = 2 * head_dim * s + (2 * d + 2 * kv) * b
        per_token = 2 * rms + inputs + rotary + attention + (own + 3) * inner * b
        prefix = 8
        suffix = rms + b * d
    return SavedBytes(prefix=t * prefix, block=t * per_token, suffix=t * suffix)
