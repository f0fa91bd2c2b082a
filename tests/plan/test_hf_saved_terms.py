"""`pipefold.plan.hf_saved`: each term of a Hugging Face block's saved bytes moves with the config
field it is read from (one process, no torch); the totals against a profile of the real model are
tests/model/test_hf_saved_profile.py."""

from __future__ import annotations

import pytest

from pipefold.errors import ConfigError
from pipefold.plan.hf_estimate import hf_costs
from pipefold.plan.hf_saved import hf_saved_bytes

D, HEADS, INNER = 16, 2, 64
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": D, "n_head": HEADS, "vocab_size": 64, "n_positions": 64}
QUIET = {**GPT2, "activation_function": "gelu", "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": D, "intermediate_size": INNER,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64,
}


def _block(config, t, b=4, p=4, device="cpu"):
    return hf_saved_bytes(config, seq_len=t, bytes_per_value=b, parameter_bytes_per_value=p,
                          device=device).block


def _quadratic(config, **fields):
    """The T x T coefficient (bytes a sample per T²) of a block's saved bytes, from three lengths."""
    one, two, four = (_block(config, t, **fields) for t in (8, 16, 32))
    assert four - 2 * two == 4 * (two - 2 * one)  # a T and a T² term, nothing steeper
    return (two - 2 * one) // (16 * 16 - 2 * 8 * 8)


def test_attention_dropout_on_cpu_keeps_three_fp32_score_tensors_a_head():
    for b, p in ((4, 4), (2, 4), (2, 2)):  # fp32 in every precision: sdpa's math path upcasts on CPU
        assert _quadratic(GPT2, b=b, p=p) == 3 * HEADS * 4
        assert _quadratic({**LLAMA, "attention_dropout": 0.1}, b=b, p=p) == 3 * 4 * 4
    assert _quadratic(QUIET) == _quadratic(LLAMA) == 0  # the fused kernel: no T x T tensor
    assert _quadratic(GPT2, device="cuda") == 0  # CUDA's fused kernels take dropout


def test_the_activation_function_sets_the_intermediate_values_kept():
    t = 8
    fused = _block(QUIET, t, b=2, p=4)
    assert _block({**QUIET, "activation_function": "gelu_new"}, t, b=2, p=4) - fused == 3 * INNER * 2 * t
    assert fused - _block({**QUIET, "activation_function": "relu"}, t, b=2, p=4) == INNER * 2 * t
    assert _block({**LLAMA, "hidden_act": "gelu_new"}, t) - _block(LLAMA, t) == 3 * INNER * 4 * t
    del QUIET["activation_function"]  # GPT2Config's default is gelu_new
    try:
        assert _block(QUIET, t, b=2, p=4) - fused == 3 * INNER * 2 * t
    finally:
        QUIET["activation_function"] = "gelu"


def test_residual_and_embedding_dropout_keep_a_mask_an_element():
    t = 8
    dropped = {**QUIET, "resid_pdrop": 0.1}
    mixed = {"b": 2, "p": 4}
    assert _block(dropped, t, **mixed) - _block(QUIET, t, **mixed) == 2 * D * 2 * t  # mask in the value dtype
    on_cuda = {**mixed, "device": "cuda"}
    assert _block(dropped, t, **on_cuda) - _block(QUIET, t, **on_cuda) == 2 * D * t  # bool
    saved = hf_saved_bytes({**QUIET, "embd_pdrop": 0.1}, seq_len=t, bytes_per_value=2,
                           parameter_bytes_per_value=4)
    assert saved.prefix == t * (8 + 4 * D)  # token ids and a mask of the fp32 embeddings


def test_llama_casts_a_copy_of_the_norms_output_per_linear_under_autocast():
    t = 8
    mixed, pure = _block(LLAMA, t, b=2, p=4), _block(LLAMA, t, b=2, p=2)
    # Mixed: a 16-bit copy per q, k, v, gate, up (5 where pure has 2) and the fp32 stream where pure
    # has 16 bits (each norm's input before the weight, the rotary tables); the norms' fp32 input
    # copies and 1/rms are fp32 in both.
    assert mixed - pure == t * (3 * D * 2 + 2 * (2 * D) + 2 * (D // 4) * 2)


def test_the_estimate_prices_the_terms_and_the_loss_keeps_its_log_probabilities():
    costs = hf_costs(GPT2, seq_len=8, bytes_per_value=2, parameter_bytes_per_value=4)
    saved = hf_saved_bytes(GPT2, seq_len=8, bytes_per_value=2, parameter_bytes_per_value=4)
    assert [layer.activation_bytes for layer in costs.layers] == [
        saved.prefix, saved.block, saved.block, saved.suffix]
    assert costs.loss_bytes == 8 * 64 * 4  # the loss's fp32 log-probabilities, apart from the head's


@pytest.mark.parametrize(("field", "value"), [("activation_function", "mish"), ("attn_pdrop", 1.5),
                                              ("resid_pdrop", "0.1")])
def test_unpriced_or_bad_fields_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=f"{field} = {value!r}"):
        hf_costs({**GPT2, field: value}, seq_len=8)


def test_an_unknown_device_is_refused():
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        hf_costs(GPT2, seq_len=8, device="tpu")
