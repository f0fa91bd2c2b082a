"""`pipefold train --adaptive`: each batch's micro-batches, family and recomputation chosen per
length bucket; the run trains exactly as one process does, and bad settings are refused."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.errors import ConfigError


def _config(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *argv]))


def test_the_flags_reach_the_config():
    config = _config(["--adaptive", "--memory-limit", "2GiB"])
    assert config.schedule.adaptive and config.schedule.memory_limit_bytes == 2 * 2**30
    assert not _config([]).schedule.adaptive


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adaptive", "--data-parallel", "2", "--zero"], r"optimizer.zero=True .*whole, not sharded"),
        (["--adaptive", "--data-parallel", "2", "--shard", "full"], r"schedule.shard='full' .*not sharded"),
        (["--adaptive", "--tensor-parallel", "2", "--vocab-parallel"], r"schedule.vocab_parallel=True"),
        (["--adaptive", "--recompute", "full"], r"chooses the recomputation per batch"),
        (["--adaptive", "--schedule", "pipedream", "--set", "model.tie_embeddings=false"], "weights inside"),
        (["--adaptive", "--schedule", "auto"], r"schedule.name='auto'"),
        (["--adaptive", "--set", "schedule.retune_every=5"], r"schedule.retune_every=5"),
        (["--adaptive", "--dropout", "0.1"], r"model.dropout=0.1"),
        (["--memory-limit", "1GiB"], r"schedule.memory_limit='1GiB' .*add --adaptive"),
        (["--adaptive", "--memory-limit", "lots"], r"schedule.memory_limit='lots'"),
    ],
)
def test_refusals(argv, message):
    with pytest.raises(ConfigError, match=message):
        _config(argv)


_TINY = [
    "train", "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--seq-len", "64",
    "--batch-size", "8", "--microbatches", "4", "--set", "data.max_bytes=100000", "--set", "sample_tokens=0",
    "--device", "cpu", "--bucket-by-length", "--adaptive", "--seed", "3", "--warmup-steps", "2",
]


_LONG_FIRST = ["--partition", "4,2"]
"""Both blocks on rank 0: its peak, which grows with the bucket length (the position table's
weights, gradients and AdamW state), is the job's, not rank 1's loss and head (the tokens' alone)."""


def test_a_batch_no_choice_fits_is_refused_before_any_process_starts():
    """The longest batch (8 rows x 64) needs more than 100 kB per rank under every choice."""
    with pytest.raises(ConfigError, match=r"8 rows x seq_len=64 \(bucket 64\)") as error:
        _config([*_TINY[1:], "--memory-limit", "100000"])
    text = str(error.value)
    assert "schedule.memory_limit=97.7 KiB (100000 bytes)" in text and "under any choice" in text, text
    assert "raise schedule.memory_limit to at least" in text
    # A partition the configuration cannot tell without the layers: refused at set-up instead.
    _config([*_TINY[1:], "--memory-limit", "100000", "--set", "partition=parameters"])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_adaptive_training_equals_one_process_batch_by_batch(tmp_path, capfd):
    """8 steps of a tiny GPT on 2 ranks, bucket lengths 8..64, under a memory limit that the long
    buckets meet only by recomputing: every step's loss equals one process training the same
    model on the same batches (AdamW, clipping and lr schedule as the job's)."""
    from pipefold.data import VOCAB_SIZE, LengthBuckets, load_corpus
    from pipefold.job.optim import lr_scheduler, parameter_groups
    from pipefold.model import build_reference
    from pipefold.model.zoo import gpt_layers, gpt_loss

    out = tmp_path / "run"
    num_steps = 8
    code = main([*_TINY, *_LONG_FIRST, "--steps", str(num_steps), "--memory-limit", "1710000",
                 "--out", str(out)])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    adaptive = summary["adaptive"]
    assert {row["recompute"] for row in adaptive} == {"none", "full"}, adaptive
    assert all(row["peak_memory"] <= 1710000 for row in adaptive)
    assert sum(row["steps"] for row in adaptive) == num_steps
    assert "adaptive: length <=" in capfd.readouterr().out

    # One process: the same weights, batches, optimizer, clipping and lr schedule.
    config = _config([*_TINY[1:], "--steps", str(num_steps)])
    corpus = load_corpus(config.data.max_bytes, config.data.val_fraction)
    sampler = LengthBuckets(
        corpus.train, separator=ord("\n"), token_budget=8 * 64, max_len=64,
        min_len=config.data.bucket_min_len, row_multiple=4, seed=3,
    )
    model = build_reference(gpt_layers(VOCAB_SIZE, 32, 2, 2, 64), seed=3)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        parameter_groups([model], list(model.parameters()), weight_decay=opt.weight_decay),
        lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay,
    )
    scheduler = lr_scheduler(
        optimizer, schedule=opt.lr_schedule, warmup_steps=opt.warmup_steps, total_steps=num_steps, lr=opt.lr,
        min_lr=opt.min_lr,
    )
    expected, lengths = [], []
    for _ in range(num_steps):
        inputs, targets = sampler.next_batch()
        lengths.append(inputs.shape[1])
        loss = gpt_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        expected.append(loss.item())
    assert summary["seq_len_steps"] == lengths and len(set(lengths)) > 1
    # float32 summation orders differ (micro-batches, stages), and AdamW carries them along.
    assert summary["losses"] == pytest.approx(expected, rel=1e-4)


def test_replicas_and_tp_peers_are_priced_per_pipeline():
    """One replica's rows (8 global rows over 2 replicas: 4) and one tp rank's share of the layers."""
    from pipefold.job.adaptive_choice import gpt_chooser
    from pipefold.job.partition_costs import job_bounds

    with pytest.raises(ConfigError, match=r"a batch of 4 rows x seq_len=64 \(bucket 64\)"):
        _config([*_TINY[1:], "--data-parallel", "2", "--memory-limit", "100000"])

    def leanest(argv):
        config = _config([*_TINY[1:], *argv])
        built = config.schedule.built
        bounds = job_bounds(config.partition, built.num_stages, config.model)
        chooser = gpt_chooser(
            config.model, config.schedule, config.compute_precision, bounds=bounds, placement=built.placement,
            device_type="cpu",
        )
        return min(choice.peak_memory for choice in chooser.ranked(8, 64))

    assert leanest(["--tensor-parallel", "2"]) < leanest([])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_adaptive_with_replicas_and_accumulation_equals_one_process(tmp_path, capfd):
    """dp=2 x pp=2 (4 processes), 2 accumulated batches per optimizer step, 4 steps: each pipeline
    call chooses for its own batch, the replicas agree on every measured step, and every step's
    loss equals one process on the whole batches; the longest bucket fits the limit only by
    recomputing."""
    from pipefold.data import VOCAB_SIZE, LengthBuckets, load_corpus
    from pipefold.job.optim import lr_scheduler, parameter_groups
    from pipefold.model import build_reference
    from pipefold.model.zoo import gpt_layers, gpt_loss

    out = tmp_path / "run"
    num_steps, num_accumulated = 4, 2
    argv = [*_TINY, "--data-parallel", "2", "--grad-accumulation", str(num_accumulated)]
    code = main([*argv, *_LONG_FIRST, "--steps", str(num_steps), "--memory-limit", "1140000",
                 "--out", str(out)])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    adaptive = summary["adaptive"]
    assert {row["recompute"] for row in adaptive} == {"none", "full"}, adaptive
    assert all(row["peak_memory"] <= 1140000 for row in adaptive)
    assert sum(row["steps"] for row in adaptive) == num_steps * num_accumulated  # pipeline calls
    assert {row["rows"] for row in adaptive} <= {4, 8, 16, 32}  # one replica's rows

    config = _config([*argv[1:], "--steps", str(num_steps)])
    corpus = load_corpus(config.data.max_bytes, config.data.val_fraction)
    sampler = LengthBuckets(
        corpus.train, separator=ord("\n"), token_budget=8 * 64, max_len=64,
        min_len=config.data.bucket_min_len, row_multiple=4 * 2, seed=3,
    )
    model = build_reference(gpt_layers(VOCAB_SIZE, 32, 2, 2, 64), seed=3)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        parameter_groups([model], list(model.parameters()), weight_decay=opt.weight_decay),
        lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay,
    )
    scheduler = lr_scheduler(
        optimizer, schedule=opt.lr_schedule, warmup_steps=opt.warmup_steps, total_steps=num_steps, lr=opt.lr,
        min_lr=opt.min_lr,
    )
    expected, lengths = [], []
    for _ in range(num_steps):
        losses, longest = [], 0
        for _ in range(num_accumulated):
            inputs, targets = sampler.next_batch()
            longest = max(longest, inputs.shape[1])
            loss = gpt_loss(model(inputs), targets)
            (loss / num_accumulated).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        expected.append(sum(losses) / len(losses))
        lengths.append(longest)
    assert summary["seq_len_steps"] == lengths
    assert summary["losses"] == pytest.approx(expected, rel=1e-4)
