"""`hf_costs`' backward temporaries against what `pipefold profile` measures of the real split Hugging
Face model on CPU (random weights from a config, train mode, sdpa attention; the allocator's bytes
are deterministic): the prefix and the suffix as the built-in GPT's embedding and head, a GPT-2
block in fp32 exactly, the others within what the module docstring of `pipefold.plan.hf_temporaries`
states. Before these were priced the estimate had none (0 bytes), and `pipefold plan --model`'s
totals were 7-12% under the CPU allocator's peaks of `pipefold train` (BENCHMARKS.md, "h-hfpeaks")."""

from __future__ import annotations

import pytest

from pipefold.plan.hf_estimate import hf_costs

from .hf_tiny import gpt2_config, llama_config, profiled_tiny

pytest.importorskip("transformers")

T, ROWS, VOCAB = 32, 2, 256
GPT2 = gpt2_config(width=64, seq_len=T, vocab=VOCAB)
LLAMA = llama_config(width=64, seq_len=T, vocab=VOCAB)


@pytest.mark.parametrize(("config", "precision", "block_within"),
                         [(GPT2, "fp32", 0.0), (GPT2, "bf16", 0.08), (LLAMA, "fp32", 0.0),
                          (LLAMA, "bf16", 0.05)],
                         ids=["gpt2-fp32", "gpt2-bf16", "llama-fp32", "llama-bf16"])
def test_the_estimate_prices_the_backward_temporaries_the_profile_measures(config, precision, block_within):
    measured = [layer.backward_temporary_bytes
                for layer in profiled_tiny(config, seq_len=T, rows=ROWS, vocab=VOCAB, precision=precision)]
    b = 4 if precision == "fp32" else 2
    costs = hf_costs(config, seq_len=T, bytes_per_value=b, parameter_bytes_per_value=4)
    # A cost is per sample plus a part that does not grow with the rows (the weight gradients).
    estimate = [ROWS * (layer.backward_temporary_bytes - layer.backward_temporary_fixed_bytes)
                + layer.backward_temporary_fixed_bytes for layer in costs.layers]
    assert estimate[0] == pytest.approx(measured[0], rel=0.01)  # the gradient handed in, the table's
    assert estimate[1] == estimate[2]
    assert estimate[1] == pytest.approx(measured[1], rel=block_within) and measured[1] == measured[2]
    assert estimate[-1] == pytest.approx(measured[-1], rel=0.15)
    assert costs.keeps_receive_buffers and costs.loss_backward_bytes == 2 * T * VOCAB * 4
