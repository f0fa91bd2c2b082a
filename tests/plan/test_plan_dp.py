"""The data-parallel degree: dp x pp splits of the devices, the gradient all-reduce term, rejections, CLI."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, Plan, PlanOptions, plan
from pipefold.plan.degree import allreduce_time
from pipefold.plan.ranking import rank_key
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule import build
from pipefold.simulate import Link, simulate
from tests.plan._layer_costs import layer_costs


def costs_of(num_layers=8, parameter_bytes=500, activation_bytes=1000):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=activation_bytes, output_bytes=100,
                      parameter_bytes=parameter_bytes)
    return ModelCosts(layers=(layer,) * num_layers, reference_rows=1, overhead_s=0.1)


def expected_step(costs, candidate, link, dp_link):
    """Independently: the replica's pipeline re-simulated, plus the ring all-reduce of the largest
    rank's gradient bytes written out from the formula."""
    # A searched order ("auto") carries its schedule; a family's is rebuilt from its name.
    schedule = candidate.order or build(candidate.schedule, num_ranks=candidate.num_ranks,
                                        num_microbatches=candidate.num_microbatches,
                                        num_virtual=candidate.num_virtual)
    model = stage_cost_model(costs, StageLayout(candidate.bounds, candidate.microbatch_rows),
                             candidate.recompute, link)
    pipeline = simulate(schedule, model).makespan
    owned = [0] * candidate.num_ranks
    for stage, rank in enumerate(schedule.placement):
        owned[rank] += sum(layer.parameter_bytes
                           for layer in costs.layers[candidate.bounds[stage]:candidate.bounds[stage + 1]])
    grad = max(owned) * costs.gradient_bytes_per_parameter_byte
    dp = candidate.num_data_parallel
    allreduce = 0.0 if dp == 1 or grad == 0 else (
        2 * (dp - 1) / dp * grad / dp_link.bandwidth + 2 * (dp - 1) * dp_link.latency)
    return pipeline, allreduce


# -- the all-reduce term -------------------------------------------------------------------------

def test_ring_allreduce_time():
    link = Link(latency=1e-3, bandwidth=1e6)
    # 2 (4-1)/4 x 1000 B / 1e6 B/s + 2 (4-1) x 1 ms
    assert allreduce_time(1000, 4, link) == pytest.approx(0.0015 + 0.006, rel=1e-12)
    assert allreduce_time(1000, 2, link) == pytest.approx(0.001 + 0.002, rel=1e-12)
    assert allreduce_time(1000, 1, link) == 0.0
    assert allreduce_time(0, 8, link) == 0.0
    assert allreduce_time(10**9, 8, Link()) == 0.0  # an ideal link
    # The bandwidth term approaches 2 x bytes / bandwidth as dp grows.
    assert allreduce_time(10**6, 1000, Link(bandwidth=1e6)) == pytest.approx(2 * 999 / 1000)


def test_candidate_step_is_the_replica_pipeline_plus_the_allreduce():
    costs = costs_of()
    link, dp_link = Link(latency=1e-4, bandwidth=1e6), Link(latency=2e-3, bandwidth=5e4)
    tops = [plan(costs, PlanOptions(num_devices=4, data_parallel=dp, global_batch=16, link=link,
                                    dp_link=dp_link, top=4)).top for dp in (1, 2, 4)]
    for candidate in (c for top in tops for c in top):
        pipeline, allreduce = expected_step(costs, candidate, link, dp_link)
        assert candidate.allreduce_s == pytest.approx(allreduce, rel=1e-12)
        assert candidate.step_time == pytest.approx(pipeline + allreduce, rel=1e-12)
        # Each replica runs global_batch / dp rows in its micro-batches.
        assert candidate.num_microbatches * candidate.microbatch_rows == 16 // candidate.num_data_parallel


def test_dp_link_defaults_to_the_pipeline_link():
    costs = costs_of()
    link = Link(latency=1e-3, bandwidth=1e5)
    same = plan(costs, PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, link=link))
    explicit = plan(costs, PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, link=link, dp_link=link))
    assert same.choice == explicit.choice and same.choice.allreduce_s > 0


# -- which split wins ----------------------------------------------------------------------------

def test_dp_wins_with_a_big_batch_a_small_model_and_a_fast_link():
    result = plan(costs_of(num_layers=4), PlanOptions(num_devices=4, global_batch=64,
                                                      dp_link=Link(bandwidth=1e12)))
    choice = result.choice
    assert (choice.num_data_parallel, choice.num_ranks) == (4, 1)
    assert choice.bubble_fraction == 0.0  # one stage per replica: nothing to wait for
    assert [v.subject for v in result.degrees] == ["dp=1 x pp=4", "dp=2 x pp=2", "dp=4 x pp=1"]
    assert {v.subject: v.status for v in result.degrees}["dp=4 x pp=1"] == "chosen"
    assert result.num_devices == 4 and result.num_data_parallel == 4


def test_a_slow_dp_link_hands_the_win_back_to_the_pipeline():
    costs = costs_of(num_layers=4, parameter_bytes=10**6)
    fast = plan(costs, PlanOptions(num_devices=4, global_batch=64, dp_link=Link(bandwidth=1e12)))
    slow = plan(costs, PlanOptions(num_devices=4, global_batch=64, dp_link=Link(bandwidth=1e5)))
    assert fast.choice.num_data_parallel == 4
    assert slow.choice.num_data_parallel == 1 and slow.choice.allreduce_s == 0.0
    verdicts = {v.subject: v for v in slow.degrees}
    assert verdicts["dp=4 x pp=1"].status in ("slower", "pruned")


def test_pp_wins_when_one_device_cannot_hold_the_model():
    # 8 layers x 1000 parameter bytes x (1 weights + 1 gradients + 2 Adam) = 32000 bytes of state.
    costs = costs_of(parameter_bytes=1000)
    result = plan(costs, PlanOptions(num_devices=4, global_batch=32, memory_limit=20000,
                                     dp_link=Link(bandwidth=1e12)))
    assert result.choice.num_ranks >= 2 and result.choice.peak_memory <= 20000
    verdict = {v.subject: v for v in result.degrees}["dp=4 x pp=1"]
    assert verdict.status == "over-memory"
    assert ("weights, gradients and optimizer state alone exceed the limit on rank 0 by 11.7 KiB"
            in verdict.reason)
    # Without the limit the same devices would go all data-parallel.
    assert plan(costs, PlanOptions(num_devices=4, global_batch=32, dp_link=Link(bandwidth=1e12))
                ).choice.num_data_parallel == 4


def test_searching_the_degree_finds_the_best_pinned_degree():
    # The search prunes across splits; it must agree with planning each split alone.
    costs = costs_of(num_layers=6)
    common = dict(global_batch=24, memory_limit=12000, link=Link(latency=0.01, bandwidth=1e4),
                  dp_link=Link(latency=0.05, bandwidth=2e4), max_virtual=2)
    searched = plan(costs, PlanOptions(num_devices=6, **common))
    pinned = []
    for dp in (1, 2, 3, 6):
        try:
            pinned.append(plan(costs, PlanOptions(num_devices=6, data_parallel=dp, **common)).choice)
        except NoFeasiblePlan:
            assert {v.subject: v.status for v in searched.degrees}[f"dp={dp} x pp={6 // dp}"] in (
                "over-memory", "pruned")
    assert len(pinned) >= 2  # the limit leaves a real choice between splits
    best = min(pinned, key=rank_key)
    assert rank_key(searched.choice) == rank_key(best)
    assert searched.choice.step_time == pytest.approx(best.step_time, rel=1e-12)


# -- rejections and validation -------------------------------------------------------------------

def test_a_split_that_cannot_take_the_batch_is_listed_with_its_reason():
    result = plan(costs_of(), PlanOptions(num_devices=8, global_batch=32, microbatches=8))
    reasons = {v.subject: (v.status, v.reason) for v in result.degrees}
    assert reasons["dp=8 x pp=1"] == (
        "not-applicable",
        "dp=8: global batch 32 gives 4 rows per replica, fewer than m=8 "
        "(each micro-batch needs at least one row)",
    )
    assert result.choice.num_data_parallel in (1, 2, 4)

    uneven = plan(costs_of(), PlanOptions(num_devices=8, global_batch=12))
    reasons = {v.subject: (v.status, v.reason) for v in uneven.degrees}
    assert reasons["dp=8 x pp=1"] == (
        "not-applicable", "dp=8: global batch 12 does not split into 8 equal replica batches "
        "(dp must divide it: 1, 2, 3, 4, 6, 12)")
    assert reasons["dp=4 x pp=2"][0] != "not-applicable"


def test_more_pipeline_ranks_than_layers_is_listed():
    result = plan(costs_of(num_layers=2), PlanOptions(num_devices=4, global_batch=8))
    reasons = {v.subject: v.reason for v in result.degrees}
    assert reasons["dp=1 x pp=4"].startswith(
        "pp=4: 4 pipeline ranks need 4 stages but the model has 2 layers")


def test_asynchronous_families_are_not_applicable_with_replicas():
    result = plan(costs_of(), PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, allow_async=True))
    verdict = {v.subject: v for v in result.families}["pipedream"]
    assert verdict.status == "not-applicable" and "dp=2 > 1" in verdict.reason
    with pytest.raises(ConfigError, match="nothing to search"):
        plan(costs_of(), PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, allow_async=True,
                                     schedules=("pipedream",)))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(global_batch=8), "num_ranks and num_devices are both None"),
    (dict(num_ranks=2, data_parallel=3, global_batch=8),
     "data_parallel = 3: global batch 8 does not split into 3 equal replica batches"),
    (dict(num_ranks=2, data_parallel=4, global_batch=8, microbatches=4),
     "data_parallel = 4: global batch 8 gives 2 rows per replica, fewer than m=4"),
    (dict(num_ranks=1, data_parallel=2, global_batch=12, microbatches=4),
     "data_parallel = 2: global batch 12 gives 6 rows per replica, which m=4 does not divide"),
    (dict(num_devices=6, data_parallel=4, global_batch=8),
     "data_parallel = 4 does not divide num_devices = 6"),
    (dict(num_devices=6, num_ranks=4, global_batch=8), "num_ranks = 4 does not divide num_devices = 6"),
    (dict(num_devices=8, num_ranks=2, data_parallel=2, global_batch=8),
     "data_parallel = 2 x num_ranks = 2 is 4, not num_devices = 8"),
    (dict(num_devices=0, global_batch=8), "num_devices = 0"),
    (dict(num_ranks=2, data_parallel=0, global_batch=8), "data_parallel = 0"),
    (dict(num_devices=4, global_batch=8, dp_link="fast"), "dp_link = 'fast'"),
])
def test_bad_degree_options_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PlanOptions(**kwargs)


def test_num_devices_with_a_pinned_pp_or_dp_is_one_split():
    options = PlanOptions(num_devices=8, num_ranks=2, global_batch=8)
    assert options.degree_splits() == [(4, 2, 1)] and not options.searches_degree
    result = plan(costs_of(), options)
    assert (result.choice.num_data_parallel, result.choice.num_ranks) == (4, 2)
    assert result.degrees == () and result.num_devices is None
    assert "choice: dp=4 x pp=2, " in result.explain()


def test_no_split_can_run_the_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="no dp x pp split of 4 devices can run this batch") as caught:
        plan(costs_of(num_layers=1), PlanOptions(num_devices=4, global_batch=3))
    assert "dp=2: global batch 3 does not split" in str(caught.value)
    assert "pp=4: 4 pipeline ranks need 4 stages" in str(caught.value)


def test_nothing_fits_names_the_split_of_the_leanest():
    costs = costs_of(parameter_bytes=1000)
    with pytest.raises(NoFeasiblePlan) as caught:
        plan(costs, PlanOptions(num_devices=4, global_batch=8, memory_limit=3000))
    error = caught.value
    assert error.least.num_ranks == 4  # the state spreads over most ranks with no replicas
    assert f"with {error.least.degree_text}, " in str(error)


# -- results out ---------------------------------------------------------------------------------

def test_json_and_explanation_show_dp_and_pp():
    result = plan(costs_of(), PlanOptions(num_devices=4, global_batch=16, dp_link=Link(bandwidth=1e6)))
    data = result.to_json()
    assert data["num_devices"] == 4 and data["num_data_parallel"] == result.choice.num_data_parallel
    assert data["choice"]["num_data_parallel"] * data["choice"]["num_ranks"] == 4
    assert [d["subject"] for d in data["degrees"]] == ["dp=1 x pp=4", "dp=2 x pp=2", "dp=4 x pp=1"]
    assert Plan.from_json(json.loads(json.dumps(data))) == result
    text = result.explain()
    assert "dp x pp for 4 devices:" in text and f"schedules at {result.choice.degree_text}:" in text


def test_plans_without_dp_read_as_before():
    result = plan(costs_of(), PlanOptions(num_ranks=2, global_batch=8))
    assert result.degrees == () and result.num_devices is None and result.choice.allreduce_s == 0.0
    text = result.explain()
    assert "dp=" not in text and "\nschedules:\n" in text


# -- property -------------------------------------------------------------------------------------

layers = layer_costs(3000)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layer_list=st.lists(layers, min_size=1, max_size=5),
    num_devices=st.sampled_from([1, 2, 3, 4, 6]),
    batch=st.sampled_from([2, 4, 6, 12]),
    limit=st.integers(2000, 60000),
    bandwidth=st.floats(1e2, 1e6),
    latency=st.floats(0.0, 0.1),
)
def test_the_choice_fits_splits_the_devices_and_is_a_resimulation(
    layer_list, num_devices, batch, limit, bandwidth, latency
):
    costs = ModelCosts(layers=tuple(layer_list))
    dp_link = Link(latency=latency, bandwidth=bandwidth)
    options = PlanOptions(num_devices=num_devices, global_batch=batch, memory_limit=limit, max_virtual=2,
                          top=3, dp_link=dp_link)
    try:
        result = plan(costs, options)
    except NoFeasiblePlan as error:
        assert error.least.peak_memory > limit
        return
    except ConfigError as error:
        assert "nothing to search" in str(error)
        return
    for candidate in result.top:
        assert candidate.peak_memory <= limit
        assert candidate.num_data_parallel * candidate.num_ranks == num_devices
        assert batch % candidate.num_data_parallel == 0
        pipeline, allreduce = expected_step(costs, candidate, Link(), dp_link)
        assert candidate.step_time == pytest.approx(pipeline + allreduce, rel=1e-9, abs=1e-12)
    if num_devices > 1:
        assert len(result.degrees) == len([d for d in range(1, num_devices + 1) if num_devices % d == 0])


# -- CLI ------------------------------------------------------------------------------------------

GPT = ["plan", "--model", "gpt", "--batch-size", "16"]


def test_cli_devices_searches_dp_x_pp(capsys):
    assert main([*GPT, "--devices", "4", "--memory", "64MiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_devices"] == 4
    assert out["choice"]["num_data_parallel"] * out["choice"]["num_ranks"] == 4
    assert out["num_data_parallel"] == out["choice"]["num_data_parallel"]
    assert len(out["degrees"]) == 3


def test_cli_table_shows_the_split(capsys):
    assert main([*GPT, "--devices", "4", "--top", "2", "--dp-bandwidth", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "top 2 of 4 devices (dp x pp searched)" in out and "dp x pp for 4 devices:" in out


def test_cli_data_parallel_pins_dp(capsys):
    assert main([*GPT, "--ranks", "2", "--data-parallel", "2", "--bandwidth", "1e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["choice"]["num_data_parallel"], out["choice"]["num_ranks"]) == (2, 2)
    assert out["choice"]["allreduce_s"] > 0 and out["degrees"] == [] and out["num_devices"] is None
    assert out["choice"]["num_microbatches"] * out["choice"]["microbatch_rows"] == 8


def test_cli_devices_with_pinned_ranks_shows_the_split(capsys):
    assert main([*GPT, "--devices", "4", "--ranks", "2", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "top 1 of p=2, dp=2" in out and "choice: dp=2 x pp=2, " in out


def test_cli_without_the_flags_is_one_pipeline_of_four(capsys):
    assert main([*GPT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_ranks"], out["num_data_parallel"], out["num_devices"]) == (4, 1, None)


def test_cli_bad_data_parallel_is_a_clear_error(capsys):
    assert main([*GPT, "--ranks", "2", "--data-parallel", "3"]) == 2
    err = capsys.readouterr().err
    assert "pipefold plan: error: data_parallel = 3: global batch 16 does not split into 3" in err
    assert main([*GPT, "--devices", "6", "--data-parallel", "4"]) == 2
    assert "data_parallel = 4 does not divide num_devices = 6" in capsys.readouterr().err
    assert main([*GPT, "--devices", "4", "--dp-latency", "-1"]) == 2
    assert "--dp-latency = -1.0; give seconds >= 0" in capsys.readouterr().err


def test_unlimited_memory_round_trips_with_degrees():
    result = plan(costs_of(), PlanOptions(num_devices=2, global_batch=8))
    assert math.isinf(Plan.from_json(result.to_json()).memory_limit)


def test_cli_says_when_the_allreduce_is_priced_free(capsys):
    assert main([*GPT, "--devices", "4", "--json"]) == 0
    assert "the gradient all-reduce between replicas costs 0 here" in capsys.readouterr().err
    assert main([*GPT, "--devices", "4", "--dp-bandwidth", "1e9", "--json"]) == 0
    assert "all-reduce" not in capsys.readouterr().err
    assert main([*GPT, "--json"]) == 0  # one pipeline: no all-reduce to price
    assert capsys.readouterr().err == ""


# -- ZeRO-1 ----------------------------------------------------------------------------------------


def test_zero_halves_the_optimizer_state_and_adds_the_weights_all_gather():
    from pipefold.plan.degree import allgather_time

    costs = costs_of()
    link = Link(latency=0.01, bandwidth=1000.0)
    base = {"num_ranks": 2, "data_parallel": 2, "global_batch": 8, "dp_link": link, "order_search_s": 0,
            "schedules": ("1f1b",), "microbatches": 2}
    plain = plan(costs, PlanOptions(**base)).choice
    zero = plan(costs, PlanOptions(**base, zero=True)).choice
    assert zero.sharded_optimizer and not plain.sharded_optimizer
    assert (zero.bounds, zero.num_microbatches) == (plain.bounds, plain.num_microbatches)
    for mine, theirs in zip(zero.memory, plain.memory, strict=True):
        assert mine.optimizer == round(theirs.optimizer / 2)
        assert (mine.weights, mine.gradients, mine.activations) == (
            theirs.weights, theirs.gradients, theirs.activations
        )
    weights = max(memory.weights for memory in plain.memory)
    assert zero.allreduce_s == pytest.approx(plain.allreduce_s + allgather_time(weights, 2, link))
    assert allgather_time(1000, 2, link) == pytest.approx(0.5 + 0.01)
    assert "ZeRO-1" in plan(costs, PlanOptions(**base, zero=True)).explain()
    # Without replicas there is nothing to shard: the same plan as without it.
    alone = {**base, "data_parallel": 1}
    assert not plan(costs, PlanOptions(**alone, zero=True)).choice.sharded_optimizer


def test_zero_makes_replicas_fit_where_their_optimizer_state_does_not():
    costs = costs_of(parameter_bytes=5000, activation_bytes=10)
    base = {"num_devices": 4, "global_batch": 8, "order_search_s": 0, "schedules": ("1f1b",)}
    # dp=4 x pp=1: one rank holds all 8 layers. A limit under their static bytes (weights,
    # gradients, two Adam moments: 8 x 5000 x 4) but over weights, gradients and half the moments.
    limit = 8 * 5000 * 3.5
    found = plan(costs, PlanOptions(**base, memory_limit=limit, zero=True, data_parallel=4))
    assert found.choice.num_data_parallel == 4 and found.choice.sharded_optimizer
    assert found.choice.peak_memory <= limit
    with pytest.raises(NoFeasiblePlan):
        plan(costs, PlanOptions(**base, memory_limit=limit, data_parallel=4))
