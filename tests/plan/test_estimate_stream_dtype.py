"""The estimates price what the runtime saves under autocast over fp32 weights, per device.

Inside a stage the GPT's residual stream is fp32 (fp32 embedding tables; an fp32 tensor plus a
16-bit one is fp32), so its layer norms save fp32 inputs; CUDA's autocast casts a 16-bit input to
fp32 before a norm and saves that copy, while a CPU's norm saves a 16-bit input as it is; and the
built-in GPT runs its fused attention core in fp32 on a CPU (`pipefold.model.zoo.gpt`). Sizes in
units of s b h (tokens x width) bytes; a tiny profile checks the CPU formulas in tests/model.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipefold.plan.estimate import GptEstimate, gpt_costs
from pipefold.plan.hardware import load_hardware
from pipefold.plan.hf_estimate import hf_costs
from pipefold.plan.tensor import split_costs
from pipefold.simulate import Link

S, ROWS, H, HEADS = 32, 2, 64, 4
SBH = S * ROWS * H


def _estimate(device: str, dtype: str, parameter_bytes: int, **kwargs: object) -> GptEstimate:
    preset = load_hardware("cpu" if device == "cpu" else "h100-80gb")
    hardware = replace(preset, peak_flops={**preset.peak_flops, dtype: preset.peak(preset.default_dtype)})
    return GptEstimate(num_layers=2, d_model=H, num_heads=HEADS, seq_len=S, vocab_size=256, hardware=hardware,
                       dtype=dtype, parameter_bytes=parameter_bytes, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "block", "block_from_boundary", "norm_from_boundary"),
    [
        # LN inputs 2 x 4, qkv and MLP inputs 2 x 2, q, k, v and the core's output in fp32 (4 x 4)
        # and the projection's 16-bit copy (2), GELU's input and output 8 x 2; from a 16-bit stage
        # input the norms save 2 x 2.
        ("cpu", 46, 42, 2),
        # A 16-bit core (4 x 2); a norm saves an fp32 copy of a 16-bit input: as from the stream.
        ("cuda", 36, None, None),
    ],
)
def test_bf16_over_fp32_weights_saves_fp32_norm_inputs(device, block, block_from_boundary,
                                                       norm_from_boundary):
    costs = _estimate(device, "bf16", 4).at(ROWS, 1, Link(), False)
    blocks, norm = costs.layers[2], costs.layers[4]
    assert blocks.activation_bytes == block * SBH
    assert norm.activation_bytes == 4 * SBH
    expected = None if block_from_boundary is None else block_from_boundary * SBH
    assert blocks.activation_bytes_from_boundary == expected
    expected = None if norm_from_boundary is None else norm_from_boundary * SBH
    assert norm.activation_bytes_from_boundary == expected
    assert costs.layers[5].activation_bytes == 2 * SBH  # the head keeps its 16-bit cast of its input


@pytest.mark.parametrize(
    ("device", "dtype", "parameter_bytes", "block"),
    [
        ("cpu", "fp32", 4, 64), ("cuda", "fp32", 4, 64), ("cuda", "bf16", 2, 32),
        # bf16 weights: a 16-bit stream, but a CPU's core still saves q, k, v and its output in fp32.
        ("cpu", "bf16", 2, 32 + 4 * (4 - 2) + 2),
    ],
)
def test_one_dtype_throughout_keeps_the_stream_in_it(device, dtype, parameter_bytes, block):
    costs = _estimate(device, dtype, parameter_bytes).at(ROWS, 1, Link(), False)
    value_bytes = 4 if dtype == "fp32" else 2
    assert costs.layers[2].activation_bytes == block * SBH
    assert costs.layers[4].activation_bytes == SBH * value_bytes
    assert costs.layers[2].activation_bytes_from_boundary is None


def test_a_recomputed_core_keeps_its_16_bit_inputs_on_cpu():
    estimate = _estimate("cpu", "bf16", 4, recompute_attention=True)
    # LN inputs 8, qkv and MLP inputs 4, q, k, v and the projection's input 4 x 2, GELU's 16.
    assert estimate.block_activation_bytes(ROWS, 1, False) == 36 * SBH


@pytest.mark.parametrize("tensor_parallel", [2, 4])
def test_tensor_parallelism_keeps_the_fp32_norm_inputs_whole(tensor_parallel):
    estimate = _estimate("cuda", "bf16", 4)
    # Whole: LN inputs 8 and qkv and MLP inputs 4; split: 24.
    assert estimate.block_activation_bytes(ROWS, tensor_parallel, False) == (12 + 24 // tensor_parallel) * SBH
    assert estimate.block_activation_bytes(ROWS, tensor_parallel, True) == 36 * SBH // tensor_parallel
    assert estimate.block_tensor_parallel_share() == pytest.approx(24 / 36)
    # The costs at tp = 1 carry that share, so splitting them prices as `at` does.
    split = split_costs(estimate.at(ROWS, 1, Link(), False), tensor_parallel, Link())
    assert split.layers[2].activation_bytes == estimate.block_activation_bytes(ROWS, tensor_parallel, False)


def test_gpt_costs_in_mixed_precision_follows_cuda():
    t, d = 16, 32
    costs = gpt_costs(num_layers=2, d_model=d, num_heads=4, seq_len=t, bytes_per_value=2,
                      parameter_bytes_per_value=4)
    block, norm = costs.layers[2], costs.layers[4]
    assert block.activation_bytes == 36 * t * d
    assert norm.activation_bytes == 4 * t * d
    assert block.activation_bytes_from_boundary is None and norm.activation_bytes_from_boundary is None
    assert block.tensor_parallel_activation_share == pytest.approx(24 / 36)
    assert split_costs(costs, 2, Link()).layers[2].activation_bytes == (12 + 12) * t * d
    pure = gpt_costs(num_layers=2, d_model=d, num_heads=4, seq_len=t, bytes_per_value=2)
    assert pure.layers[2].activation_bytes == 32 * t * d
    assert pure.layers[2].tensor_parallel_activation_share == 0.75


GPT2 = {"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 3, "hidden_size": 16, "intermediate_size": 40,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32,
}


def test_hf_gpt2_in_mixed_precision_is_priced_as_the_builtin_gpt_inside_a_stage():
    # With the built-in GPT's fused GELU and no dropout a GPT-2 block saves what the GPT's estimate
    # prices plus what that leaves out by design: two norms' fp32 mean and 1/std, the fused
    # attention's fp32 log-sum-exp a head (8 + 8 + 4 h bytes a token).
    like_gpt = {**GPT2, "activation_function": "gelu_pytorch_tanh", "attn_pdrop": 0.0, "resid_pdrop": 0.0}
    hf = hf_costs(like_gpt, seq_len=16, bytes_per_value=2, parameter_bytes_per_value=4)
    gpt = gpt_costs(num_layers=3, d_model=16, num_heads=2, seq_len=16, vocab_size=64, bytes_per_value=2,
                    parameter_bytes_per_value=4)
    for ours, theirs in zip(hf.layers[1:4], gpt.layers[2:5], strict=True):
        left_out = 16 * (16 + 4 * 2)  # 16 tokens
        assert (ours.activation_bytes, ours.stage_output, ours.stage_output_from_boundary) == (
            theirs.activation_bytes + left_out, theirs.stage_output, theirs.stage_output_from_boundary)
    assert hf.layers[0].stage_output == 16 * 16 * 4  # the embeddings hand on the fp32 stream
    assert hf.layers[-1].stage_output_bytes is None  # nothing follows the head in its stage


def test_hf_llama_blocks_carry_fp32_rotary_tables_inside_a_stage():
    t, d, head_dim = 8, 16, 4
    carried = t * d + 2 * t * head_dim
    mixed = hf_costs(LLAMA, seq_len=t, bytes_per_value=2, parameter_bytes_per_value=4)
    for layer in mixed.layers[:-1]:
        assert layer.output_bytes == 2 * carried and layer.stage_output == 4 * carried
    assert [layer.stage_output_from_boundary for layer in mixed.layers[1:-1]] == [2 * carried] * 3
    for plain in (hf_costs(LLAMA, seq_len=t), hf_costs(LLAMA, seq_len=t, bytes_per_value=2)):
        assert all(layer.stage_output_bytes is None for layer in plain.layers)  # one dtype throughout
