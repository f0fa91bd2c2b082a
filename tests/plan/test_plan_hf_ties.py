"""A Hugging Face model's tied head is priced as the built-in GPT's (one process, no ranks).

The estimate of a config.json names the layers that hold the tied table (`tied_layers`, the
prefix and the suffix) and the table's bytes (`tied_parameter_bytes`: GPT-2's suffix also holds
the final norm); these are the groups `pipefold.split` finds in the built model, the ones the
Pipeline ties. With them, full sharding on a V schedule gathers rank 0's first and last stage as
one unit and counts the table once in its shards, gradients and optimizer state, exactly as for the
built-in GPT; the simulator's gathered peak and the planner's walk agree on it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError, CostModelError
from pipefold.plan import ModelCosts, gpt_costs
from pipefold.plan.degree import allgather_time
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hf_estimate import hf_costs, hf_ties
from pipefold.plan.shard_search import gathered_bytes, simulate_sharded, stage_ties
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.plan.tensor import split_costs
from pipefold.schedule import Op, add_sharding, build, gathers_per_step, reductions_per_step
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.memory import gathered_weight_bytes_peak

V, D = 64, 16
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": D, "n_head": 2, "vocab_size": V, "n_positions": 32}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": D, "intermediate_size": 40,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V, "max_position_embeddings": 32,
}
CONFIGS = [GPT2, {**GPT2, "tie_word_embeddings": False}, LLAMA, {**LLAMA, "tie_word_embeddings": True}]
LINK = Link(latency=0.0, bandwidth=1e6)
TABLE = V * D * 4  # fp32 bytes of the tied table


def test_the_estimate_names_the_tied_head_and_its_bytes():
    costs = hf_costs(GPT2, seq_len=8)
    assert costs.tied_layers == ((0, 3),) and costs.tied_parameter_bytes == (TABLE,)
    assert costs.tied_bytes == (TABLE,)
    # The suffix holds the final norm beside the head, so the smallest layer is not the table.
    assert min(costs.layers[0].parameter_bytes, costs.layers[3].parameter_bytes) == TABLE + 2 * D * 4
    assert hf_costs(GPT2, seq_len=8, bytes_per_value=2).tied_parameter_bytes == (TABLE // 2,)
    assert hf_costs({**GPT2, "tie_word_embeddings": False}, seq_len=8).tied_layers == ()
    # Families whose config omits the flag take transformers' default: Llama's is untied.
    assert hf_costs(LLAMA, seq_len=8).tied_layers == ()
    assert "tied head" not in hf_costs(LLAMA, seq_len=8).source
    assert hf_costs({**LLAMA, "tie_word_embeddings": True}, seq_len=8).tied_parameter_bytes == (TABLE,)
    # Given by the caller (the split's finding), the estimate takes it as is.
    assert hf_costs(GPT2, seq_len=8, ties=[((0, 3), 10)]).tied_parameter_bytes == (40,)
    assert ModelCosts.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    with pytest.raises(ConfigError, match="tied_parameter_bytes"):
        replace(costs, tied_parameter_bytes=(TABLE, 1))
    with pytest.raises(ConfigError, match="tied_parameter_bytes"):
        replace(costs, tied_parameter_bytes=(costs.layers[3].parameter_bytes + 1,))
    assert hf_ties({**GPT2, "tie_word_embeddings": None}) == (((0, 3), V * D),)  # null: the default
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        hf_ties({**GPT2, "tie_word_embeddings": "yes"})


def test_a_tensor_parallel_split_scales_the_tied_bytes_with_its_layers():
    layer = gpt_costs(num_layers=2, d_model=8, num_heads=2, seq_len=4).layers[0]
    whole = ModelCosts(layers=(replace(layer, tensor_parallel_share=1.0),) * 2, tied_layers=((0, 1),),
                       tied_parameter_bytes=(layer.parameter_bytes // 2,))
    split = split_costs(whole, 2, LINK)
    assert split.tied_parameter_bytes == (round(layer.parameter_bytes / 4),)


def test_the_split_finds_the_ties_the_estimate_names():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pipefold.model import split
    from pipefold.model.ties import layer_ties
    from pipefold.model.zoo import gpt_layers

    for config in CONFIGS:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
        layers = split(model, example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
        assert layer_ties(layers) == hf_ties(config), config
    # The built-in GPT's TiedLayerSpec: the embedding and the head, the table once.
    assert layer_ties(gpt_layers(V, D, 2, 2, 8)) == (((0, 5), V * D),)
    assert layer_ties(gpt_layers(V, D, 2, 2, 8, tie_embeddings=False)) == ()


def _gpt_and_hf() -> list[tuple[str, ModelCosts, tuple[int, ...]]]:
    """Each model with bounds of 4 stages for zb-v at pp = 2: stage 0 the embeddings, stage 3 the
    final norm and head (rank 0 holds both)."""
    gpt = gpt_costs(num_layers=2, d_model=D, num_heads=2, seq_len=8, vocab_size=V)
    return [("gpt", gpt, (0, 2, 3, 4, 6)), ("hf", hf_costs(GPT2, seq_len=8), (0, 1, 2, 3, 4))]


@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v"])
def test_full_sharding_gathers_the_hf_tied_head_as_one_unit_like_the_gpt(name):
    for which, costs, bounds in _gpt_and_hf():
        ties = stage_ties(costs, bounds)
        assert ties.stages == ((0, 3),), which
        units = ties.units((0, 1, 1, 0))
        assert units == ((0, 3), (1,), (2,)), which
        sharded = add_sharding(build(name, num_ranks=2, num_microbatches=4), units=units)
        assert gathers_per_step(sharded, units)[0] == reductions_per_step(sharded, units)[0] == 1, which


@pytest.mark.parametrize(("free_between", "lookahead"), [(False, 0), (True, 0), (False, 1), (True, 2)])
def test_the_simulated_gathered_peak_counts_the_tied_table_once(free_between, lookahead):
    for which, costs, bounds in _gpt_and_hf():
        ties = stage_ties(costs, bounds)
        model = stage_cost_model(costs, StageLayout(bounds, 1), (), Link())
        timeline = simulate_sharded(build("zb-v", num_ranks=2, num_microbatches=4), model, costs, 2, LINK,
                                    free_between, lookahead, ties)
        walked = gathered_bytes("zb-v", 2, 4, 2, model.weight_bytes, free_between, lookahead, ties)
        assert gathered_weight_bytes_peak(timeline, model) == walked, which
        union = model.weight_bytes[0] + model.weight_bytes[3] - TABLE
        assert walked[0] == union, which  # rank 0's unit: both stages, the table once, all step long
        # Without the ties the simulator counts the table at both stages.
        apart = replace(model, tied_weights=())
        assert gathered_weight_bytes_peak(timeline, apart)[0] == union + TABLE, which
        assert CostModel.from_json(json.loads(json.dumps(model.to_json()))) == model, which
    with pytest.raises(CostModelError, match="tied_weights"):
        replace(model, tied_weights=((((0, 1), (9, 1)), TABLE),))
        # One reduce-scatter of the union on rank 0 (the tied gradient summed before it).
        reduced = [e.end - e.start for e in timeline.events[0] if e.action.op is Op.REDUCE_GRAD]
        assert sum(reduced) == pytest.approx(allgather_time(union, 2, LINK)), which


def test_evaluate_counts_the_hf_tied_table_once_as_for_the_gpt():
    config = Config("zb-v", 2, 4, 1)
    for which, costs, bounds in _gpt_and_hf():
        sharded = evaluate(costs, config, num_ranks=2, bounds=bounds, recompute=(), link=Link(),
                           num_data_parallel=2, shard="full", dp_link=LINK)
        untied = evaluate(replace(costs, tied_layers=(), tied_parameter_bytes=()), config, num_ranks=2,
                          bounds=bounds, recompute=(), link=Link(), num_data_parallel=2, shard="full",
                          dp_link=LINK)
        held = sum(costs.layers[i].parameter_bytes for i in (*range(bounds[1]), *range(bounds[3], bounds[4])))
        unique = held - TABLE
        rank0 = sharded.memory[0]
        assert rank0.weights == -(-unique // 2) + unique, which  # its shards and the gathered unit
        assert rank0.gradients == unique and rank0.optimizer == 2 * unique, which
        assert untied.memory[0].gradients == held, which
        assert sharded.memory[1] == untied.memory[1], which


def test_plan_of_a_config_json_prices_the_tied_head_once(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2))
    assert main(["plan", "--model", str(path), "--seq-len", "8", "--ranks", "2", "--data-parallel", "2",
                 "--schedule", "zb-v", "--virtual", "2", "--microbatches", "4", "--batch-size", "8",
                 "--shard", "full", "--order-search", "0", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    costs = hf_costs(GPT2, seq_len=8)
    unique = costs.layers[0].parameter_bytes + costs.layers[3].parameter_bytes - TABLE
    assert choice["bounds"] == [0, 1, 2, 3, 4] and choice["memory"][0]["gradients"] == unique


def test_the_runtime_groups_and_holds_what_the_planner_prices():
    """The runtime's own grouping of a tiny GPT-2's split pieces (FSDP units by parameter identity,
    and the stages it ties across ranks) is the planner's, and rank 0's unit holds the bytes the
    planner counts for it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from pipefold.balance import Partition
    from pipefold.model import split
    from pipefold.model.build import meta_layers, shared_parameter_uses
    from pipefold.runtime.parallel.full_shard import _joined, tied_stages

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**GPT2))
    layers = split(model, example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
    costs = hf_costs(GPT2, seq_len=8)
    bounds = (0, 1, 2, 3, 4)
    ties = stage_ties(costs, bounds)
    placement = build("zb-v", num_ranks=2, num_microbatches=4).placement
    stages = [SimpleNamespace(index=stage, parameters=tuple(layers[stage].parameters()))
              for stage, rank in enumerate(placement) if rank == 0]
    joined = [tuple(stage.index for stage in unit) for unit in _joined(stages)]
    planned = tuple(unit for unit in ties.units(placement) if placement[unit[0]] == 0)
    assert tuple(joined) == planned == ((0, 3),)
    unit_bytes = 4 * sum(p.numel() for p in {id(p): p for s in stages for p in s.parameters}.values())
    model_costs = stage_cost_model(costs, StageLayout(bounds, 1), (), Link())
    assert ties.bytes_of((0, 3), model_costs.weight_bytes) == unit_bytes
    # Under 1f1b (pp = 2, no V) the runtime ties the first and the last stage across ranks.
    meta = meta_layers(layers)
    shared = shared_parameter_uses(layers, meta)
    across = tied_stages(layers, Partition((0, 2, 4)), shared, meta)
    assert across == stage_ties(costs, (0, 2, 4)).stages == ((0, 1),)


def test_measured_costs_carry_the_ties_the_split_finds(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    transformers.AutoConfig.for_model(**GPT2).to_json_file(path, use_diff=False)
    out = tmp_path / "costs.json"
    assert main(["profile", "--model", str(path), "--seq-len", "8", "--batch-size", "2",
                 "--microbatches", "1", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    measured = ModelCosts.from_json(out)
    estimated = hf_costs(GPT2, seq_len=8)
    assert (measured.tied_layers, measured.tied_parameter_bytes) == ((((0, 3),)), (TABLE,))
    assert (measured.tied_layers, measured.tied_parameter_bytes) == (
        estimated.tied_layers, estimated.tied_parameter_bytes)


@pytest.mark.parametrize("shard", ["replicate", "zero1"])
def test_a_rank_holding_both_ends_holds_the_table_once_without_full_sharding(shard):
    """As the runtime builds it: one tensor, one gradient, one optimizer state (and one all-reduce
    of it), whether its rank holds the two ends in two stages (zb-v's rank 0) or in one (pp = 1)."""
    for which, costs, bounds in _gpt_and_hf():
        untied = replace(costs, tied_layers=(), tied_parameter_bytes=())
        for name, num_ranks, cut in (("zb-v", 2, bounds), ("gpipe", 1, (0, bounds[-1]))):
            config = Config(name, 2 if name == "zb-v" else 1, 4, 1, shard=shard)
            kwargs = {"num_ranks": num_ranks, "bounds": cut, "recompute": (), "link": Link(),
                      "num_data_parallel": 2, "dp_link": LINK, "sharded_optimizer": shard == "zero1"}
            priced, apart = evaluate(costs, config, **kwargs), evaluate(untied, config, **kwargs)
            stages = (0, 3) if num_ranks == 2 else (0,)
            twice = sum(costs.layers[i].parameter_bytes for s in stages for i in range(cut[s], cut[s + 1]))
            once = twice - TABLE
            rank0 = priced.memory[0]
            assert (rank0.weights, rank0.gradients) == (once, once), (which, name)
            assert rank0.optimizer == round(once * costs.optimizer_bytes_per_parameter_byte), (which, name)
            assert apart.memory[0].weights == apart.memory[0].gradients == twice, (which, name)
            if num_ranks == 1:  # its only rank: the all-reduce moves the tied gradient once
                assert priced.allreduce_s < apart.allreduce_s, (which, name)
            # The simulator's own weight peak agrees (the non-compiled path).
            model = stage_cost_model(costs, StageLayout(cut, 1), (), Link())
            timeline = simulate(build(name, num_ranks=num_ranks, num_microbatches=4), model)
            assert timeline.weight_bytes_peak[0] == once, (which, name)
