"""`pipefold.plan.hf_estimate` and `pipefold plan --model DIR_OR_CONFIG` (one process, no ranks).

The estimate is checked against what it claims to be: with an MLP of 4 x the width a GPT-2
config prices its blocks' times, head and boundaries as the built-in GPT's estimate does (its
saved bytes: tests/plan/test_hf_saved_terms.py); the
parameter bytes of every layer equal the real Hugging Face model's, cut by `pipefold.split`
(GPT-2, its tied table counted in both the prefix and the suffix as each holds it; Llama with
grouped-query attention). The plan of a config.json ends in the
`pipefold train --model` command that runs it; a family without an estimate is refused
naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import gpt_costs
from pipefold.plan.hf_estimate import hf_costs

GPT2 = {"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 3, "hidden_size": 16, "intermediate_size": 40,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}
QWEN2 = {**LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}  # biased q, k, v projections
LLAMA_BIASES = {**LLAMA, "attention_bias": True, "mlp_bias": True}


def test_a_gpt2_config_is_priced_as_the_builtin_gpt():
    hf = hf_costs(GPT2, seq_len=16, flops=1e9)
    gpt = gpt_costs(num_layers=3, d_model=16, num_heads=2, seq_len=16, vocab_size=64, flops=1e9)
    assert hf.num_layers == 3 + 2  # prefix, 3 blocks, suffix (pipefold.split's layers)
    for ours, theirs in zip(hf.layers[1:4], gpt.layers[2:5], strict=True):
        assert (ours.forward_s, ours.backward_s, ours.weight_s) == pytest.approx(
            (theirs.forward_s, theirs.backward_s, theirs.weight_s))
        assert (ours.output_bytes, ours.parameter_bytes) == (theirs.output_bytes, theirs.parameter_bytes)
    head, norm = gpt.layers[-1], gpt.layers[-2]
    assert hf.layers[-1].forward_s == pytest.approx(head.forward_s + norm.forward_s)
    assert "Hugging Face gpt2" in hf.source and "not a measurement" in hf.source


def test_parameter_bytes_are_the_real_models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pipefold.model import split

    llama = transformers.LlamaForCausalLM
    for config, cls in ((GPT2, transformers.GPT2LMHeadModel), (LLAMA, llama),
                        (QWEN2, transformers.Qwen2ForCausalLM), (LLAMA_BIASES, llama)):
        model = cls(transformers.AutoConfig.for_model(**config))
        layers = split(model, example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
        real = [sum(p.numel() * 4 for p in layer.parameters()) for layer in layers]
        estimated = [layer.parameter_bytes for layer in hf_costs(config, seq_len=8).layers]
        assert estimated == real, config["model_type"]


def test_llama_blocks_carry_the_rotary_tables_and_use_grouped_attention():
    costs = hf_costs(LLAMA, seq_len=8, bytes_per_value=2)
    d, kv, inner, t = 16, 2 * 4, 40, 8
    block = costs.layers[1]
    assert block.output_bytes == (t * d + 2 * t * 4) * 2
    products = 2 * t * (2 * d * d + 2 * d * kv + 3 * d * inner)
    assert block.forward_s == pytest.approx((products + 4 * t * t * d) / 1e12)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**GPT2, "model_type": "bert"}, "model_type='bert' has no cost estimate"),
        ({**GPT2, "n_head": 3}, "hidden size 16 is not divisible by 3 attention heads"),
        ({k: v for k, v in LLAMA.items() if k != "intermediate_size"}, "no intermediate_size"),
    ],
)
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        hf_costs(config)


def test_seq_len_beyond_the_positions_is_refused():
    with pytest.raises(ConfigError, match="--seq-len = 64 exceeds the model's 32 positions"):
        hf_costs(GPT2, seq_len=64)


def test_plan_a_config_json_and_get_the_train_command(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    assert main(["plan", "--model", str(path), "--seq-len", "16", "--ranks", "2", "--batch-size", "8",
                 "--schedule", "1f1b", "--order-search", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Hugging Face gpt2" in out["source"]
    assert sum(out["choice"]["pipeline_kwargs"]["partition"]) == 5
    command = out["train_command"]
    assert command.startswith("pipefold train --schedule 1f1b --ranks 2 --microbatches ")
    assert f"--model {path} --seq-len 16 --partition " in command and "--num-layers" not in command


def test_plan_a_config_json_on_a_hardware_file_prices_that_model(tmp_path, capsys):
    # --hardware once planned the built-in GPT's default sizes in place of --model DIR.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    words = ["plan", "--model", str(path), "--seq-len", "16", "--ranks", "2", "--batch-size", "8",
             "--schedule", "1f1b", "--order-search", "0", "--json"]
    assert main([*words, "--hardware", "h100-80gb"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Hugging Face gpt2" in out["source"] and "hardware h100-80gb: its bf16 peak" in out["source"]
    assert sum(out["choice"]["pipeline_kwargs"]["partition"]) == 5  # the config's 3 blocks, not the GPT's
    assert main([*words, "--hardware", "h100-80gb", "--megatron"]) != 0
    assert "--megatron shapes the built-in GPT's estimate" in capsys.readouterr().err


def test_plan_refuses_an_unsupported_family_without_torch(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GPT2, "model_type": "bert"}))
    script = (
        "import sys\nfrom pipefold.cli.main import main\n"
        f"code = main(['plan', '--model', {str(path)!r}])\n"
        "print('torch imported:', 'torch' in sys.modules, 'exit', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "torch imported: False exit 2" in result.stdout, result.stderr
    assert "model_type='bert', a family pipefold does not support" in result.stderr


@pytest.mark.parametrize("config", [GPT2, LLAMA, QWEN2], ids=lambda config: config["model_type"])
def test_the_copies_are_what_a_bf16_profile_holds_layer_by_layer(config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pipefold.model import split
    from pipefold.runtime import profile

    classes = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
               "qwen2": transformers.Qwen2ForCausalLM}
    torch.manual_seed(0)
    model = classes[config["model_type"]](transformers.AutoConfig.for_model(**config))
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    layers = split(model, example_inputs=(ids,))
    profiles = profile(layers, ids, num_repeats=1, precision="bf16")
    measured = [p.held_cast_bytes for p in profiles]
    mixed = hf_costs(config, seq_len=8, bytes_per_value=2, parameter_bytes_per_value=4)
    # The linears' (Conv1D's) weights and biases, the head's weight; no norm, no embedding.
    assert [layer.cast_bytes for layer in mixed.layers] == measured
    # ... of which a forward keeps the weights' copies for its backward (full sharding: per micro-batch).
    assert [layer.saved_casts for layer in mixed.layers] == [p.cast_bytes for p in profiles]
    assert measured[0] == 0 and all(measured[1:])
    assert [layer.parameter_bytes for layer in mixed.layers] == [
        sum(p.numel() * 4 for p in layer.parameters()) for layer in layers]
    # fp32, and bf16 weights (bf16-pure): nothing cast.
    for fields in ({}, {"bytes_per_value": 2}):
        assert not any(layer.cast_bytes for layer in hf_costs(config, seq_len=8, **fields).layers)


def test_the_estimate_in_bf16_prices_fp32_weights_their_copies_and_the_casts_time():
    bandwidth = 1e10
    mixed = hf_costs(GPT2, seq_len=16, bytes_per_value=2, parameter_bytes_per_value=4,
                     memory_bandwidth=bandwidth)
    fp32 = hf_costs(GPT2, seq_len=16)
    pure = hf_costs(GPT2, seq_len=16, bytes_per_value=2)
    assert [layer.parameter_bytes for layer in mixed.layers] == [
        layer.parameter_bytes for layer in fp32.layers]
    assert mixed.tied_bytes == fp32.tied_bytes == (64 * 16 * 4,)
    assert pure.optimizer_bytes_per_parameter_byte == 6 == 3 * mixed.optimizer_bytes_per_parameter_byte
    elements = sum(layer.cast_bytes for layer in mixed.layers) // 2
    # Read each fp32 weight, write its copy: 6 bytes an element, at the device's memory bandwidth.
    assert mixed.cast_s_per_parameter_byte * mixed.parameter_bytes == pytest.approx(elements * 6 / bandwidth)
    assert "weight casts at 1e+10 B/s" in mixed.source
    with pytest.raises(ConfigError, match="memory_bandwidth = 0"):
        hf_costs(GPT2, memory_bandwidth=0)


def test_plan_a_config_json_in_bf16_prices_the_copies(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    argv = ["plan", "--model", str(path), "--seq-len", "16", "--ranks", "2", "--batch-size", "8",
            "--schedule", "1f1b", "--microbatches", "4", "--recompute", "none", "--order-search", "0",
            "--json"]
    plans = {}
    for precision in ("fp32", "bf16"):
        assert main([*argv, "--precision", precision]) == 0
        plans[precision] = json.loads(capsys.readouterr().out)
    for fp32, bf16 in zip(plans["fp32"]["choice"]["memory"], plans["bf16"]["choice"]["memory"], strict=True):
        assert fp32["casts"] == 0 < bf16["casts"] and fp32["weights"] == bf16["weights"]
    # The blocks' linears and the head's weight (tied to the embedding, which casts nothing), 2 bytes each.
    blocks = 3 * (4 * 16 * 16 + 2 * 16 * 64 + 5 * 16 + 64)
    assert sum(rank["casts"] for rank in plans["bf16"]["choice"]["memory"]) == 2 * (blocks + 64 * 16)
    assert "weight casts at 9e+09 B/s (the cpu preset's" in plans["bf16"]["source"]
    assert "--precision bf16" in plans["bf16"]["train_command"]
