"""What the backward of each of a Hugging Face decoder's split layers allocates beyond its saved tensors.

    prefix, block, suffix = hf_backward_temporaries(config, seq_len=512, bytes_per_value=2,
                                                    parameter_bytes_per_value=4)   # (total, fixed) each

`hf_costs` prices these as `LayerCost.backward_temporary_bytes` (and the part that does not grow
with the rows as `backward_temporary_fixed_bytes`), per sample as `pipefold profile --model`
measures them (`LayerProfile.backward_temporary_bytes`: the most bytes live at once during one
backward, counted from the end of its forward). Tokens N of a sample, width d, intermediate (MLP)
width I, vocabulary V, b bytes a value, s bytes of the residual stream (4 under autocast over fp32
weights, else b), w bytes of a new weight gradient (`GptTemporaryShape.weight_grad_bytes`):

- the prefix: the token embedding's, as the built-in GPT's (the gradient handed in, s·N·d, and a
  dense V x d table gradient at the weights' bytes; `embedding_backward_temporary`);
- a block: its MLP's output projection's moment: the stream gradient handed in (s·N·d; under
  autocast also two 16-bit d-wide tensors, 2b·N·d), the gradient of the I-wide activation (b·N·I;
  two under autocast), and the projection's new weight and bias gradients (b·(I·d + bias) under
  autocast, whose fp32 copies come later, else 4·(I·d + bias)): the fixed part. GPT-2 with
  attention dropout: or sdpa's math path, four fp32 T x T tensors a head (16·h·T·N bytes), where
  larger. Llama's gated MLP: or, once that weight gradient is done, the activation's and the up
  projection's I-wide gradients (2b·N·I) beside the stream's, where larger; plus the rotary
  tables' gradient (2·T·d/h·s, fixed). A cost is linear in the rows, so the larger moment is
  chosen at one sample: where the other takes over at more rows (GPT-2's attention, Llama's gated
  moment in fp32: at 4 rows of 32 tokens, d 64) the block is priced up to 20% short of the
  profile; the block's temporary is a few percent of a rank's peak;
- the suffix: the head's, as the built-in GPT's (the logits' gradient, its input gradient and a new
  V x d table gradient; `head_backward_temporary`).
Measured against `pipefold profile` of tiny GPT-2 and Llama configs on CPU at 2 rows of 32 tokens
(tests/plan/test_hf_temporaries.py): in fp32 every layer exact but GPT-2's prefix (0.3% over);
under bf16 autocast the blocks 7% (GPT-2) and 4% (Llama) off, Llama's head 12% over. BENCHMARKS.md,
"h-hfpeaks", has the plans against `pipefold train`'s allocator peaks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipefold.plan.estimate_temporaries import (
    GptTemporaryShape,
    embedding_backward_temporary,
    head_backward_temporary,
)
from pipefold.plan.hf_saved import GPT2_DROPOUT, probability

__all__ = ["hf_backward_temporaries"]


def hf_backward_temporaries(config: Mapping[str, Any], *, seq_len: int, bytes_per_value: int,
                            parameter_bytes_per_value: int) -> tuple[tuple[int, int], ...]:
    """(total, fixed) backward temporary bytes of the prefix, one block and the suffix of the
    decoder `config` (a parsed config.json of a gpt2, llama, mistral or qwen2 model) for one sample
    of `seq_len` tokens, as the module docstring prices them."""
    gpt2 = str(config.get("model_type", "")) == "gpt2"
    d = int(config["n_embd" if gpt2 else "hidden_size"])
    heads = int(config["n_head" if gpt2 else "num_attention_heads"])
    inner = int(config.get("n_inner") or 4 * d) if gpt2 else int(config["intermediate_size"])
    mlp_bias = d if gpt2 or (str(config.get("model_type")) == "llama" and config.get("mlp_bias")) else 0
    shape = GptTemporaryShape(rows=1, seq_len=seq_len, d_model=d, num_heads=heads,
                              vocab_size=int(config["vocab_size"]), value_bytes=bytes_per_value,
                              parameter_bytes=parameter_bytes_per_value)
    b, n, s = shape.value_bytes, shape.tokens, shape.stream_bytes
    gradient_bytes = b if shape.autocast else shape.parameter_bytes
    handed = s * n * d + (2 * b * n * d if shape.autocast else 0)
    widths = 2 if shape.autocast else 1
    mlp_fixed = gradient_bytes * (inner * d + mlp_bias)
    mlp = handed + widths * b * n * inner + mlp_fixed
    if gpt2:
        block = (mlp, mlp_fixed)
        if probability(config, "attn_pdrop", GPT2_DROPOUT):  # sdpa's math path: four fp32 T x T a head
            block = max(block, (16 * heads * seq_len * n, 0))
    else:
        # The gated MLP's input gradient: the activation's and the up projection's I-wide gradients
        # once the output projection's weight gradient is done; the rotary tables' gradient beside.
        head_dim = int(config.get("head_dim") or d // heads)
        rotary = 2 * seq_len * head_dim * s
        gated = handed + 2 * b * n * inner
        block = (mlp + rotary, mlp_fixed + rotary) if mlp >= gated else (gated + rotary, rotary)
    return embedding_backward_temporary(shape), block, head_backward_temporary(shape)
