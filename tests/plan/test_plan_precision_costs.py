"""Autocast's 16-bit weight copies priced as the runtime makes them (pipefold.plan.precision_costs):
once a step where the casts are held, at every forward under full sharding (one process, no torch)."""

from dataclasses import replace

import pytest

from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.evaluate import evaluate
from pipefold.plan.space import Config
from pipefold.simulate import Link

NUM_LAYERS, WEIGHT_BYTES = 4, 1000
CAST_S, CAST_BYTES = 1e-6, 0.5  # per parameter byte: a 16-bit copy of fp32 weights


def _costs(**fields):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=100, output_bytes=10,
                             parameter_bytes=WEIGHT_BYTES) for _ in range(NUM_LAYERS))
    return ModelCosts(layers=layers, **fields)


def _evaluate(costs, *, recompute=(), **options):
    return evaluate(costs, Config("1f1b", 1, 4, 1), 2, (0, 2, NUM_LAYERS), recompute, Link(), **options)


def test_held_casts_add_every_stages_casts_once_to_the_step():
    plain = _evaluate(_costs())
    casting = _evaluate(_costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES))
    # The fill passes every stage's first forward in turn: all the pipeline's weights, cast once.
    assert casting.step_time - plain.step_time == pytest.approx(CAST_S * NUM_LAYERS * WEIGHT_BYTES)
    assert [m.casts for m in casting.memory] == [CAST_BYTES * 2 * WEIGHT_BYTES] * 2  # held once a rank
    assert [m.activations for m in casting.memory] == [m.activations for m in plain.memory]


@pytest.mark.parametrize("recompute", [(), (0, 1)])
def test_full_sharding_casts_at_every_forward_and_each_micro_batch_keeps_its_copies(recompute):
    options = {"num_data_parallel": 2, "shard": "full", "price_exposure": False}
    plain = _evaluate(_costs(), recompute=recompute, **options)
    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    casting = _evaluate(costs, recompute=recompute, **options)
    stage_cast = CAST_S * 2 * WEIGHT_BYTES
    # 1f1b, 2 ranks, 4 micro-batches: the last rank's 4 F in a row on the critical path at least,
    # and more than held casts would cost (each stage once).
    assert casting.step_time - plain.step_time >= 4 * stage_cast * (1 - 1e-9)
    assert casting.step_time - plain.step_time > 2 * stage_cast
    assert all(m.casts == 0 for m in casting.memory)  # none held for the step
    copies = [c.activations - p.activations for c, p in zip(casting.memory, plain.memory, strict=True)]
    if recompute:
        assert copies == [0, 0]  # a checkpointed forward saves nothing; its rerun casts again
        # ... which B pays too: more than the forwards alone.
        assert casting.step_time - plain.step_time > 8 * stage_cast * (1 - 1e-9)
    else:
        # Rank 0 holds 2 micro-batches in flight at its peak (1f1b, 2 ranks), rank 1 one: their copies.
        assert copies == [2 * CAST_BYTES * 2 * WEIGHT_BYTES, CAST_BYTES * 2 * WEIGHT_BYTES]


def test_the_cast_price_survives_the_costs_file():
    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    again = ModelCosts.from_json(costs.to_json())
    assert again.cast_s_per_parameter_byte == CAST_S
    with pytest.raises(Exception, match="cast_s_per_parameter_byte"):
        replace(costs, cast_s_per_parameter_byte=-1.0)


@pytest.mark.parametrize("shard", ["replicate", "full"])
def test_the_search_prices_the_copies_as_evaluate_does(shard):
    from pipefold.plan import PlanOptions, plan

    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    options = PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, order_search_s=0, schedules=("1f1b",),
                          microbatches=4, recompute="none", shard=shard)
    choice = plan(costs, options).choice
    again = evaluate(costs, Config("1f1b", 1, 4, choice.microbatch_rows, shard=shard), 2, choice.bounds,
                     choice.recompute, Link(), num_data_parallel=2, shard=shard)
    # (The search's costs carry one replica's share of the optimizer state under full sharding.)
    assert ([(m.activations, m.casts) for m in choice.memory]
            == [(m.activations, m.casts) for m in again.memory])
    assert choice.step_time == pytest.approx(again.step_time)
    assert all((m.casts == 0) == (shard == "full") for m in choice.memory)


# Per layer: the first two layers' copies are 3x the last two's, for the same weight bytes; one
# ratio over the model would give both ranks the same copies (200 + 200 each).
LAYER_CASTS = (300, 300, 100, 100)


def _layered(**fields):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=100, output_bytes=10,
                             parameter_bytes=WEIGHT_BYTES, cast_bytes=casts) for casts in LAYER_CASTS)
    return ModelCosts(layers=layers,
                      cast_bytes_per_parameter_byte=sum(LAYER_CASTS) / (NUM_LAYERS * WEIGHT_BYTES), **fields)


def test_each_rank_holds_its_own_layers_copies_not_the_models_ratio():
    casting = _evaluate(_layered())
    assert [m.casts for m in casting.memory] == [600, 200]
    assert [m.total - m.casts for m in casting.memory] == [m.total for m in _evaluate(_costs()).memory]


def test_each_stages_cast_time_follows_its_copies():
    cast_s = CAST_S * NUM_LAYERS * WEIGHT_BYTES  # the model's casts in all
    options = {"num_data_parallel": 2, "shard": "full", "price_exposure": False}
    plain = _evaluate(_costs(), **options)
    casting = _evaluate(_layered(cast_s_per_parameter_byte=CAST_S), **options)
    from pipefold.plan.precision_costs import stage_cast_seconds
    from pipefold.plan.stages import StageLayout, stage_cost_model

    costs = _layered(cast_s_per_parameter_byte=CAST_S)
    model = stage_cost_model(costs, StageLayout((0, 2, NUM_LAYERS), 1), (), Link())
    assert model.cast_bytes == (600, 200)
    assert stage_cast_seconds(costs, model) == pytest.approx([0.75 * cast_s, 0.25 * cast_s])
    # Every forward casts: the copies in flight are each stage's own (2 micro-batches on rank 0, 1 on 1).
    copies = [c.activations - p.activations for c, p in zip(casting.memory, plain.memory, strict=True)]
    assert copies == [2 * 600, 200]
    held = _evaluate(_layered(cast_s_per_parameter_byte=CAST_S))
    assert held.step_time - _evaluate(_costs()).step_time == pytest.approx(cast_s)


def test_a_tensor_parallel_split_prices_a_shards_copies():
    from pipefold.plan.tensor import split_costs

    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=100, output_bytes=10,
                      parameter_bytes=1000, cast_bytes=400, tensor_parallel_share=1.0)
    split = split_costs(ModelCosts(layers=(layer,)), 4, Link())
    assert split.layers[0].cast_bytes == 100 and split.layers[0].parameter_bytes == 250


def test_per_layer_copies_survive_the_costs_file_and_the_search():
    from pipefold.plan import PlanOptions, plan

    costs = _layered(cast_s_per_parameter_byte=CAST_S)
    assert ModelCosts.from_json(costs.to_json()) == costs
    options = PlanOptions(num_ranks=2, order_search_s=0, schedules=("1f1b",), microbatches=4,
                          recompute="none", global_batch=4)
    choice = plan(costs, options).choice
    again = evaluate(costs, Config("1f1b", 1, 4, choice.microbatch_rows), 2, choice.bounds, choice.recompute,
                     Link())
    assert [m.casts for m in choice.memory] == [m.casts for m in again.memory]
    held = [sum(LAYER_CASTS[choice.bounds[s]:choice.bounds[s + 1]]) for s in range(2)]
    assert [m.casts for m in choice.memory] == held


def test_the_flop_estimate_times_the_casts_at_the_memory_bandwidth():
    from pipefold.errors import ConfigError
    from pipefold.plan import gpt_costs

    sizes = {"num_layers": 2, "d_model": 32, "num_heads": 2, "seq_len": 16, "vocab_size": 64}
    bandwidth = 1e10
    mixed = gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=4, memory_bandwidth=bandwidth)
    elements = 2 * (12 * 32 * 32 + 9 * 32) + 64 * 32  # the blocks' linears (weights, biases), the head
    # Each cast reads the fp32 weight (4 bytes) and writes its copy (2).
    assert mixed.cast_s_per_parameter_byte * mixed.parameter_bytes == pytest.approx(elements * 6 / bandwidth)
    plain = evaluate(gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=4),
                     Config("1f1b", 1, 4, 1), 2, (0, 3, 6), (), Link())
    timed = evaluate(mixed, Config("1f1b", 1, 4, 1), 2, (0, 3, 6), (), Link())
    assert timed.step_time - plain.step_time == pytest.approx(elements * 6 / bandwidth)
    assert gpt_costs(**sizes, memory_bandwidth=bandwidth).cast_s_per_parameter_byte == 0  # fp32: no casts
    with pytest.raises(ConfigError, match="memory_bandwidth = 0"):
        gpt_costs(**sizes, memory_bandwidth=0)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_the_hardware_estimate_prices_the_shards_copies_and_their_time(tensor_parallel):
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    hardware = load_hardware("a100-80gb")
    h, vocab, t = 64, 128, tensor_parallel
    estimate = GptEstimate(num_layers=2, d_model=h, num_heads=4, seq_len=32, vocab_size=vocab,
                           hardware=hardware, dtype="bf16", parameter_bytes=4)
    costs = estimate.at(1, t, Link(), False)
    # A block's tp rank casts its shard of the four linears' weights and split biases, the row-split
    # biases whole; the head (whole on each tp rank) its weight; nothing else.
    block = (12 * h * h + 7 * h) // t + 2 * h
    assert [layer.cast_bytes for layer in costs.layers] == [0, 0, 2 * block, 2 * block, 0, 2 * vocab * h]
    elements = 2 * block + vocab * h
    assert costs.cast_s_per_parameter_byte * costs.parameter_bytes == pytest.approx(
        elements * 6 / hardware.memory_bandwidth)
    bf16_weights = GptEstimate(num_layers=2, d_model=h, num_heads=4, seq_len=32, vocab_size=vocab,
                               hardware=hardware, dtype="bf16").at(1, t, Link(), False)
    assert not any(layer.cast_bytes for layer in bf16_weights.layers)
    assert bf16_weights.cast_s_per_parameter_byte == 0


def test_the_gpts_split_casts_each_shard_and_the_row_split_biases_whole():
    from pipefold.plan import gpt_costs
    from pipefold.plan.tensor import split_costs

    d = 32
    costs = gpt_costs(num_layers=2, d_model=d, num_heads=2, seq_len=16, vocab_size=64, bytes_per_value=2,
                      parameter_bytes_per_value=4)
    split = split_costs(costs, 2, Link())
    # As the job measures a tp rank's held copies (pipefold.runtime.held_copies): its shard of the
    # four linears' weights and the column-split biases, the projection's and fc_out's biases whole.
    assert split.layers[2].cast_bytes == ((12 * d * d + 7 * d) // 2 + 2 * d) * 2
    assert split.layers[-1].cast_bytes == costs.layers[-1].cast_bytes  # the head is not split


# A tied weight of 800 bytes (fp32) that layers 0 and 3 both cast: a 400-byte copy each counts,
# beside 100 bytes of their own; layers 1 and 2 cast 100 each.
TIED_CASTS = (500, 100, 100, 500)


def _tied(**fields):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=100, output_bytes=10,
                             parameter_bytes=WEIGHT_BYTES, cast_bytes=casts) for casts in TIED_CASTS)
    return ModelCosts(layers=layers, tied_layers=((0, 3),), tied_parameter_bytes=(800,),
                      cast_s_per_parameter_byte=CAST_S, **fields)


def _cast_s(copies, costs):
    return copies * costs.cast_s_per_cast_byte


def test_a_tied_weight_cast_by_two_layers_of_one_stage_is_one_copy():
    from pipefold.plan.stages import StageLayout, stage_cost_model

    costs = _tied()
    assert costs.tied_copies == (((0, 3), 400),)
    model = stage_cost_model(costs, StageLayout((0, NUM_LAYERS), 1), (), Link())
    assert model.cast_bytes == (sum(TIED_CASTS) - 400,)
    config, bounds = Config("1f1b", 1, 4, 1), (0, NUM_LAYERS)
    single = evaluate(costs, config, 1, bounds, (), Link())
    plain = evaluate(replace(costs, cast_s_per_parameter_byte=0.0), config, 1, bounds, (), Link())
    assert [m.casts for m in single.memory] == [sum(TIED_CASTS) - 400]
    assert single.step_time - plain.step_time == pytest.approx(_cast_s(sum(TIED_CASTS) - 400, costs))


def test_a_tied_weight_two_stages_of_one_rank_cast_is_held_once_and_cast_once():
    # zb-v on 2 ranks: rank 0 holds stages 0 and 3 (layers 0 and 3), rank 1 stages 1 and 2.
    costs = _tied()
    config = Config("zb-v", 2, 4, 1)
    timed = evaluate(costs, config, 2, (0, 1, 2, 3, 4), (), Link())
    plain = evaluate(replace(costs, cast_s_per_parameter_byte=0.0), config, 2, (0, 1, 2, 3, 4), (), Link())
    assert [m.casts for m in timed.memory] == [500 + 500 - 400, 200]
    assert timed.step_time - plain.step_time == pytest.approx(_cast_s(sum(TIED_CASTS) - 400, costs))


def test_a_tied_weight_on_two_ranks_is_a_copy_on_each():
    costs = _tied()
    timed = _evaluate(costs)  # 1f1b, layers 0-1 on rank 0, 2-3 on rank 1
    plain = _evaluate(replace(costs, cast_s_per_parameter_byte=0.0))
    assert [m.casts for m in timed.memory] == [600, 600]
    assert timed.step_time - plain.step_time == pytest.approx(_cast_s(sum(TIED_CASTS), costs))


def test_a_tied_weight_only_one_layer_casts_is_priced_as_before():
    # The built-in GPT's: the embedding casts nothing, the head its weight (and a smaller copy
    # than the tied weight's is not it).
    tied = _tied()
    for first in (0, 300):
        costs = replace(tied, layers=(replace(tied.layers[0], cast_bytes=first), *tied.layers[1:]))
        assert costs.tied_copies == ()
        held = _evaluate(costs)
        assert [m.casts for m in held.memory] == [first + 100, 600]


def test_tied_copies_survive_the_cost_model_file():
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import CostModel

    model = stage_cost_model(_tied(), StageLayout((0, 1, 2, 3, 4), 1), (), Link())
    assert model.tied_casts == ((((0, 1), (3, 1)), 400),)
    assert CostModel.from_json(model.to_json()) == model


def test_full_sharding_keeps_per_micro_batch_the_copies_a_forward_saves_not_the_biases():
    from pipefold.errors import ConfigError

    saved = (250, 250, 80, 80)  # each layer's weights' copies, of its 300 / 100 held with the biases'
    costs = _layered(cast_s_per_parameter_byte=CAST_S)
    costs = replace(costs, layers=tuple(replace(layer, saved_cast_bytes=kept)
                                        for layer, kept in zip(costs.layers, saved, strict=True)))
    assert ModelCosts.from_json(costs.to_json()) == costs
    options = {"num_data_parallel": 2, "shard": "full", "price_exposure": False}
    plain = _evaluate(_costs(), **options)
    casting = _evaluate(costs, **options)
    # 2 micro-batches in flight on rank 0 at its peak, 1 on rank 1 (1f1b, 2 ranks).
    copies = [c.activations - p.activations for c, p in zip(casting.memory, plain.memory, strict=True)]
    assert copies == [2 * 500, 160]
    # Held for the step (no full sharding), the cache's copies are the biases' too.
    assert [m.casts for m in _evaluate(costs).memory] == [600, 200]
    with pytest.raises(ConfigError, match="saved_cast_bytes = 400"):
        LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=0, output_bytes=0, cast_bytes=300,
                  saved_cast_bytes=400)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_the_estimates_save_the_weights_copies_of_a_tp_rank(tensor_parallel):
    from pipefold.plan import gpt_costs
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware
    from pipefold.plan.tensor import split_costs

    h, vocab, t = 64, 128, tensor_parallel
    estimate = GptEstimate(num_layers=2, d_model=h, num_heads=4, seq_len=32, vocab_size=vocab,
                           hardware=load_hardware("a100-80gb"), dtype="bf16", parameter_bytes=4)
    costs = estimate.at(1, t, Link(), False)
    assert [layer.saved_casts for layer in costs.layers] == [0, 0, 2 * 12 * h * h // t, 2 * 12 * h * h // t,
                                                             0, 2 * vocab * h]
    flop = split_costs(gpt_costs(num_layers=2, d_model=h, num_heads=4, seq_len=32, vocab_size=vocab,
                                 bytes_per_value=2, parameter_bytes_per_value=4), t, Link())
    # The FLOP estimate's split saves a block's weights' shards too, not a share of the row-split
    # biases kept whole (`LayerCost.tensor_parallel_saved_cast_share`).
    assert flop.layers[2].saved_casts == 2 * 12 * h * h // t
    assert flop.layers[-1].saved_casts == 2 * vocab * h


# (Full sharding steps a flush schedule.)
@pytest.mark.parametrize(("shard", "schedule"), [("replicate", "1f1b"), ("full", "1f1b"),
                                                 ("replicate", "pipedream-2bw")])
def test_a_recomputing_backward_holds_its_rerun_layers_copies_where_no_casts_are_held(shard, schedule):
    from pipefold.plan import PlanOptions, plan
    from pipefold.plan.precision_costs import rerun_copies

    saved = (250, 250, 80, 80)  # each layer's weights' copies, of its 300 / 100 held with the biases'
    costs = _layered(cast_s_per_parameter_byte=CAST_S)
    costs = replace(costs, layers=tuple(replace(layer, saved_cast_bytes=kept)
                                        for layer, kept in zip(costs.layers, saved, strict=True)))
    asynchronous = schedule != "1f1b"
    options = {"num_data_parallel": 2, "shard": shard, "price_exposure": False} if shard == "full" else {}
    config = Config(schedule, 1, 4, 1, shard=shard)
    recomputed = evaluate(costs, config, 2, (0, 2, NUM_LAYERS), (0, 1), Link(), **options)
    plain = evaluate(_costs(), config, 2, (0, 2, NUM_LAYERS), (0, 1), Link(), **options)
    # One layer reruns at a time and its copies die with it: each rank the largest of its layers'
    # (activations 100 a layer). Full sharding's gathered weights are leaves, so the rerun's cache
    # holds the biases' copies too; a weight stash's are not, so only the weights' copies live on.
    expected = {("replicate", False): [0, 0], ("full", False): [300, 100], ("replicate", True): [250, 80]}
    extra = [r.recompute - p.recompute for r, p in zip(recomputed.memory, plain.memory, strict=True)]
    assert extra == expected[shard, asynchronous]
    assert rerun_copies(costs, schedule, shard) == (() if extra == [0, 0] else
                                                   tuple(LAYER_CASTS) if shard == "full" else saved)
    if asynchronous:
        return
    # The search prices them as evaluate does (its own memory path: `known_memory`).
    search = PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, order_search_s=0,
                         schedules=(schedule,), microbatches=4, recompute="full", shard=shard)
    choice = plan(costs, search).choice
    again = evaluate(costs, Config(schedule, 1, 4, choice.microbatch_rows, shard=shard), 2, choice.bounds,
                     choice.recompute, Link(), num_data_parallel=2, shard=shard)
    assert [m.recompute for m in choice.memory] == [m.recompute for m in again.memory]


def test_costs_without_their_own_copies_rerun_each_layers_weights_at_the_ratio():
    from pipefold.plan.precision_costs import rerun_copies

    costs = _costs(cast_bytes_per_parameter_byte=CAST_BYTES)
    assert rerun_copies(costs, "1f1b", "full") == (round(CAST_BYTES * WEIGHT_BYTES),) * NUM_LAYERS
    assert rerun_copies(costs, "1f1b", "replicate") == ()
    assert rerun_copies(_costs(), "1f1b", "full") == ()  # fp32: nothing cast
