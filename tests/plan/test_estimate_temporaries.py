"""`GptEstimate`'s backward temporaries (pipefold.plan.estimate_temporaries): the formulas, and
against what `pipefold profile` measures for the built-in GPT on CPU in fp32."""

import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.model.zoo.gpt import gpt_layers, gpt_loss
from pipefold.plan.costs import ModelCosts
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.estimate_temporaries import (
    GptTemporaryShape,
    block_backward_temporary,
    head_backward_temporary,
)
from pipefold.plan.hardware import load_hardware
from pipefold.runtime import profile
from pipefold.simulate import Link


def _shape(**sizes: int | bool) -> GptTemporaryShape:
    base: dict[str, int | bool] = {"rows": 2, "seq_len": 32, "d_model": 64, "num_heads": 4, "vocab_size": 256}
    return GptTemporaryShape(**{**base, **sizes})  # type: ignore[arg-type]


def test_a_fused_fp32_blocks_peak_is_fc_outs_backward() -> None:
    n, h = 2 * 32, 64
    # The stream gradient, the 4h hidden gradient, fc_out's new weight and bias gradients.
    assert block_backward_temporary(_shape(), unfused_dropout=False, saved_bytes=0) == (
        4 * (5 * n * h + 4 * h * h + h), 4 * (4 * h * h + h))
    # A tp rank holds its shards of the hidden gradient and of the weight gradient (the bias whole).
    assert block_backward_temporary(_shape(tensor_parallel=2), unfused_dropout=False, saved_bytes=0) == (
        4 * (n * h + 2 * n * h + 2 * h * h + h), 4 * (2 * h * h + h))


def test_unfused_attention_holds_two_score_tensors_and_more_when_recomputed() -> None:
    shape = _shape(seq_len=512, num_heads=8, d_model=32, value_bytes=2, parameter_bytes=2)
    scores = 8 * 512 * 512 * 2
    total, fixed = block_backward_temporary(shape, unfused_dropout=True, saved_bytes=0)
    assert fixed == 0 and total > 2 * 2 * scores * 0.9  # the scores' moment, no weight gradient in it
    recomputed, _ = block_backward_temporary(shape, unfused_dropout=True, saved_bytes=0,
                                             recompute_attention=True)
    assert recomputed - total == 5 * scores  # the rebuilt softmax output, mask and dropped probabilities
    split, _ = block_backward_temporary(_shape(seq_len=512, num_heads=8, d_model=32, value_bytes=2,
                                               parameter_bytes=2, tensor_parallel=2),
                                        unfused_dropout=True, saved_bytes=0)
    assert split < total * 0.6  # a tp rank holds its heads' scores


def test_autocast_keeps_the_16_bit_weight_gradients_for_the_end_of_the_block() -> None:
    wide = _shape(rows=1, seq_len=8, d_model=512, value_bytes=2, parameter_bytes=4)
    total, fixed = block_backward_temporary(wide, unfused_dropout=False, saved_bytes=0)
    h = 512
    # Every 16-bit weight gradient and fc_out's fp32 copy (fixed), the fp32 gradient handed on.
    assert (total - fixed, fixed) == (4 * 8 * h, 2 * (12 * h * h + 10 * h) + 4 * 4 * h * h)
    # The head's logits gradient is its vocabulary shard under vocabulary parallelism.
    whole, _ = head_backward_temporary(_shape(tensor_parallel=2))
    split, _ = head_backward_temporary(_shape(tensor_parallel=2, vocab_parallel=True))
    assert whole - split == 4 * 64 * 128 + 4 * 128 * 64


def test_a_shape_refuses_a_non_positive_size() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel = 0"):
        _shape(tensor_parallel=0)


def test_the_estimate_carries_them_on_every_layer_and_fixed_within_total() -> None:
    estimate = GptEstimate(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256,
                           hardware=load_hardware("a100-80gb"), megatron=True)
    for tp, sp in ((1, False), (2, False), (2, True)):
        layers = estimate.at(4, tp, Link(), sp).layers
        assert all(0 < layer.backward_temporary_fixed_bytes <= layer.backward_temporary_bytes
                   or layer.backward_temporary_fixed_bytes == 0 < layer.backward_temporary_bytes
                   for layer in layers)


@pytest.mark.parametrize("attention", ["fused", "unfused"])
def test_fp32_formulas_within_5_percent_of_the_profile(attention: str) -> None:
    d_model, heads, seq_len, rows, vocab = 32, 4, 64, 2, 64
    layers = gpt_layers(vocab, d_model, heads, 1, seq_len, attention=attention,
                        dropout=0.1 if attention == "unfused" else 0.0)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    measured = [p.backward_temporary_bytes for p in profile(layers, tokens, num_repeats=1, loss_fn=gpt_loss,
                                                             target=tokens)]
    estimate = GptEstimate(num_layers=1, d_model=d_model, num_heads=heads, seq_len=seq_len, vocab_size=vocab,
                           hardware=load_hardware("cpu"), megatron=attention == "unfused")
    formula = [total for total, _ in estimate.backward_temporaries(rows, 1, False)]
    assert all(abs(f / m - 1) < 0.05 for f, m in zip(formula, measured, strict=True)), (formula, measured)


@pytest.mark.parametrize(("value_bytes", "parameter_bytes", "dtype", "preset"),
                         [(4, 4, "fp32", "cpu"), (2, 4, "bf16", "a100-80gb"), (2, 2, "bf16", "a100-80gb")])
def test_the_flop_estimate_prices_the_temporaries_the_hardware_estimate_does(
        value_bytes: int, parameter_bytes: int, dtype: str, preset: str) -> None:
    from pipefold.plan import gpt_costs
    from pipefold.plan.stages import StageLayout, backward_temporaries

    sizes = {"num_layers": 2, "d_model": 64, "num_heads": 4, "seq_len": 32, "vocab_size": 256}
    flop = gpt_costs(**sizes, bytes_per_value=value_bytes, parameter_bytes_per_value=parameter_bytes)
    estimate = GptEstimate(**sizes, hardware=load_hardware(preset), dtype=dtype,
                           parameter_bytes=parameter_bytes)
    one_row = estimate.at(1, 1, Link(), False)

    def temporaries(costs: ModelCosts) -> list[tuple[int, int]]:
        return [(layer.backward_temporary_bytes, layer.backward_temporary_fixed_bytes)
                for layer in costs.layers]

    # Per sample, each layer's backward and the loss's, and what the loss keeps, alike.
    assert temporaries(flop) == temporaries(one_row)
    loss = (one_row.loss_bytes, one_row.loss_backward_bytes)
    assert (flop.loss_bytes, flop.loss_backward_bytes) == loss != (0, 0)
    # At 4 rows a stage's largest moment too (the weight gradients' part does not scale with the
    # rows), but not under autocast: there a block's moment at the end of its backward (the weight
    # gradients' fp32 copies, as its saved tensors are freed) shrinks per row, which one line per
    # sample cannot follow (docs/plan.md, "What the estimate prices").
    if parameter_bytes > value_bytes:
        return
    layout = StageLayout((0, 3, 6), 4)
    for recompute in ((), (0, 1)):
        assert backward_temporaries(flop, layout, recompute) == backward_temporaries(
            estimate.at(4, 1, Link(), False), layout, recompute)
