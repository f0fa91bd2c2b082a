"""`pipefold train`'s default partition ("flops"): stages of even estimated cost, in one process.

The uniform default left rank 0 with only the embeddings and the last rank with only the norm and
head at 4 ranks; the estimate-balanced default gives each rank a block's worth of work.
"""

from __future__ import annotations

import argparse
import json

import pytest

from pipefold.cli import train as train_cli
from pipefold.job.config import TrainConfig, load_config
from pipefold.job.partition_costs import estimated_layer_costs, flops_counts, job_bounds
from pipefold.job.sections import ModelConfig


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def _stage_costs(config: TrainConfig) -> list[float]:
    costs = estimated_layer_costs(config.model)
    bounds = job_bounds(config.partition, config.schedule.built.num_stages, config.model)
    assert bounds is not None
    return [sum(costs[start:end]) for start, end in zip(bounds, bounds[1:], strict=False)]


def _within(stage_costs: list[float], tolerance: float) -> bool:
    mean = sum(stage_costs) / len(stage_costs)
    return all(abs(cost - mean) <= tolerance * mean for cost in stage_costs)


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_default_partition_balances_the_default_model(ranks):
    config = load_config(overrides={"schedule.ranks": ranks})
    assert config.partition == "flops"
    stage_costs = _stage_costs(config)
    assert len(stage_costs) == ranks
    # The last stage holds a block, the norm and the head (the head is 14% of a block): 15%.
    assert _within(stage_costs, 0.15), stage_costs


def test_uniform_stays_available_and_is_what_the_default_replaces():
    config = train_cli.config_from_args(_parse(["--ranks", "4", "--partition", "uniform"]))
    assert config.partition == "uniform"
    assert job_bounds("uniform", 4, config.model) == (0, 2, 4, 6, 8)
    stage_costs = _stage_costs(config)
    # Rank 0 holds only the embeddings: far below the mean (the check above fails on it).
    assert not _within(stage_costs, 0.15) and stage_costs[0] < 0.01 * max(stage_costs)
    assert flops_counts(4, config.model) == [3, 1, 1, 3]


def test_virtual_stages_and_deeper_models_are_balanced_too():
    config = load_config(overrides={"schedule.name": "interleaved-1f1b", "schedule.virtual": 2,
                                    "model.num_layers": 12})
    stage_costs = _stage_costs(config)
    assert len(stage_costs) == 4 and _within(stage_costs, 0.15), stage_costs


def test_named_methods_that_need_the_layers_are_left_to_set_up():
    model = TrainConfig().model
    assert job_bounds("parameters", 2, model) is None and job_bounds("profile", 2, model) is None
    assert job_bounds((3, 5), 2, model) == (0, 3, 8)


def test_a_hugging_face_config_is_priced_by_its_estimate(tmp_path):
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }))
    # The model alone (a bare config.json has no tokenizer for the job's text; the cut needs none).
    model = ModelConfig(path=str(config_json), seq_len=32)
    costs = estimated_layer_costs(model)
    assert len(costs) == model.num_model_layers == 6
    # One block per rank, the embedding with the first, the norm and head with the last (uniform
    # counts would leave the head alone on the last rank).
    assert flops_counts(4, model) == [2, 1, 1, 2]
    assert job_bounds("uniform", 4, model) == (0, 2, 4, 5, 6)
    bounds = job_bounds("flops", 4, model)
    assert bounds is not None
    stage_costs = [sum(costs[start:end]) for start, end in zip(bounds, bounds[1:], strict=False)]
    # The untied 256-word head is as costly as 0.3 of a block: the best cut is within 35%.
    assert _within(stage_costs, 0.35), stage_costs
