"""A rank's actions priced slower by the activations it holds (pipefold.plan.held_cost): the fit from
a calibration's two blocks, the factor per rank, and costs without a slope priced as before.
Pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import ModelCosts, PlanOptions, plan
from pipefold.plan.calibrate import HeldBlock, at_run_prices, first_stage_backward
from pipefold.plan.evaluate import evaluate
from pipefold.plan.held_cost import (
    fit_held_slope,
    held_extra,
    order_held_bytes,
    prices_held,
    with_held_cost,
)
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link, simulate
from tests.plan._four_layers import MB, four_layer_costs


def _flat(pairs):
    return [value for pair in pairs for value in pair]


def test_fit_recovers_the_slope_of_synthetic_measurements():
    # GPipe against 1F1B on two ranks: 10 / 17 MB held against 68 / 76 MB; each action 0.42% slower
    # per MB its rank holds more.
    slope = 0.0042 / MB
    base_bytes, more_bytes = [17 * MB, 10 * MB], [76 * MB, 68 * MB]
    base = [0.010, 0.012]
    more = [t * (1 + slope * (m - b)) for t, b, m in zip(base, base_bytes, more_bytes, strict=True)]
    assert fit_held_slope(base, more, base_bytes, more_bytes) == pytest.approx(slope, rel=1e-9)
    # Faster while holding more is noise: no negative slope (a factor below 1 would break bounds).
    assert fit_held_slope(base, [t * 0.9 for t in base], base_bytes, more_bytes) == 0.0


@pytest.mark.parametrize(("arguments", "message"), [
    (([0.01, 0.01], [0.01], [1, 1], [2, 2]), r"lengths \{'base_seconds': 2, 'more_seconds': 1"),
    (([0.01], [0.01], [0], [2]), r"base_bytes holds 0; give positive values"),
    (([0.01], [0.01], [1], [-5]), r"more_bytes holds -5; give positive values"),
    (([0.0], [0.01], [1], [2]), r"base_seconds holds 0.0"),
    (([0.01], [0.01], [3], [2]), r"more_bytes \[2\] is nowhere above base_bytes \[3\]; measure a block"),
])
def test_fit_refuses_bad_input_with_the_field_and_the_fix(arguments, message):
    with pytest.raises(ConfigError, match=message):
        fit_held_slope(*arguments, kind="F")


def test_a_rank_holding_more_is_priced_slower_by_exactly_its_factor():
    costs = four_layer_costs(held_forward_per_byte=0.004 / MB, held_backward_per_byte=0.001 / MB,
                   held_reference_bytes=3 * MB)
    model = stage_cost_model(costs, StageLayout((0, 2, 4), 1), (), Link())
    slowed = with_held_cost(model, costs, (0, 1), (10 * MB, 2 * MB), (0, 2, 4))
    # Rank 0 holds 7 MB beyond the reference: F +2.8%, B, I and W +0.7%; rank 1 holds less: as measured.
    assert _flat(held_extra(costs, (10 * MB, 2 * MB), (0, 1), (0, 2, 4))) == pytest.approx(
        [0.028, 0.007, 0.0, 0.0])
    assert slowed.f == pytest.approx((model.f[0] * 1.028, model.f[1]), rel=1e-12)
    for kind in ("b", "i", "w"):
        assert getattr(slowed, kind) == pytest.approx(
            (getattr(model, kind)[0] * 1.007, getattr(model, kind)[1]), rel=1e-12)
    assert slowed.f[1] == model.f[1] and slowed.activation_bytes == model.activation_bytes


def test_evaluate_slows_a_candidate_by_the_activations_its_ranks_hold():
    # One rank running GPipe: the step is m x (F + B), every action slowed by the rank's factor.
    slope = 0.003 / MB
    plain = four_layer_costs()
    held = replace(plain, held_forward_per_byte=slope, held_backward_per_byte=slope,
                   held_reference_bytes=2 * MB)
    config = Config("gpipe", 1, 8, 1)
    before = evaluate(plain, config, 1, (0, 4), (), Link())
    after = evaluate(held, config, 1, (0, 4), (), Link())
    peak = after.memory[0].activations
    assert peak == before.memory[0].activations == 8 * 4 * MB
    factor = 1 + slope * (peak - 2 * MB)
    assert after.step_time == pytest.approx(before.step_time * factor, rel=1e-12)
    assert _flat(after.held_slowdown) == pytest.approx([factor - 1, factor - 1])
    assert before.held_slowdown == ()


def test_costs_without_a_slope_price_every_candidate_as_before_bit_equal():
    options = PlanOptions(num_ranks=2, global_batch=8, max_virtual=2, order_search_s=0.0)
    base = plan(four_layer_costs(), options)
    # A reference without a slope, and a slope whose reference no candidate reaches: no factor.
    for costs in (four_layer_costs(held_reference_bytes=5.0 * MB),
                  four_layer_costs(held_forward_per_byte=1e-6, held_backward_per_byte=1e-6,
                                   held_reference_bytes=1e12)):
        other = plan(costs, options)
        assert [c.step_time for c in other.top] == [c.step_time for c in base.top]
        assert other.choice.step_time == base.choice.step_time
        assert "activations held" not in other.explain()
    assert not prices_held(four_layer_costs(held_reference_bytes=5.0))


def test_the_explain_says_the_term_where_it_is_not_zero():
    costs = four_layer_costs(held_forward_per_byte=0.004 / MB, held_backward_per_byte=0.001 / MB,
                   held_reference_bytes=1 * MB)
    result = plan(costs, PlanOptions(num_ranks=2, global_batch=8, schedules=("gpipe",), order_search_s=0.0))
    line = next(line for line in result.explain().splitlines() if "activations held" in line)
    f, b = result.choice.held_slowdown[0]
    assert f > 0 and f"+{f:.1%} F, +{b:.1%} B on rank 0" in line
    # The candidate carries it through its JSON.
    assert type(result.choice).from_json(result.choice.to_json()).held_slowdown == result.choice.held_slowdown


def test_searched_orders_are_priced_with_the_activations_their_ranks_hold():
    costs = four_layer_costs(held_forward_per_byte=0.004 / MB, held_backward_per_byte=0.002 / MB,
                   held_reference_bytes=1 * MB)
    result = plan(costs, PlanOptions(num_ranks=2, global_batch=8, max_virtual=2, order_search_s=0.15,
                                     order_search_total_s=0.6))
    searched = [c for c in result.top if c.order is not None]
    if not searched:
        pytest.skip("no searched order ranked on this toy model")
    for candidate in searched:
        layout = StageLayout(candidate.bounds, candidate.microbatch_rows)
        model = first_stage_backward(stage_cost_model(costs, layout, candidate.recompute, Link()), costs,
                                     candidate.bounds)
        peaks = simulate(candidate.order, model).activation_bytes_peak
        slowed = with_held_cost(model, costs, candidate.order.placement, peaks, candidate.bounds)
        assert candidate.step_time == pytest.approx(simulate(candidate.order, slowed).makespan)
        assert _flat(candidate.held_slowdown) == pytest.approx(
            _flat(held_extra(costs, peaks, candidate.order.placement, candidate.bounds)))


def _run(f, b):
    return CostModel.from_lists(list(f), [x / 2 for x in b], [x / 2 for x in b], b=list(b),
                                action_overhead=50e-6, step_overhead=0.01, link=Link(latency=2e-4))


def test_at_run_prices_fits_the_curve_from_a_held_block_and_prices_the_run_as_measured():
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    one_f_one_b = order_held_bytes(profile, bounds, rows, "1f1b", 2, 8)
    gpipe = order_held_bytes(profile, bounds, rows, "gpipe", 2, 8)
    assert all(g > o for g, o in zip(gpipe, one_f_one_b, strict=True))
    run = _run([0.020, 0.021], [0.040, 0.041])
    # GPipe's F 1.10x / 1.12x and B 1.05x / 1.06x per rank: a knot at each rank's bytes beyond its
    # own 1F1B's, B on F's shape scaled (here exactly half of F's excess).
    block = _run([run.f[0] * 1.10, run.f[1] * 1.12], [run.b[0] * 1.05, run.b[1] * 1.06])
    priced, calibration = at_run_prices(profile, run, bounds, rows, held=HeldBlock(block, one_f_one_b, gpipe))
    excess = sorted(g - o for g, o in zip(gpipe, one_f_one_b, strict=True))
    assert [knot[0] for knot in priced.held_curve] == excess and calibration.held_curve == priced.held_curve
    assert sorted(knot[1] for knot in priced.held_curve) == pytest.approx([1.10, 1.12])
    assert [knot[2] - 1 for knot in priced.held_curve] == pytest.approx(
        [(knot[1] - 1) / 2 for knot in priced.held_curve])
    # Each layer's reference is what its own rank held in the run; the line's fields stay unset.
    assert priced.held_reference_layer_bytes == (one_f_one_b[0],) * 2 + (one_f_one_b[1],) * 2
    assert priced.held_forward_per_byte == 0.0 == priced.held_backward_per_byte
    assert priced.held_reference_bytes == max(one_f_one_b)
    assert calibration.held_bytes == one_f_one_b and calibration.held_block_bytes == gpipe
    # The run's own configuration is priced as it measured (no rank holds more than its reference),
    # and GPipe's as its block measured it, each stage at its rank's point.
    plain, _ = at_run_prices(profile, run, bounds, rows)
    for family, expected in (("1f1b", (1.0, 1.0)), ("gpipe", (1.10, 1.12))):
        config = Config(family, 1, 8, rows)
        model = stage_cost_model(plain, StageLayout(bounds, rows), (), Link())
        peaks = order_held_bytes(profile, bounds, rows, family, 2, 8)
        slowed = with_held_cost(model, priced, (0, 1), peaks, bounds)
        assert [f / g for f, g in zip(slowed.f, model.f, strict=True)] == pytest.approx(expected)
        if family == "1f1b":
            assert evaluate(priced, config, 2, bounds, (), Link()).step_time == evaluate(
                plain, config, 2, bounds, (), Link()).step_time
    assert plain.held_curve == () and not prices_held(plain)
    # The costs carry the curve and the references through their JSON.
    again = ModelCosts.from_json(priced.to_json())
    assert again.held_curve == priced.held_curve
    assert again.held_reference_layer_bytes == priced.held_reference_layer_bytes
    with pytest.raises(ConfigError, match="held block bytes for 1 and 2 ranks, the run has 2"):
        at_run_prices(profile, run, bounds, rows, held=HeldBlock(block, one_f_one_b[:1], gpipe))


def test_costs_refuse_a_negative_slope():
    with pytest.raises(ConfigError, match=r"ModelCosts.held_forward_per_byte = -1.0; give a finite number"):
        four_layer_costs(held_forward_per_byte=-1.0)
