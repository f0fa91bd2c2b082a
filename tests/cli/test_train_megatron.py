"""`pipefold train --vocab-parallel` and `--recompute selective`: the flags reach the
configuration and the job's tensor-parallel plan, and what cannot run is refused before any
rank starts. (Exactness at pp2 x tp2: tests/runtime/test_vocab_parallel.py.)"""

import argparse

import pytest

from pipefold.cli import train as train_cli
from pipefold.errors import ConfigError
from pipefold.job.config import load_config


def _config(*words: str):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *words]))


def test_the_flags_reach_the_configuration_and_the_plan():
    from pipefold.job.setup import _tensor_parallel_plan
    from pipefold.model.zoo.gpt import DecoderBlock, LMHead, TokenEmbedding
    from pipefold.runtime.parallel.vocab_parallel import VocabParallel

    config = _config("--tensor-parallel", "2", "--vocab-parallel", "--recompute", "selective")
    assert config.schedule.vocab_parallel is True and config.recompute == "selective"
    assert config.to_dict()["schedule"]["vocab_parallel"] is True
    plan = _tensor_parallel_plan(config)
    assert callable(plan)
    for table in (TokenEmbedding(256, 8), LMHead(8, 256)):
        entries = plan(0, table)
        assert entries is not None and isinstance(entries[""], VocabParallel)
    assert set(plan(2, DecoderBlock(8, 2, 2)) or {}) == {"attn.head_qkv", "attn.proj", "fc", "fc_out"}
    assert _config("--tensor-parallel", "2").schedule.vocab_parallel is False


def test_the_byte_vocabulary_the_configuration_checks_is_the_corpus_one():
    from pipefold.data import VOCAB_SIZE
    from pipefold.job.sections import BYTE_VOCAB_SIZE

    assert BYTE_VOCAB_SIZE == VOCAB_SIZE


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"schedule.vocab_parallel": True},
         r"schedule.vocab_parallel=True is not allowed: .*schedule.tensor_parallel > 1"),
        # 3 tp ranks divide 6 heads but not the 256 byte values.
        ({"schedule.vocab_parallel": True, "schedule.tensor_parallel": 3, "model.num_heads": 6,
          "model.d_model": 48},
         r"model.vocab_size=256 is not allowed: .*pad the vocabulary to a multiple of 3 \(e.g. 258\)"),
        ({"recompute": "some"}, r'recompute=.some. is not allowed: use "none", "full", "selective"'),
    ],
)
def test_what_cannot_run_is_refused_before_any_rank_starts(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides=overrides)


def test_selective_recomputation_allows_the_blocks_residual_dropout():
    # The attention core draws no dropout mask, so recomputing it replays nothing random.
    assert load_config(overrides={"recompute": "selective", "model.dropout": 0.1}).recompute == "selective"
    with pytest.raises(ConfigError, match="dropout is not supported with recompute"):
        load_config(overrides={"recompute": "full", "model.dropout": 0.1})


def test_a_plan_choosing_selective_recomputation_names_it_in_its_train_command():
    from dataclasses import replace
    from types import SimpleNamespace

    from pipefold.cli.plan import train_command
    from pipefold.plan import PlanOptions, gpt_costs, plan

    costs = gpt_costs(num_layers=2, d_model=32, num_heads=2, seq_len=32, vocab_size=256)
    result = plan(costs, PlanOptions(num_ranks=2, global_batch=4, schedules=("1f1b",), order_search_s=0))
    args = SimpleNamespace(model=None, costs=None, vocab_size=256, save_schedule=None, megatron=False,
                           num_layers=2, d_model=32, num_heads=2, seq_len=32, precision=None)
    assert not result.choice.recompute  # no stage recomputed: selective can stand alone
    selective = replace(result.choice, recompute_attention=True)
    command = train_command(args, SimpleNamespace(choice=selective, global_batch=result.global_batch,
                                                  saves_searched_order=False))
    assert command is not None and command.endswith("--recompute selective")
    words = command.split()[1:]  # the command parses into a configuration that recomputes selectively
    assert _config(*words[1:]).recompute == "selective"
    # plan --megatron: train runs Megatron-LM's GPT (unfused attention, dropout 0.1).
    megatron = SimpleNamespace(**{**vars(args), "megatron": True})
    chosen = SimpleNamespace(choice=selective, global_batch=4, saves_searched_order=False)
    command = train_command(megatron, chosen)
    assert command is not None and command.endswith("--recompute selective --attention unfused --dropout 0.1")
    config = _config(*command.split()[2:])
    assert (config.model.attention, config.model.dropout, config.recompute) == ("unfused", 0.1, "selective")
    # Under tensor parallelism too: its seeded dropout draws the one-process masks there.
    split = SimpleNamespace(choice=replace(selective, num_tensor_parallel=2), global_batch=4,
                            saves_searched_order=False)
    command = train_command(megatron, split)
    assert command is not None and "--tensor-parallel 2" in command
    config = _config(*command.split()[2:])
    assert (config.schedule.tensor_parallel, config.schedule.vocab_parallel) == (2, True)
    assert (config.model.attention, config.model.dropout) == ("unfused", 0.1)
    # A tp that does not divide train's 256 byte values: no command train would refuse.
    uneven = SimpleNamespace(choice=replace(selective, num_tensor_parallel=3), global_batch=4,
                             saves_searched_order=False)
    assert train_command(megatron, uneven) is None
    assert train_command(args, uneven) is not None  # without --megatron the head is not split


def test_attention_unfused_reaches_the_configuration_and_the_model():
    from pipefold.job.sections import ATTENTION_CHOICES
    from pipefold.model.zoo.gpt import ATTENTION_CHOICES as MODEL_CHOICES

    assert ATTENTION_CHOICES == MODEL_CHOICES
    config = _config("--attention", "unfused", "--dropout", "0.1", "--recompute", "full")
    assert (config.model.attention, config.model.dropout, config.recompute) == ("unfused", 0.1, "full")
    assert config.to_dict()["model"]["attention"] == "unfused"
    assert _config().model.attention == "fused"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"model.attention": "flash"}, r'model.attention=.flash. is not allowed: use "fused" or "unfused"'),
        ({"model.attention": "unfused", "model.dropout": 1.0},
         r"model.dropout=1.0 is not allowed: use a probability in \[0, 1\)"),
        # The fused block's residual dropout draws from torch's generator: each tp rank its own.
        ({"model.dropout": 0.1, "schedule.tensor_parallel": 2},
         r"model.dropout=0.1 is not allowed: dropout is not supported with recompute or tensor_parallel > 1"),
        ({"model.dropout": 0.1, "recompute": "full"}, r'or model.attention = "unfused"'),
    ],
)
def test_bad_attention_and_dropout_are_refused_before_any_rank_starts(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides=overrides)


def test_seeded_dropout_is_taken_under_tensor_and_sequence_parallelism():
    from pipefold.job.setup import _tensor_parallel_plan
    from pipefold.model.zoo.gpt import DecoderBlock

    config = load_config(overrides={"model.attention": "unfused", "model.dropout": 0.1,
                                    "schedule.tensor_parallel": 2, "schedule.sequence_parallel": True})
    assert (config.schedule.tensor_parallel, config.model.dropout) == (2, 0.1)
    plan = _tensor_parallel_plan(config)
    assert callable(plan)
    block = DecoderBlock(8, 2, 2, 0.1, attention="unfused", layer=2)
    assert {"dropout", "mlp_dropout"} <= set(plan(2, block) or {})
