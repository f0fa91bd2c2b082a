"""The planner's searched order for its choice ([Note: planner refinement] in pipefold/plan/refine.py)."""

import json
import math

import pytest

from pipefold.cli.main import main
from pipefold.plan import LayerCost, ModelCosts, Plan, PlanOptions, plan
from pipefold.plan.refine import search_order
from pipefold.schedule import validate
from pipefold.schedule.io import load

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
    # The choice itself stays the family: the table and the verdicts are unchanged.
    assert result.choice.schedule == "1f1b"


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
