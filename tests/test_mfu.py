"""Model FLOPs utilization (`pipefold train --hardware`, metrics.jsonl's `mfu`), in one process:
the GPT's FLOPs per token against torch's own FLOP counter, the utilization formula, the job's
peak from a hardware preset, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipefold.errors import ConfigError
from pipefold.job.config import load_config
from pipefold.job.metrics import metrics_of
from pipefold.job.report import StepStats
from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.plan.estimate import gpt_flops_per_token, model_flops_utilization
from pipefold.plan.hardware import load_hardware


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_are_the_counted_products_plus_attention(tied):
    """torch's FlopCounterMode counts the matrix products of a forward and backward (6 N per
    token: the blocks' and the head's weights, the tied head included); the attention scores
    and their weighting (12 L T d per token; CPU attention kernels are not counted by it) come on top."""
    num_layers, d_model, seq_len, rows = 2, 32, 16, 3
    model = build_reference(gpt_layers(256, d_model, 2, num_layers, seq_len, tie_embeddings=tied), seed=0)
    inputs = torch.randint(0, 256, (rows, seq_len))
    with FlopCounterMode(display=False) as counter:
        gpt_loss(model(inputs), inputs).backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    # Where a torch build counts its attention kernel, that is the attention term, not a product.
    products = sum(flops for op, flops in counts.items() if "scaled_dot_product" not in op)
    assert products > 0
    per_token = products / (rows * seq_len)
    attention = 12 * num_layers * seq_len * d_model
    estimate = gpt_flops_per_token(num_layers=num_layers, d_model=d_model, seq_len=seq_len)
    assert estimate == per_token + attention


def test_mfu_is_model_flops_per_second_over_the_summed_peak():
    assert model_flops_utilization(1e6, 2e3, 4e9) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="peak_flops = 0"):
        model_flops_utilization(1e6, 2e3, 0.0)
    config = load_config(overrides={"hardware": "cpu"})
    cpu = load_hardware("cpu")
    # 2 processes (ranks), one device each, fp32.
    assert config.peak_flops == pytest.approx(cpu.peak("fp32") * 2)
    assert config.flops_per_token == gpt_flops_per_token(num_layers=4, d_model=128, seq_len=128)
    a100 = load_config(overrides={"hardware": "a100-80gb", "precision": "bf16", "schedule.data_parallel": 2})
    assert a100.peak_flops == pytest.approx(load_hardware("a100-80gb").peak("bf16") * 4)
    assert load_config().peak_flops is None
    record = StepStats(0, 3.0, 0.5, 1000.0, 0.1, mfu=0.25)
    assert metrics_of(record)["mfu"] == 0.25
    assert "mfu" not in metrics_of(StepStats(0, 3.0, 0.5, 1000.0, 0.1))


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"hardware": "tpu-v9"}, "hardware='tpu-v9'"),
        ({"hardware": "cpu", "precision": "bf16"}, "peak_flops for ['fp32']"),
    ],
)
def test_bad_hardware_is_refused_naming_the_field(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert names in str(info.value)
