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
    config = load_config(overrides={"hardware": "cpu", "precision": "fp32"})
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hugging_face_flops_per_token_come_from_its_config(tmp_path, family):
    """A Hugging Face model's FLOPs per token (`--model ... --hardware`) from its config.json alone:
    the products torch's FlopCounterMode counts in transformers' own forward and backward (6 N:
    llama's grouped-query key/value projections and gated MLP, gpt2's plain MLP and tied head),
    plus the attention term 12 L T (heads x head_dim), which gpt2's eager attention shows as its
    batched products."""
    import sys
    from pathlib import Path

    hf = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "model"))
    from test_hf import gpt2_config, llama_config, tokenizer_files

    config = llama_config(num_layers=2) if family == "llama" else gpt2_config(num_layers=2)
    config.to_json_file(tmp_path / "config.json")
    tokenizer_files(tmp_path)
    seq_len, rows = 16, 3
    train = load_config(overrides={
        "model.path": str(tmp_path / "config.json"), "model.seq_len": seq_len, "hardware": "cpu",
    })
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(config)
    inputs = torch.randint(0, config.vocab_size, (rows, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(inputs).logits.sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    tokens = rows * seq_len
    products = (counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)) / tokens
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size  # heads x head_dim = d here
    if "aten.bmm" in counts:  # eager attention: the scores and their weighting
        assert counts["aten.bmm"] / tokens == attention
    assert products > 0
    assert train.flops_per_token == products + attention
    assert train.peak_flops is not None  # mfu is reported for it
