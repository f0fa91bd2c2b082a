"""`pipefold profile --model` and `pipefold plan --model ... --measure` on a tiny Hugging Face Llama
(random weights from a config.json, one process): the measured layers are `pipefold.split`'s
(prefix, each block, suffix), with F, B, I and W timed and the parameter bytes the estimate's."""

from __future__ import annotations

import json

import pytest

from pipefold.cli.main import main
from pipefold.plan import ModelCosts
from pipefold.plan.hf_estimate import hf_costs

transformers = pytest.importorskip("transformers")

LLAMA = {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 16,
    "tie_word_embeddings": False,
}
RUN = ["--seq-len", "8", "--batch-size", "4", "--microbatches", "2", "--repeats", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def config_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "config.json"
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    config.to_json_file(path, use_diff=False)
    return path


def test_profile_measures_the_split_layers(config_json, tmp_path, capsys):
    out = tmp_path / "costs.json"
    assert main(["profile", "--model", str(config_json), *RUN, "--out", str(out)]) == 0
    assert "per-layer costs" in capsys.readouterr().out
    costs = ModelCosts.from_json(out)
    assert costs.num_layers == 2 + 2
    assert costs.reference_rows == 2
    assert "Hugging Face llama" in costs.source
    for layer in costs.layers:  # per call: a fixed part (pipefold.plan.calibrate) and one per row
        assert layer.forward_s + layer.fixed_s > 0 and layer.backward_s + layer.fixed_s > 0
    for layer in costs.layers[1:3]:
        assert layer.activation_bytes > 0 and layer.output_bytes > 2 * 8 * 16 * 4  # hidden + rotary tables
    estimate = hf_costs(LLAMA, seq_len=8)
    assert [layer.parameter_bytes for layer in costs.layers] == [
        layer.parameter_bytes for layer in estimate.layers
    ]
    assert costs.tied_layers == estimate.tied_layers == ()  # untied: the split finds no shared weight
    # Measured with train's loss: its fp32 log-probabilities (2 rows x 8 tokens x 64 ids), held by
    # the last stage per micro-batch in flight, and its backward's gradients beside them.
    logits = 2 * 8 * 64 * 4
    assert costs.loss_bytes >= logits and costs.loss_backward_bytes >= logits


def test_plan_measures_then_plans(config_json, capsys):
    assert main(["plan", "--model", str(config_json), "--measure", *RUN, "--ranks", "2", "--schedule", "1f1b",
                 "--order-search", "0", "--json", "--calibrate-steps", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"].startswith("measured on cpu, 1 thread(s), median of 1: Hugging Face llama")
    assert f"--model {config_json} --seq-len 8" in out["train_command"]
