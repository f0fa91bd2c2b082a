"""`pipefold train --model <dir> --tensor-parallel T`: a Hugging Face Llama split by
`hf_tensor_parallel_plan`. The refusals run in one process; one run (1 pipeline rank x 2
tp ranks, 2 steps) trains a saved Llama and writes <out>/hf with whole tensors (gathered over
the tp ranks), which `from_pretrained` loads; its first loss is transformers' own."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipefold.cli import train as train_cli
from pipefold.errors import ConfigError

hf = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_hf import VOCAB, gpt2_config, saved_model  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore")
    hf.logging.set_verbosity_error()


def _llama(num_layers: int = 2, heads: int = 4, kv_heads: int = 2):
    return hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def _config_json(tmp_path: Path, name: str, config) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def test_tensor_parallel_is_checked_against_the_model_before_any_rank_starts(tmp_path):
    llama = _config_json(tmp_path, "llama", _llama())
    common = ["--seq-len", "16", "--data", str(_tokens(tmp_path))]
    config = train_cli.config_from_args(_parse(["--model", llama, "--tensor-parallel", "2", *common]))
    assert config.schedule.tensor_parallel == 2
    gpt2 = _config_json(tmp_path, "gpt2", gpt2_config())  # 2 heads
    assert train_cli.config_from_args(_parse(["--model", gpt2, "--tensor-parallel", "2", *common]))
    refused = [
        (["--model", llama, "--tensor-parallel", "4"], r"tensor_parallel=4 .*2 key/value heads"),
        (["--model", _config_json(tmp_path, "gqa", _llama(heads=4, kv_heads=1)), "--tensor-parallel", "2"],
         r"tensor_parallel=2 .*has 1 key/value heads .*dividing 1"),
        (["--model", llama, "--tensor-parallel", "2", "--sequence-parallel"],
         r"sequence_parallel=True .*built-in GPT only"),
        (["--model", _config_json(tmp_path, "gpt2", gpt2_config()), "--tensor-parallel", "4"],
         r"tensor_parallel=4 .*has 2 attention heads"),
    ]
    for argv, pattern in refused:
        with pytest.raises(ConfigError, match=pattern):
            train_cli.config_from_args(_parse([*argv, *common]))


def _tokens(tmp_path: Path) -> Path:
    tokens = tmp_path / "tokens.bin"
    if not tokens.exists():
        (np.arange(4000, dtype=np.uint16) * 7 % VOCAB).astype(np.uint16).tofile(tokens)
    return tokens


@pytest.mark.multiprocess
def test_train_a_llama_with_tensor_parallel_and_save_it_whole(tmp_path):
    import torch

    from pipefold.data import BatchSampler
    from pipefold.data.tokens import load_tokens
    from pipefold.hf.model import next_token_loss
    from pipefold.job.loop import run_local

    directory = saved_model(tmp_path, _llama())
    tokens = _tokens(tmp_path)
    out = tmp_path / "run"
    argv = ["--model", str(directory), "--data", str(tokens), "--steps", "2", "--ranks", "1",
            "--tensor-parallel", "2", "--batch-size", "4", "--microbatches", "2", "--seq-len", "16",
            "--out", str(out), "--set", "sample_tokens=0"]
    result = run_local(train_cli.config_from_args(_parse(argv)), show=False)
    assert result.ok, result.describe()
    summary = json.loads((out / "summary.json").read_text())
    initial = hf.AutoModelForCausalLM.from_pretrained(directory)
    data = load_tokens(tokens, vocab_size=VOCAB)
    inputs, targets = BatchSampler(data.train, batch_size=4, seq_len=16, seed=0).next_batch()
    with torch.no_grad():
        expected = next_token_loss(initial(inputs).logits, targets).item()
    assert summary["losses"][0] == pytest.approx(expected, rel=1e-5)
    trained = hf.AutoModelForCausalLM.from_pretrained(out / "hf")
    before, after = initial.state_dict(), trained.state_dict()
    assert sorted(before) == sorted(after)
    assert all(before[name].shape == after[name].shape for name in before)  # whole, not shards
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])  # trained
