"""The tensor-parallel degree in the planner: one tp rank's costs, dp x pp x tp splits, verdicts, CLI."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, Plan, PlanOptions, gpt_costs, plan
from pipefold.plan.search import evaluate
from pipefold.plan.space import Config
from pipefold.plan.tensor import split_costs, with_gpt_tensor_parallel
from pipefold.simulate import Link

SPLIT = LayerCost(
    forward_s=1.0, backward_s=3.0, weight_grad_s=1.0, activation_bytes=1000, output_bytes=400,
    parameter_bytes=800, tensor_parallel_share=0.75, tensor_parallel_activation_share=0.5,
    num_tensor_parallel_allreduces=2,
)
WHOLE = LayerCost(forward_s=0.5, backward_s=1.0, activation_bytes=100, output_bytes=400, parameter_bytes=40)


def test_one_tp_rank_of_a_layer_by_the_written_out_formula():
    link = Link(latency=0.01, bandwidth=100.0)
    (split, whole) = split_costs(ModelCosts(layers=(SPLIT, WHOLE)), 4, link).layers
    keep = 1 - 0.75 + 0.75 / 4
    # Two ring all-reduces of the 400-byte output over 4 ranks: 2 x 3/4 x 400 B / 100 B/s each,
    # plus 2 x 3 steps x 10 ms of latency each, fixed.
    moving = 2 * (2 * 3 / 4 * 400 / 100)
    assert split.forward_s == pytest.approx(1.0 * keep + moving)
    assert split.backward_s == pytest.approx(3.0 * keep + moving)
    assert split.weight_s == pytest.approx(1.0 * keep)  # W communicates nothing
    assert split.input_s == pytest.approx(2.0 * keep + moving)
    assert split.fixed_s == pytest.approx(2 * 2 * 3 * 0.01)
    assert split.parameter_bytes == round(800 * keep)
    assert split.activation_bytes == round(1000 * (1 - 0.5 + 0.5 / 4))
    assert split.output_bytes == 400  # boundaries stay whole
    assert split.tensor_parallel_share == 0  # a slice does not split again
    assert whole == WHOLE
    assert split_costs(ModelCosts(layers=(SPLIT,)), 1, link).layers == (SPLIT,)


def test_sequence_parallelism_splits_the_stream_s_layers_by_the_written_out_formula():
    link = Link(latency=0.01, bandwidth=100.0)
    block = LayerCost(**{**SPLIT.__dict__, "sequence_parallel_activation_share": 0.8})
    position = LayerCost(**{**WHOLE.__dict__, "sequence_parallel_activation_share": 0.0})
    costs = ModelCosts(layers=(position, block, SPLIT, WHOLE))
    plain = split_costs(costs, 4, link).layers
    (position4, block4, split4, whole4) = split_costs(costs, 4, link, sequence_parallel=True).layers
    moving = 2 * (2 * 3 / 4 * 400 / 100)  # priced as the all-reduces the gathers / scatters replace
    regather = 2 * (3 / 4 * 400 / 100)  # W all-gathers the two projections' inputs again
    assert block4.forward_s == pytest.approx(1.0 / 4 + moving)  # the norms split too
    assert block4.backward_s == pytest.approx(3.0 / 4 + moving + regather)
    assert block4.weight_s == pytest.approx(1.0 / 4 + regather)
    assert block4.input_s == pytest.approx(2.0 / 4 + moving)
    assert block4.fixed_s == plain[1].fixed_s
    assert block4.activation_bytes == round(1000 * (1 - 0.8 + 0.8 / 4))
    assert block4.parameter_bytes == plain[1].parameter_bytes  # the norms' weights are replicated
    assert block4.output_bytes == 100 and position4.output_bytes == 100  # a boundary carries 1/tp
    assert (position4.forward_s, position4.activation_bytes) == (0.5, 100)  # its work is whole
    # Layers without the mark are priced as plain tensor parallelism prices them.
    assert (split4, whole4) == plain[2:]
    assert plain[:2] == split_costs(ModelCosts(layers=(position, block)), 4, link).layers
    assert plain[0] == position and plain[1].output_bytes == 400


def test_the_gpt_marks_the_layers_sequence_parallelism_splits():
    costs = gpt_costs(num_layers=3, d_model=64, num_heads=4, seq_len=16)
    marks = [layer.sequence_parallel_activation_share for layer in costs.layers]
    assert marks == [None, 0.0, 1.0, 1.0, 1.0, None, None]
    assert ModelCosts.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    split = split_costs(costs, 2, Link(), sequence_parallel=True)
    plain = split_costs(costs, 2, Link())
    assert sum(layer.activation_bytes for layer in split.layers) < sum(
        layer.activation_bytes for layer in plain.layers
    )
    # Boundaries in the stream halve; the embedding's (before) and the norm's (after) do not.
    halved = [a.output_bytes * 2 == b.output_bytes for a, b in zip(split.layers, plain.layers, strict=True)]
    assert halved == [False, True, True, True, True, False, False]


def test_the_fixed_seconds_come_with_forward_and_the_input_gradient_not_with_w():
    from pipefold.plan.stages import StageLayout, stage_cost_model

    costs = split_costs(ModelCosts(layers=(SPLIT,) * 2, reference_rows=2), 2, Link(latency=0.1))
    model = stage_cost_model(costs, StageLayout((0, 2), rows=4), (), Link())
    fixed = 2 * costs.layers[0].fixed_s  # two layers in the stage
    assert fixed == pytest.approx(2 * 2 * 2 * 0.1)
    assert model.f[0] == pytest.approx(2 * 2 * costs.layers[0].forward_s + fixed)
    assert model.i[0] == pytest.approx(2 * 2 * costs.layers[0].input_s + fixed)
    assert model.w[0] == pytest.approx(2 * 2 * costs.layers[0].weight_s)
    assert model.b[0] == pytest.approx(2 * 2 * costs.layers[0].backward_s + fixed)


def test_the_gpt_blocks_split_as_its_plan_splits_them():
    costs = gpt_costs(num_layers=3, d_model=64, num_heads=4, seq_len=16)
    blocks = costs.layers[2:5]
    assert all(layer.num_tensor_parallel_allreduces == 2 for layer in blocks)
    assert all(layer.tensor_parallel_activation_share == 0.75 for layer in blocks)
    # Every parameter but 2 layer norms (4d) and the two row-split biases (2d).
    d = 64
    assert blocks[0].tensor_parallel_share == pytest.approx((12 * d * d + 7 * d) / (12 * d * d + 13 * d))
    others = costs.layers[:2] + costs.layers[5:]
    assert all(layer.tensor_parallel_share == 0 for layer in others)
    assert costs.tensor_parallel_degrees == (1, 2, 4)
    assert with_gpt_tensor_parallel(costs, num_layers=3, d_model=64, num_heads=4) == costs


def _gpt(**changes):
    options = {"num_layers": 4, "d_model": 256, "num_heads": 4, "seq_len": 64, "flops": 1e12}
    options.update(changes)
    return gpt_costs(**options)


def test_tp_wins_where_its_link_is_free_and_loses_where_it_is_slow():
    costs = _gpt()
    fast = PlanOptions(num_devices=4, global_batch=8, max_tensor_parallel=4, order_search_s=0,
                       link=Link(latency=1e-4, bandwidth=1e9), tp_link=Link())
    chosen = plan(costs, fast).choice
    # Free all-reduces: splitting the blocks has no bubble and no cost, so tp takes every device
    # it can (dp would also be free but replicates the head, which tp leaves whole as well).
    assert chosen.num_tensor_parallel == 4 and chosen.num_devices == 4
    slow = PlanOptions(num_devices=4, global_batch=8, max_tensor_parallel=4, order_search_s=0,
                       link=Link(latency=1e-4, bandwidth=1e9), tp_link=Link(latency=0.05, bandwidth=1e6))
    assert plan(costs, slow).choice.num_tensor_parallel == 1


def test_tp_makes_a_model_fit_that_no_pipeline_fits():
    costs = _gpt(num_layers=2, d_model=512)
    with pytest.raises(NoFeasiblePlan) as caught:  # the least memory any whole-layer pipeline needs
        plan(costs, PlanOptions(num_ranks=2, global_batch=8, memory_limit=1, order_search_s=0))
    limit = caught.value.least.peak_memory * 0.9
    # A slow tp link, so tp is chosen for its memory, not its speed.
    options = PlanOptions(num_ranks=2, global_batch=8, memory_limit=limit, max_tensor_parallel=2,
                          tp_link=Link(latency=0.01, bandwidth=1e8), order_search_s=0)
    found = plan(costs, options)
    assert found.choice.num_tensor_parallel == 2 and found.choice.peak_memory <= limit
    verdicts = {verdict.subject: verdict for verdict in found.degrees}
    assert verdicts["dp=1 x pp=2"].status == "over-memory"
    assert verdicts["dp=1 x pp=2 x tp=2"].status == "chosen"
    text = found.explain()
    assert "dp x pp x tp for the pinned pipeline:" in text and "--tensor-parallel 2" in text
    assert Plan.from_json(json.loads(json.dumps(found.to_json()))) == found


@settings(max_examples=25, deadline=None)
@given(degree=st.sampled_from([2, 4]), num_layers=st.integers(2, 5), rows=st.integers(1, 4))
def test_a_tp_rank_holds_less_and_computes_less_on_a_free_link(degree, num_layers, rows):
    costs = _gpt(num_layers=num_layers)
    config = Config("1f1b", 1, 2, rows)
    bounds = (0, 3, costs.num_layers)
    whole = evaluate(costs, config, 2, bounds, (), Link())
    split = evaluate(split_costs(costs, degree, Link()), config, 2, bounds, (), Link(),
                     num_tensor_parallel=degree)
    assert split.num_tensor_parallel == degree and split.num_devices == 2 * degree
    assert split.step_time < whole.step_time
    for mine, theirs in zip(split.memory, whole.memory, strict=True):
        assert mine.weights < theirs.weights and mine.activations <= theirs.activations


def test_degrees_the_model_cannot_split_into_are_named():
    found = plan(_gpt(num_heads=4), PlanOptions(num_devices=6, global_batch=12, max_tensor_parallel=3,
                                                order_search_s=0))
    verdicts = {verdict.subject: verdict for verdict in found.degrees}
    assert verdicts["dp=1 x pp=2 x tp=3"].status == "not-applicable"
    assert "allow tp in 1, 2, 4" in verdicts["dp=1 x pp=2 x tp=3"].reason
    plain = ModelCosts(layers=(WHOLE,) * 4)
    found = plan(plain, PlanOptions(num_ranks=2, global_batch=4, max_tensor_parallel=2, order_search_s=0))
    assert found.choice.num_tensor_parallel == 1
    (split,) = [v for v in found.degrees if v.subject == "dp=1 x pp=2 x tp=2"]
    assert split.status == "not-applicable" and "no layer" in split.reason
    with pytest.raises(ConfigError, match="nothing to search"):
        plan(plain, PlanOptions(num_ranks=2, global_batch=4, tensor_parallel=2, order_search_s=0))


def test_asynchronous_families_are_not_searched_with_tp():
    found = plan(_gpt(), PlanOptions(num_ranks=2, global_batch=8, tensor_parallel=2, allow_async=True,
                                     order_search_s=0))
    verdicts = {verdict.subject: verdict for verdict in found.families}
    assert verdicts["pipedream"].status == "not-applicable" and "tp=2" in verdicts["pipedream"].reason


PINNED = {"num_devices": 8, "data_parallel": 2, "num_ranks": 2}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"num_ranks": 2, "tensor_parallel": 0}, "tensor_parallel = 0"),
        ({"num_ranks": 2, "max_tensor_parallel": 0}, "max_tensor_parallel = 0"),
        ({"num_devices": 4, "tensor_parallel": 3}, "tensor_parallel = 3 does not divide num_devices = 4"),
        ({**PINNED, "tensor_parallel": 2}, None),
        ({**PINNED, "max_tensor_parallel": 2}, None),
        ({**PINNED, "max_tensor_parallel": 1}, "is 4, not num_devices"),
        ({**PINNED, "num_devices": 16, "max_tensor_parallel": 2}, "no dp x pp x tp"),
        ({**PINNED, "tensor_parallel": 1}, "is 4, not num_devices"),
        ({"num_ranks": 2, "tp_link": "fast"}, "tp_link = 'fast'"),
    ],
)
def test_bad_tp_options_are_refused_by_name(options, words):
    options = {"global_batch": 8, "order_search_s": 0, **options}
    if words is None:
        PlanOptions(**options)  # consistent pins are accepted
        return
    with pytest.raises(ConfigError, match=words):
        PlanOptions(**options)


def test_a_tp_layer_field_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="tensor_parallel_share = 1.5"):
        LayerCost(forward_s=1, backward_s=1, activation_bytes=0, output_bytes=0, tensor_parallel_share=1.5)
    with pytest.raises(ConfigError, match="tensor_parallel_degrees"):
        ModelCosts(layers=(WHOLE,), tensor_parallel_degrees=(0,))


def test_costs_json_round_trips_the_tp_fields(tmp_path):
    costs = _gpt()
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs.to_json()))
    assert ModelCosts.from_json(path) == costs


def test_cli_searches_tp_and_shows_it(capsys):
    code = main(["plan", "--model", "gpt", "--num-layers", "4", "--d-model", "256", "--devices", "4",
                 "--batch-size", "8", "--max-tensor-parallel", "4", "--bandwidth", "1e9",
                 "--tp-bandwidth", "1e15", "--order-search", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_tensor_parallel"] == result["choice"]["num_tensor_parallel"] > 1
    subjects = [verdict["subject"] for verdict in result["degrees"]]
    assert "dp=1 x pp=2 x tp=2" in subjects and "dp=1 x pp=4" in subjects
    code = main(["plan", "--model", "gpt", "--ranks", "2", "--tensor-parallel", "2", "--batch-size", "8",
                 "--order-search", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "choice: dp=1 x pp=2 x tp=2" in out and "tensor parallel: each stage split over 2 ranks" in out


def test_sequence_parallelism_lowers_the_planned_activations_and_is_recorded():
    costs = gpt_costs(num_layers=4, d_model=128, num_heads=4, seq_len=128)
    common = dict(num_ranks=2, tensor_parallel=2, global_batch=8, order_search_s=0.0)
    plain = plan(costs, PlanOptions(**common))
    split = plan(costs, PlanOptions(**common, sequence_parallel=True))
    assert split.choice.sequence_parallel and not plain.choice.sequence_parallel
    assert split.choice.peak_memory < plain.choice.peak_memory
    assert "sequence parallel" in split.explain() and "sequence parallel" not in plain.explain()
    assert Plan.from_json(json.loads(json.dumps(split.to_json()))).choice == split.choice
    # Without tp there is nothing to split: the flag changes nothing.
    alone = dict(num_ranks=2, global_batch=8, order_search_s=0.0)
    assert plan(costs, PlanOptions(**alone, sequence_parallel=True)).choice == plan(
        costs, PlanOptions(**alone)
    ).choice
    with pytest.raises(ConfigError, match="sequence_parallel = 1"):
        PlanOptions(**alone, sequence_parallel=1)


def test_a_tp_rank_s_backward_temporaries_split_weight_part_as_weights_and_rows_part_as_activations():
    # 300 bytes of new weight gradient (fixed) + 900 that grow with the rows (the gradients of
    # the activations); a layer the split leaves whole keeps all of its own.
    block = LayerCost(**{**SPLIT.__dict__, "backward_temporary_bytes": 1200,
                         "backward_temporary_fixed_bytes": 300})
    norm = LayerCost(**{**WHOLE.__dict__, "backward_temporary_bytes": 500,
                        "backward_temporary_fixed_bytes": 20})
    link = Link(latency=0.0, bandwidth=1e12)
    (block4, norm4) = split_costs(ModelCosts(layers=(block, norm)), 4, link).layers
    fixed = round(300 * (1 - 0.75 + 0.75 / 4))  # the weights' share
    assert block4.backward_temporary_fixed_bytes == fixed
    assert block4.backward_temporary_bytes == fixed + round(900 * (1 - 0.5 + 0.5 / 4))  # the activations'
    assert (norm4.backward_temporary_bytes, norm4.backward_temporary_fixed_bytes) == (500, 20)
    # At twice the rows only the rows part doubles, as on one rank.
    assert block4.backward_temporary_at(2.0) == fixed + 2 * (block4.backward_temporary_bytes - fixed)
    # Sequence parallelism splits the rows part by position too (its activation share, 1 here).
    sp = LayerCost(**{**block.__dict__, "sequence_parallel_activation_share": 1.0})
    (sp4,) = split_costs(ModelCosts(layers=(sp,)), 4, link, sequence_parallel=True).layers
    assert sp4.backward_temporary_bytes == fixed + round(900 / 4)
