"""Searched orders in the planner: reported for the choice, and candidates of their own
(docs/decisions.md, "Planner refinement")."""

import argparse
import json
import math
import shlex

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, Plan, PlanOptions, plan
from pipefold.plan.ranking import time_bucket
from pipefold.plan.refine import search_order
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule import validate
from pipefold.schedule.io import load
from pipefold.simulate import Link, simulate

# The last layer carries a head twice as heavy, and messages cost time: a hand-written
# 1F1B order leaves bubbles that a searched order can fill.
_LAYER = LayerCost(forward_s=1e-3, backward_s=2e-3, activation_bytes=2**20, output_bytes=2**16,
                   parameter_bytes=2**20)
_HEAD = LayerCost(forward_s=2e-3, backward_s=4e-3, activation_bytes=2**20, output_bytes=2**16,
                  parameter_bytes=2**20)
COSTS = ModelCosts(layers=(_LAYER,) * 7 + (_HEAD,))


def _options(**pins):
    return PlanOptions(num_ranks=4, global_batch=16, **pins)


def test_a_pinned_family_gets_a_faster_searched_order_that_fits():
    limit = 40 * 2**20
    result = plan(COSTS, _options(schedules=("1f1b",), microbatches=8, memory_limit=limit))
    searched = result.searched
    assert searched is not None and searched.family == "1f1b"
    validate(searched.schedule)
    assert searched.schedule.num_microbatches == 8 and searched.schedule.num_ranks == 4
    assert searched.schedule.placement == (0, 1, 2, 3)
    assert searched.gain > 1.01  # 1F1B's order is not the fastest for these costs
    assert searched.step_time < result.choice.step_time
    assert searched.peak_memory <= limit
    assert "searched order: predicted step" in result.explain()
    # A pinned family without "auto": searched orders do not compete, the choice stays the family.
    assert result.choice.schedule == "1f1b"
    assert all(not candidate.is_searched_order for candidate in result.top)


def test_the_searched_order_respects_a_tight_limit():
    loose = plan(COSTS, _options(schedules=("1f1b",), microbatches=8))
    limit = loose.choice.peak_memory  # exactly the family's own peak
    tight = plan(COSTS, _options(schedules=("1f1b",), microbatches=8, memory_limit=limit))
    assert tight.searched is not None
    assert tight.searched.peak_memory <= limit


def test_plan_json_round_trip_keeps_the_searched_order():
    result = plan(COSTS, _options(schedules=("interleaved-1f1b",), microbatches=8, virtual=2))
    assert result.searched is not None
    again = Plan.from_json(json.loads(json.dumps(result.to_json())))
    assert again.searched == result.searched
    assert again.searched is not None and again.searched.schedule.actions == result.searched.schedule.actions


def test_no_search_when_off_or_asynchronous():
    assert plan(COSTS, _options(order_search_s=0)).searched is None
    async_plan = plan(COSTS, _options(schedules=("pipedream",), allow_async=True))
    assert async_plan.searched is None
    assert search_order(COSTS, _options(), async_plan.choice) is None


@pytest.mark.parametrize("bad", [-1.0, math.inf, True])
def test_bad_search_time_is_refused_naming_the_field(bad):
    from pipefold.errors import ConfigError

    with pytest.raises(ConfigError, match="order_search_s"):
        _options(order_search_s=bad)


def test_cli_saves_the_schedule_to_run(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS.to_json()))
    target = tmp_path / "schedule.json"
    assert main(["plan", "--costs", str(costs), "--ranks", "4", "--batch", "16", "--schedule", "1f1b",
                 "--microbatches", "8", "--save-schedule", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = load(target)
    assert out["searched"]["gain"] > 1.0
    assert saved.name == "auto" and saved.num_microbatches == 8
    # Off: the family's own order is written.
    assert main(["plan", "--costs", str(costs), "--ranks", "4", "--batch", "16", "--schedule", "1f1b",
                 "--microbatches", "8", "--order-search", "0", "--save-schedule", str(target), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["searched"] is None
    assert load(target).name == "1f1b"


def test_cli_refuses_a_save_path_in_a_missing_folder(tmp_path, capsys):
    code = main(["plan", "--model", "gpt", "--ranks", "2", "--batch", "8",
                 "--save-schedule", str(tmp_path / "missing" / "s.json")])
    assert code != 0
    assert "does not exist" in capsys.readouterr().err


# -- searched orders as candidates ---------------------------------------------------------------

# Uneven layers whose weight-gradient shares differ: every family's order leaves a bubble that a
# searched order fills (dualpipe-v's v=2 configuration, about 3% faster searched).
UNEVEN = ModelCosts(layers=tuple(
    LayerCost(forward_s=f, backward_s=b, weight_grad_s=w, activation_bytes=2**20, output_bytes=2**16,
              parameter_bytes=2**20)
    for f, b, w in [(0.5e-3, 1e-3, 0.2e-3), (1e-3, 3e-3, 2e-3), (2e-3, 3e-3, 0.5e-3), (1e-3, 4e-3, 3e-3)] * 2
))


def _resimulated(costs, candidate):
    """The candidate's order simulated again on its own configuration (no all-reduce here: dp = 1)."""
    layout = StageLayout(candidate.bounds, candidate.microbatch_rows)
    return simulate(candidate.order, stage_cost_model(costs, layout, candidate.recompute, Link())).makespan


def test_a_faster_searched_order_becomes_the_choice():
    families_only = plan(UNEVEN, _options(order_search_s=0))
    result = plan(UNEVEN, _options())
    choice = result.choice
    assert choice.is_searched_order and choice.schedule == "auto" and choice.order is not None
    validate(choice.order)
    # Beyond the 1% tolerance faster than every family candidate, which the plan keeps as best_family.
    assert result.best_family == families_only.choice
    assert time_bucket(choice.step_time) < time_bucket(families_only.choice.step_time)
    assert _resimulated(UNEVEN, choice) == pytest.approx(choice.step_time, rel=1e-12)
    # Its configuration is its base family's: the order is the only difference.
    assert choice.base_family in {c.schedule for c in families_only.top}
    assert choice.pipeline_kwargs()["schedule"] is choice.order
    assert result.searched is not None and result.searched.schedule == choice.order
    text = result.explain()
    assert text.startswith("choice: auto (vs ")
    assert "searched order chosen:" in text and "pipefold.schedule.io.load(FILE)" in text
    assert not any(v.status == "chosen" for v in result.families)  # no family order is the choice


def test_pinning_a_family_with_auto_lets_its_searched_order_compete():
    pins = {"schedules": ("1f1b", "auto"), "microbatches": 8}
    result = plan(COSTS, _options(**pins))
    assert result.choice.is_searched_order and result.choice.base_family == "1f1b"
    assert result.best_family is not None and result.best_family.schedule == "1f1b"
    assert result.choice.step_time < result.best_family.step_time / 1.01


def test_a_searched_order_can_fit_where_no_family_order_of_it_does():
    """Under a limit 1F1B's 8 micro-batches exceed without recompute, a searched order that holds fewer
    in flight fits without it, and beats the family's recomputing candidate."""
    limit = 22 * 2**20
    pins = {"schedules": ("1f1b", "auto"), "microbatches": 8, "memory_limit": limit}
    families_only = plan(COSTS, _options(**pins, order_search_s=0)).choice
    assert families_only.recompute  # the family needs recompute to fit
    # Twice the default budgets: on a loaded host the default's seconds hold too few iterations.
    result = plan(COSTS, _options(**pins, order_search_s=2.0, order_search_total_s=4.0))
    assert result.choice.is_searched_order and result.choice.recompute == ()
    assert result.choice.peak_memory <= limit
    assert result.searched is not None and not result.searched.family_fits
    assert result.choice.step_time < families_only.step_time


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    times=st.lists(st.tuples(st.floats(0.1, 3.0), st.floats(0.1, 6.0), st.floats(0.0, 0.9)), min_size=2,
                   max_size=6),
    num_ranks=st.integers(1, 3),
    batch=st.sampled_from([2, 4, 6]),
    limit=st.one_of(st.just(math.inf), st.integers(3000, 40000)),
)
def test_the_refined_choice_is_never_slower_than_the_families_and_is_what_it_says(
    times, num_ranks, batch, limit
):
    costs = ModelCosts(layers=tuple(
        LayerCost(forward_s=f, backward_s=b, weight_grad_s=b * share, activation_bytes=1000, output_bytes=100,
                  parameter_bytes=300)
        for f, b, share in times
    ))
    if num_ranks > costs.num_layers:
        return
    budgets = {"order_search_s": 0.05, "order_search_total_s": 0.2}
    common = {"num_ranks": num_ranks, "global_batch": batch, "memory_limit": limit, "max_virtual": 2}
    try:
        families_only = plan(costs, PlanOptions(**common, order_search_s=0)).choice
    except NoFeasiblePlan:
        return
    result = plan(costs, PlanOptions(**common, **budgets))
    choice = result.choice
    assert choice.step_time <= families_only.step_time
    assert choice.peak_memory <= limit
    if choice.is_searched_order:
        assert result.best_family == families_only
        assert time_bucket(choice.step_time) < time_bucket(families_only.step_time)
        assert _resimulated(costs, choice) == pytest.approx(choice.step_time, rel=1e-12)
    else:
        assert choice == families_only


def test_the_budget_bounds_the_number_of_searches():
    # Under this limit many recompute choices of 1F1B's configuration are over memory, and each is a
    # configuration whose order may fit: more targets than the budget searches.
    pins = {"schedules": ("1f1b", "auto"), "microbatches": 8, "memory_limit": 22 * 2**20,
            "order_search_s": 0.05}
    free = plan(COSTS, _options(**pins, max_order_searches=50, order_search_total_s=100))
    assert free.num_order_searches >= 4
    for most in (1, 3):
        bounded = plan(COSTS, _options(**pins, max_order_searches=most, order_search_total_s=100))
        assert bounded.num_order_searches == most and bounded.num_order_unsearched >= 1
    spent = plan(COSTS, _options(**pins, order_search_total_s=0))
    assert spent.num_order_searches == 1  # the family choice's configuration, always; no other starts
    assert spent.num_order_unsearched >= 1


def test_order_search_off_is_the_families_only_plan():
    off = plan(UNEVEN, _options(order_search_s=0))
    assert off.searched is None and off.best_family is None
    assert (off.num_order_searches, off.num_order_pruned, off.num_order_unsearched) == (0, 0, 0)
    assert not any(candidate.is_searched_order for candidate in off.top)
    assert "orders searched" not in off.explain()


def test_plan_json_round_trip_with_a_searched_choice():
    result = plan(UNEVEN, _options())
    assert result.choice.is_searched_order
    data = json.loads(json.dumps(result.to_json()))
    assert data["choice"]["schedule"] == data["choice"]["pipeline_kwargs"]["schedule"] == "auto"
    assert data["choice"]["base_family"] == result.choice.base_family
    again = Plan.from_json(data)
    assert again == result
    assert again.choice.order is not None and again.choice.order.actions == result.choice.order.actions


@pytest.mark.parametrize("bad", [{"order_search_total_s": -1.0}, {"order_search_total_s": math.inf},
                                 {"max_order_searches": 0}, {"schedules": ("auto",)}])
def test_bad_order_search_options_are_refused_naming_the_field(bad):
    from pipefold.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        _options(**bad)


def _train_config(command):
    words = shlex.split(command)
    assert words[:2] == ["pipefold", "train"]
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(words[1:]))


def test_cli_saves_a_searched_choice_and_the_train_command_runs_that_file(tmp_path, capsys):
    # The GPT the CLI estimates, 1F1B pinned with auto: a searched order beats 1F1B's by about 3%.
    gpt = ["plan", "--model", "gpt", "--num-layers", "4", "--d-model", "64", "--num-heads", "4",
           "--seq-len", "32", "--ranks", "2", "--batch-size", "16", "--schedule", "1f1b",
           "--schedule", "auto"]
    target = tmp_path / "schedule.json"
    assert main([*gpt, "--save-schedule", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choice"]["schedule"] == "auto"
    saved = load(target)
    assert saved.actions == Plan.from_json(out).choice.order.actions
    config = _train_config(out["train_command"])
    assert config.schedule.file == str(target)
    assert (config.schedule.ranks, config.schedule.num_microbatches) == (2, out["choice"]["num_microbatches"])
    assert list(config.partition) == out["choice"]["pipeline_kwargs"]["partition"]
    # Without a file to read, there is no command to print, and the text says how to get one.
    assert main([*gpt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_command"] is None
    assert main(gpt) == 0
    text = capsys.readouterr().out
    assert "auto (vs 1f1b)" in text and "run it: add --save-schedule FILE" in text


def test_a_searched_order_rescues_a_plan_no_family_order_fits():
    """1F1B pinned without recompute holds 24 MiB at 8 micro-batches; a searched order of the same
    configuration holds fewer in flight and fits 16 MiB, so the plan has a choice where the families
    alone have none."""
    pins = {"schedules": ("1f1b", "auto"), "microbatches": 8, "recompute": "none", "memory_limit": 16 * 2**20}
    with pytest.raises(NoFeasiblePlan):
        plan(COSTS, _options(**pins, order_search_s=0))
    result = plan(COSTS, _options(**pins))
    choice = result.choice
    assert choice.is_searched_order and choice.peak_memory <= 16 * 2**20 and choice.recompute == ()
    assert result.best_family is None  # no family candidate fits
    assert result.searched is not None and not result.searched.family_fits
    assert "fits where 1f1b's order of this configuration does not" in result.explain()
    assert {v.status for v in result.families if v.subject == "1f1b"} == {"over-memory"}
    # Pinned without "auto", the families' verdict stands.
    with pytest.raises(NoFeasiblePlan):
        plan(COSTS, _options(**{**pins, "schedules": ("1f1b",)}))
