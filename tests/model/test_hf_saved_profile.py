"""`hf_costs`' saved bytes against what `pipefold profile` measures of the real split Hugging Face
model on CPU (random weights from a config, train mode, transformers' default sdpa attention): a
GPT-2 block with its default dropouts (sdpa's math path and its T x T tensors) and gelu_new, a
Llama block with attention dropout and grouped-query attention, under bf16 autocast (Llama in fp32
too; the fp32 terms one by one: tests/plan/test_hf_saved_terms.py).
Per micro-batch of 2 rows the blocks match exactly but for Llama's rotary tables (one (1, T, d/h) pair
a micro-batch, priced a sample); the prefix less GPT-2's position ids (one (1, T) int64 tensor a
micro-batch); the suffix exactly (the loss's log-probabilities are priced apart, `loss_bytes`)."""

from __future__ import annotations

import pytest

from pipefold.plan.hf_estimate import hf_costs

from .hf_tiny import gpt2_config, llama_config, profiled_tiny

pytest.importorskip("transformers")

T, ROWS, VOCAB = 16, 2, 64
GPT2 = gpt2_config(width=32, seq_len=T, vocab=VOCAB)
LLAMA = llama_config(width=32, seq_len=T, vocab=VOCAB, attention_dropout=0.1)


@pytest.mark.parametrize(("config", "precision"), [(GPT2, "bf16"), (LLAMA, "bf16"), (LLAMA, "fp32")],
                         ids=["gpt2-bf16", "llama-bf16", "llama-fp32"])
def test_the_estimate_saves_what_the_split_model_saves(config, precision):
    profiled = profiled_tiny(config, seq_len=T, rows=ROWS, vocab=VOCAB, precision=precision)
    measured = [layer.activation_bytes for layer in profiled]
    b = 4 if precision == "fp32" else 2
    costs = hf_costs(config, seq_len=T, bytes_per_value=b, parameter_bytes_per_value=4)
    estimate = [ROWS * layer.activation_bytes for layer in costs.layers]
    position_ids = 8 * T if config is GPT2 else 0
    head_dim = 32 // 4
    shared_tables = 0 if config is GPT2 else (ROWS - 1) * 2 * T * head_dim * 4  # one (1, T, d/h) pair, fp32
    assert measured[0] == estimate[0] + position_ids
    assert measured[1:3] == [block - shared_tables for block in estimate[1:3]]
    assert measured[3] == estimate[3]  # the loss's log-probabilities are the costs' loss_bytes
