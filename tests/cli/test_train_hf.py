"""`pipefold train --model`: a Hugging Face model trained from the CLI, refused early when bad.

The refusals run in one process, before torch is imported (checked in a fresh interpreter).
One multi-process run (2 ranks, 20 steps, ~30-60 s on a loaded 2-core machine) trains a
Llama from a save_pretrained directory on a token file: its first loss is transformers' own
loss of the saved model on the first batch, and <out>/hf loads with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
from test_hf import VOCAB, gpt2_config, llama_config, saved_model, tokenizer_files  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore")
    hf.logging.set_verbosity_error()


def test_model_flags_fill_the_config_from_config_json(tmp_path):
    directory = saved_model(tmp_path, llama_config(num_layers=4))
    config = train_cli.config_from_args(_parse(["--model", str(directory), "--seq-len", "16"]))
    assert config.model.path == str(directory)
    assert config.model.num_model_layers == 6  # prefix + 4 blocks + suffix
    assert not config.model.tied
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 .*has 1 key/value heads"):
        train_cli.config_from_args(_parse(["--model", str(directory), "--tensor-parallel", "2"]))
    with pytest.raises(ConfigError, match=r"model.seq_len=64 .*allows 32 positions"):
        train_cli.config_from_args(_parse(["--model", str(directory), "--seq-len", "64"]))
    with pytest.raises(ConfigError, match=r"data.path=.* is not allowed with the built-in GPT"):
        train_cli.config_from_args(_parse(["--data", str(directory / "config.json")]))
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(ConfigError, match=r"data.path='.*missing.bin' .*no such file"):
        train_cli.config_from_args(_parse(["--model", str(directory), "--data", missing]))


_DRIVER = """
import sys
from pipefold.cli.main import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def test_bad_models_are_refused_before_torch_is_imported(tmp_path):
    bad = []
    shards = saved_model(tmp_path, llama_config(num_layers=4), "sharded", max_shard_size="40KB")
    missing = sorted(shards.glob("model-*.safetensors"))[0]
    missing.unlink()
    bad.append(([str(shards)], rf"model.path: .*missing from .*{missing.name}"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    bad.append(([str(bert)], r"model_type='bert', a family pipefold does not support; supported: gpt2"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**gpt2_config().to_dict(), "vocab_size": 20}))
    tokenizer_files(small)
    bad.append(([str(small / "config.json")], r"tokenizer .* ids up to 59 .*vocab_size .* is 20"))
    bad.append(([str(tmp_path / "nowhere")], r"model.path='.*nowhere' does not exist"))
    for argv, pattern in bad:
        result = subprocess.run(
            [sys.executable, "-c", _DRIVER, "train", "--model", *argv, "--seq-len", "16",
             "--out", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert "torch imported: False" in result.stdout
        import re

        assert re.search(pattern, result.stderr), (pattern, result.stderr)


@pytest.mark.multiprocess
def test_train_a_llama_directory_on_two_ranks_and_save_it(tmp_path):
    import torch

    from pipefold.data import BatchSampler
    from pipefold.data.tokens import load_tokens
    from pipefold.hf.model import next_token_loss

    directory = saved_model(tmp_path, llama_config(num_layers=2))
    tokens = tmp_path / "tokens.bin"
    (np.arange(4000, dtype=np.uint16) * 7 % VOCAB).astype(np.uint16).tofile(tokens)
    out = tmp_path / "run"
    from pipefold.job.loop import run_local

    argv = ["--model", str(directory), "--data", str(tokens), "--steps", "20", "--ranks", "2",
            "--batch-size", "8", "--microbatches", "4", "--seq-len", "16", "--out", str(out),
            "--set", "sample_tokens=0"]
    config = train_cli.config_from_args(_parse(argv))
    result = run_local(config, show=False)
    assert result.ok, result.describe()
    summary = json.loads((out / "summary.json").read_text())
    # The first step's loss is transformers' loss of the saved model on the first batch.
    initial = hf.AutoModelForCausalLM.from_pretrained(directory)
    data = load_tokens(tokens, vocab_size=VOCAB)
    inputs, targets = BatchSampler(data.train, batch_size=8, seq_len=16, seed=0).next_batch()
    with torch.no_grad():
        expected = next_token_loss(initial(inputs).logits, targets).item()
    assert summary["losses"][0] == pytest.approx(expected, rel=1e-5)
    trained = hf.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert (out / "hf" / "tokenizer.json").is_file()
    assert len(list((out / "hf").glob("model-0000*-of-00002.safetensors"))) == 2
    before, after = initial.state_dict(), trained.state_dict()
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[name], after[name]) for name in before)  # trained
    # The saved model's loss on the held-out batches is the validation loss pipefold reported
    # after its last step (its pipelined evaluation of the same batches).
    from pipefold.job.report import validation_batches

    trained.eval()
    with torch.no_grad():
        batches = validation_batches(config, data.val)
        held_out = [next_token_loss(trained(x).logits, y).item() for x, y in batches]
    assert summary["evals"][-1]["step"] == 20
    assert sum(held_out) / len(held_out) == pytest.approx(summary["evals"][-1]["loss"], rel=1e-5)
