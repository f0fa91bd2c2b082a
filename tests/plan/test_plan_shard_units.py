"""The planner prices full sharding per unit, as the runtime runs it: a V schedule's tied first
and last stage (the GPT's embedding and head, both on rank 0) gather their union once, hold it
from that gather to the last free, and reduce-scatter once; the tied weight counts once."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
from pipefold.plan.degree import allgather_time
from pipefold.plan.estimate import gpt_costs
from pipefold.plan.evaluate import evaluate
from pipefold.plan.shard_search import NO_TIES, gathered_bytes, simulate_sharded, stage_ties
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule import Op, add_sharding, build, gathers_per_step, reductions_per_step
from pipefold.simulate import Link
from pipefold.simulate.memory import gathered_weight_bytes_peak

TIED, BLOCK, OTHER = 1000, 100, 10
"""Bytes of the tied table (embedding = head), of a block, of the other layers."""
LINK = Link(latency=0.0, bandwidth=1e6)


def costs_of(tied: bool = True) -> ModelCosts:
    def layer(parameter_bytes: int) -> LayerCost:
        return LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1, output_bytes=1,
                         parameter_bytes=parameter_bytes)

    layers = (layer(TIED), layer(OTHER), *[layer(BLOCK)] * 4, layer(OTHER), layer(TIED))
    return ModelCosts(layers=layers, tied_layers=((0, 7),) if tied else ())


# zb-v at pp=2: stages of 2 layers, rank 0 holds stage 0 (embedding, position) and stage 3 (norm, head).
BOUNDS = (0, 2, 4, 6, 8)


def test_the_gpt_estimates_know_their_tied_embedding_and_head():
    sizes = {"num_layers": 2, "d_model": 8, "num_heads": 2, "seq_len": 4}
    assert gpt_costs(**sizes).tied_layers == ((0, 5),)
    assert gpt_costs(**sizes, tie_embeddings=False).tied_layers == ()
    costs = gpt_costs(**sizes)
    assert ModelCosts.from_json(json.loads(json.dumps(costs.to_json()))).tied_layers == ((0, 5),)
    with pytest.raises(ConfigError, match="tied_layers"):
        replace(costs, tied_layers=((0, 9),))


def test_stage_ties_cut_the_tied_layers_at_the_partition():
    ties = stage_ties(costs_of(), BOUNDS)
    assert ties.stages == ((0, 3),)
    weight_bytes = (TIED + OTHER, 2 * BLOCK, 2 * BLOCK, OTHER + TIED)
    assert ties.bytes_of((0, 3), weight_bytes) == 2 * OTHER + TIED  # the table once
    assert ties.bytes_of((0,), weight_bytes) == TIED + OTHER
    assert ties.units((0, 1, 1, 0)) == ((0, 3), (1,), (2,))
    assert stage_ties(costs_of(tied=False), BOUNDS).stages == ()
    # One stage holding both: counted once there too.
    assert stage_ties(costs_of(), (0, 8)).bytes_of((0,), (2 * TIED + 2 * OTHER + 4 * BLOCK,)) == (
        TIED + 2 * OTHER + 4 * BLOCK)


@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v"])
@pytest.mark.parametrize(("free_between", "lookahead"), [(False, 0), (True, 0), (False, 1), (True, 2)])
def test_the_gathered_peak_is_the_units_union_held_once(name, free_between, lookahead):
    costs = costs_of()
    ties = stage_ties(costs, BOUNDS)
    model = stage_cost_model(costs, StageLayout(BOUNDS, 1), (), Link())
    untied = gathered_bytes(name, 2, 4, 2, model.weight_bytes, free_between, lookahead)
    tied = gathered_bytes(name, 2, 4, 2, model.weight_bytes, free_between, lookahead, ties)
    union = 2 * OTHER + TIED
    assert tied[0] == union  # rank 0's unit: both stages' weights, the table once, all step long
    assert untied[0] <= union + TIED and tied[1] == untied[1]
    # The simulator's walk of the same sharded schedule holds the union too: the table once (the
    # model's `tied_weights`), at both stages (as its per-stage bytes count it) without them.
    timeline = simulate_sharded(build(name, num_ranks=2, num_microbatches=4), model, costs, 2, LINK,
                                free_between, lookahead, ties)
    assert model.tied_weights == ties.groups
    assert gathered_weight_bytes_peak(timeline, model) == tied
    assert gathered_weight_bytes_peak(timeline, replace(model, tied_weights=()))[0] == union + TIED
    schedule = add_sharding(build(name, num_ranks=2, num_microbatches=4), free_between=free_between,
                            lookahead=lookahead, units=ties.units((0, 1, 1, 0)))
    assert gathers_per_step(schedule, ties.units((0, 1, 1, 0)))[0] == 1


@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v"])
def test_one_gather_and_one_reduce_scatter_of_the_union_priced(name):
    costs = costs_of()
    ties = stage_ties(costs, BOUNDS)
    model = stage_cost_model(costs, StageLayout(BOUNDS, 1), (), Link())
    schedule = build(name, num_ranks=2, num_microbatches=4)
    timeline = simulate_sharded(schedule, model, costs, 2, LINK, False, 0, ties)
    union_s = allgather_time(2 * OTHER + TIED, 2, LINK)
    reductions = [e.end - e.start for e in timeline.events[0] if e.action.op is Op.REDUCE_GRAD]
    assert sorted(reductions) == pytest.approx([0.0, union_s])
    # The first forward waits for one gather of the union.
    first = next(e for e in timeline.events[0] if e.action.op is Op.F)
    assert first.start == pytest.approx(union_s)
    # Without the ties the head's stage gathers and reduces the table again.
    apart = simulate_sharded(schedule, model, costs, 2, LINK, False, 0, NO_TIES)
    reduced = [e.end - e.start for e in apart.events[0] if e.action.op is Op.REDUCE_GRAD]
    assert sum(reduced) > sum(reductions)
    units = ties.units(schedule.placement)
    sharded = add_sharding(schedule, units=units)
    assert gathers_per_step(sharded, units) == reductions_per_step(sharded, units) == {0: 1, 1: 1, 2: 1}


def test_evaluate_holds_the_tied_weight_once_in_shards_gradients_and_optimizer():
    config = Config("zb-v", 2, 4, 1)
    tied = evaluate(costs_of(), config, num_ranks=2, bounds=BOUNDS, recompute=(), link=Link(),
                    num_data_parallel=2, shard="full", dp_link=LINK)
    untied = evaluate(costs_of(tied=False), config, num_ranks=2, bounds=BOUNDS, recompute=(), link=Link(),
                      num_data_parallel=2, shard="full", dp_link=LINK)
    unique = 2 * OTHER + TIED
    rank0 = tied.memory[0]
    assert rank0.weights == -(-unique // 2) + unique
    assert rank0.gradients == unique and rank0.optimizer == 2 * unique
    assert untied.memory[0].weights == -(-(unique + TIED) // 2) + unique + TIED
    assert tied.memory[1] == untied.memory[1]
    assert tied.step_time <= untied.step_time


def test_plan_prices_the_gpts_tied_unit():
    """`plan` with the GPT's costs: under zb-v full sharding rank 0 holds the tied table once in
    its gathered weights and in its shards, against the same GPT untied."""
    options = PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, order_search_s=0, schedules=("zb-v",),
                          microbatches=4, recompute="none", shard="full", dp_link=LINK)
    sizes = {"num_layers": 4, "d_model": 64, "num_heads": 4, "seq_len": 32}
    tied = plan(gpt_costs(**sizes), options).choice
    untied = plan(replace(gpt_costs(**sizes), tied_layers=()), options).choice
    assert tied.bounds == untied.bounds and tied.shard == "full"
    table = gpt_costs(**sizes).layers[0].parameter_bytes
    saved = untied.memory[0].weights - tied.memory[0].weights
    assert saved == table + (-(-(untied.memory[0].gradients) // 2) - (-(-(tied.memory[0].gradients) // 2)))
    assert untied.memory[0].gradients - tied.memory[0].gradients == table
    assert tied.memory[1] == untied.memory[1]


def test_the_cli_plans_a_v_schedule_fully_sharded(capsys):
    gpt = ["--model", "gpt", "--num-layers", "4", "--d-model", "64", "--num-heads", "4", "--seq-len", "32",
           "--ranks", "2", "--data-parallel", "2", "--batch-size", "8", "--order-search", "0", "--json",
           "--schedule", "zb-v", "--shard", "full"]
    assert main(["plan", *gpt]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert choice["shard"] == "full" and choice["schedule"] == "zb-v"
