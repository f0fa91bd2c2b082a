"""The planner's data-parallel layout: replicate, ZeRO-1 or full sharding, chosen per configuration."""

import argparse
import json
import shlex
from dataclasses import replace

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, PlanOptions, plan
from pipefold.plan.degree import allgather_time
from pipefold.plan.shard_layout import layout_bytes
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule import add_sharding, build
from pipefold.simulate import Link, simulate

P = 10_000
"""Parameter bytes per layer: large beside the activations, so the layout decides what fits."""


def costs_of(num_layers=8):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=10, output_bytes=10, parameter_bytes=P)
    return ModelCosts(layers=(layer,) * num_layers, reference_rows=1, overhead_s=0.1)


# dp=4 x pp=2, interleaved at v=2: each rank owns 4 layers (W = 4P) in 2 stages of 2P. At a step's
# peak, with AdamW state of 2 W: replicate 4 W, ZeRO-1 W + W + W/2 = 2.5 W, full W/4 + W + W + W/2
# = 2.75 W, full freed between micro-batches W/4 + W/2 + W + W/2 = 2.25 W (+ activations).
BASE = {"num_ranks": 2, "data_parallel": 4, "global_batch": 8, "order_search_s": 0,
        "schedules": ("interleaved-1f1b",), "virtual": 2, "microbatches": 2, "recompute": "none",
        "dp_link": Link(latency=0.0, bandwidth=1e6)}
W = 4 * P


def test_a_limit_only_full_sharding_meets_picks_it_with_its_bytes():
    limit = 2.4 * W
    for shard in ("replicate", "zero1"):
        with pytest.raises(NoFeasiblePlan):
            plan(costs_of(), PlanOptions(**BASE, memory_limit=limit, shard=shard))
    found = plan(costs_of(), PlanOptions(**BASE, memory_limit=limit, shard="auto"))
    choice = found.choice
    assert (choice.shard, choice.free_between_microbatches) == ("full", True)
    assert not choice.sharded_optimizer and choice.peak_memory <= limit
    # Each rank's weights, gradients and optimizer state are plan.shard_layout's figures.
    expected = layout_bytes(W, num_data_parallel=4, layout="full", gathered=2 * P)
    for held in choice.memory:
        assert held.weights == expected.weights + expected.gathered
        assert (held.gradients, held.optimizer) == (W, expected.optimizer)
        # (The gradients beside the activations held from the rank's first backward on.)
        assert held.total - held.held_activations + held.gradients - held.recompute == expected.step_peak
    verdicts = {v.subject: v.status for v in found.settings}
    assert verdicts["shard=full+free-between"] == "chosen"
    assert {verdicts[s] for s in ("shard=replicate", "shard=zero1", "shard=full")} == {"over-memory"}
    text = found.explain()
    assert "full sharding" in text and "shard=zero1" in text


def test_the_full_step_is_the_sharded_schedule_simulated_with_its_gathers():
    found = plan(costs_of(), PlanOptions(**BASE, shard="full"))
    choice = found.choice
    assert choice.shard == "full" and choice.allreduce_s == 0.0
    # Independently: the schedule with its sharding actions, each gather and reduce-scatter a ring
    # moving 3/4 of the stage's bytes at 1e6 B/s.
    schedule = add_sharding(build("interleaved-1f1b", num_ranks=2, num_microbatches=2, num_virtual=2),
                            free_between=choice.free_between_microbatches)
    model = stage_cost_model(costs_of(), StageLayout(choice.bounds, choice.microbatch_rows), choice.recompute,
                             Link())
    seconds = tuple(0.75 * w / 1e6 for w in model.weight_bytes)
    assert seconds[0] == pytest.approx(allgather_time(2 * P, 4, BASE["dp_link"]))
    timeline = simulate(schedule, replace(model, gather=seconds, reduce_scatter=seconds))
    assert choice.step_time == pytest.approx(timeline.makespan)
    # (With 2 micro-batches each stage's actions run back to back, so freeing between them adds no
    # gather and, as lean, wins the tie.) Gathering costs time over the unsharded pipeline:
    assert choice.free_between_microbatches
    assert choice.step_time > plan(costs_of(), PlanOptions(**BASE)).choice.pipeline_s


def test_a_generous_limit_keeps_the_fastest_layout():
    # On a slow link full sharding's reduce-scatters partly hide in the drain (the planner puts
    # the replicas' all-reduce after the schedule): it is the fastest there.
    assert plan(costs_of(), PlanOptions(**BASE, shard="auto")).choice.shard == "full"
    # Where latency dominates, the one all-reduce beats a gather and a reduce-scatter per stage.
    latency_bound = {**BASE, "dp_link": Link(latency=0.1, bandwidth=1e12)}
    found = plan(costs_of(), PlanOptions(**latency_bound, shard="auto"))
    assert found.choice.shard == "replicate"
    verdicts = {v.subject: v.status for v in found.settings}
    assert verdicts["shard=replicate"] == "chosen"
    others = ("shard=zero1", "shard=full", "shard=full+free-between")
    assert {verdicts[s] for s in others} <= {"slower", "pruned"}
    # One replica: nothing to shard, whatever is asked.
    alone = plan(costs_of(), PlanOptions(**{**BASE, "data_parallel": 1, "global_batch": 2}, shard="auto"))
    assert alone.choice.shard == "replicate"
    assert not any(v.subject.startswith("shard=") for v in alone.settings)


def test_bad_shard_options_are_refused():
    with pytest.raises(ConfigError, match="shard = 'fsdp'"):
        PlanOptions(**BASE, shard="fsdp")
    with pytest.raises(ConfigError, match="zero = True with shard = 'full'"):
        PlanOptions(**BASE, shard="full", zero=True)


def _train_config(command):
    words = shlex.split(command)
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(words[1:]))


def test_the_cli_reports_the_layout_and_the_train_command_carries_it(capsys):
    gpt = ["--model", "gpt", "--num-layers", "4", "--d-model", "64", "--num-heads", "4", "--seq-len", "32",
           "--ranks", "2", "--data-parallel", "2", "--batch-size", "8", "--order-search", "0", "--json"]
    assert main(["plan", *gpt, "--shard", "full"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["choice"]["shard"] == "full"
    config = _train_config(result["train_command"])
    assert config.schedule.shard == "full" and config.schedule.data_parallel == 2
    assert config.model.tie_embeddings  # full sharding keeps the GPT's tied head, as planned
    assert main(["plan", *gpt, "--shard", "auto"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["choice"]["shard"] in ("replicate", "zero1", "full")
