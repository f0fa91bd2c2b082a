"""A deferred W's extra capped in seconds (`ModelCosts.deferred_weight_most_s`): the fraction
fitted at the calibration's first size, the cap from a second zb-h1 block at twice the rows;
every factor >= 1, sizes up to the first priced as before, costs without the cap as before.
Pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.job.calibration import curve_rows_size
from pipefold.job.calibration_size import CalibrationSize
from pipefold.plan import ModelCosts
from pipefold.plan.calibrate import HeldBlock, at_run_prices
from pipefold.plan.deferred_weight import fit_deferred_most, stage_deferred_factors
from pipefold.plan.evaluate import evaluate
from pipefold.plan.held_cost import (
    family_deferred_shares,
    family_state_weights,
    order_held_bytes,
    with_held_cost,
)
from pipefold.plan.held_curve import held_factor
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link
from tests.plan._four_layers import four_layer_costs


def test_the_cap_limits_a_deferred_ws_extra_seconds_and_never_lowers_a_factor_below_1():
    # W of 2 ms and 8 ms, extra 0.2, at most 1 ms: the first pays 0.4 ms (uncapped), the second 1 ms.
    assert stage_deferred_factors((1.0, 1.0), 0.2, 1e-3, (2e-3, 8e-3)) == pytest.approx((1.2, 1.125))
    # The share scales it as before; a stage without deferred W or without W keeps 1 (>= 1 always).
    assert stage_deferred_factors((0.5, 0.0, 1.0), 0.2, 1e-3, (8e-3, 8e-3, 0.0)) == pytest.approx(
        (1.0625, 1.0, 1.2))
    # No cap: the fraction alone, with or without W times (costs before it).
    assert stage_deferred_factors((1.0,), 0.2) == stage_deferred_factors((1.0,), 0.2, 0.0, (1.0,)) == (1.2,)
    with pytest.raises(ConfigError, match="deferred_weight_most_s = -1"):
        stage_deferred_factors((1.0,), 0.2, -1.0, (1.0,))
    with pytest.raises(ConfigError, match="0 W times for 1 stages"):
        stage_deferred_factors((1.0,), 0.2, 1e-3)


def test_the_cap_is_fitted_from_the_second_sizes_extra_seconds_and_keeps_the_first_sizes_price():
    # First size: W 4 ms, extra 0.24 (0.96 ms). Second: W 8 ms, its deferred W (3 of 4) 1.18x:
    # 1.44 ms each, so the cap 1.44 ms; the first size's 0.96 ms stays under it.
    shares = (0.0, 0.75)
    ratios = (1.0, 1 + 0.75 * 0.18)
    assert fit_deferred_most(0.24, (4e-3, 4e-3), ratios, shares, (8e-3, 8e-3)) == pytest.approx(1.44e-3)
    # Its fraction rose (the cache not outgrown): no cap.
    assert fit_deferred_most(0.24, (4e-3, 4e-3), (1.0, 1 + 0.75 * 0.28), shares, (8e-3, 8e-3)) == 0.0
    # Extra seconds that fell between the sizes (noise): at least the first size's, so it keeps its price.
    fell = fit_deferred_most(0.24, (4e-3, 4e-3), (1.0, 1 + 0.75 * 0.1), shares, (8e-3, 8e-3))
    assert fell == pytest.approx(0.24 * 4e-3)
    # Nothing fitted at the first size, or nothing deferred at the second: no cap.
    assert fit_deferred_most(0.0, (4e-3,), (1.1,), (0.75,), (8e-3,)) == 0.0
    assert fit_deferred_most(0.24, (4e-3,), (1.1,), (0.0,), (8e-3,)) == 0.0
    with pytest.raises(ConfigError, match="give one of each per stage"):
        fit_deferred_most(0.24, (4e-3,), (1.1, 1.0), (0.75,), (8e-3,))
    with pytest.raises(ConfigError, match="weight_s holds -0.001"):
        fit_deferred_most(0.24, (4e-3,), (1.1,), (0.75,), (-1e-3,))


def test_an_order_is_priced_with_the_cap_against_its_stages_w_at_the_candidates_rows():
    capped = four_layer_costs(deferred_weight_grad=0.2, deferred_weight_most_s=0.004)
    plain = four_layer_costs(deferred_weight_grad=0.2)
    bounds = (0, 2, 4)
    shares = family_deferred_shares("zb-h1", 2, 8, 1)
    for rows, capped_at in ((1, False), (4, True)):
        model = stage_cost_model(capped, StageLayout(bounds, rows), (), Link())  # W 0.02 s per row there
        slowed = with_held_cost(model, capped, (0, 1), (0, 0), bounds, (), shares)
        before = with_held_cost(model, plain, (0, 1), (0, 0), bounds, (), shares)
        extra = min(0.2, 0.004 / model.w[1])
        assert slowed.w[1] == pytest.approx(model.w[1] * (1 + extra * 7 / 8))
        assert (slowed.w[1] < before.w[1]) is capped_at and slowed.w[1] >= model.w[1]
    # The planner prices zb-h1 at 4 rows cheaper with the cap, never below the unslowed order.
    config = Config("zb-h1", 1, 8, 4)
    times = [evaluate(costs, config, 2, bounds, (), Link()).step_time
             for costs in (capped, plain, four_layer_costs())]
    assert times[2] <= times[0] < times[1]


def test_costs_write_the_cap_only_where_fitted_and_older_files_price_as_before():
    before = four_layer_costs(deferred_weight_grad=0.2)
    assert "deferred_weight_most_s" not in before.to_json()
    assert ModelCosts.from_json(before.to_json()) == before
    capped = replace(before, deferred_weight_most_s=0.004)
    assert ModelCosts.from_json(capped.to_json()) == capped
    with pytest.raises(ConfigError, match="deferred_weight_most_s = -0.1"):
        four_layer_costs(deferred_weight_most_s=-0.1)


def test_the_second_curve_block_runs_at_the_second_size_where_it_has_twice_the_rows():
    sizes = (CalibrationSize(8), CalibrationSize(4), CalibrationSize(2))
    assert curve_rows_size(sizes, 32, 2) == CalibrationSize(4)
    assert curve_rows_size(sizes[:1], 32, 2) is None  # one size
    assert curve_rows_size((CalibrationSize(8), CalibrationSize(2)), 32, 2) is None  # 4x the rows
    assert curve_rows_size(sizes, 32, 8) is None  # fewer micro-batches than ranks
    assert curve_rows_size((CalibrationSize(4), CalibrationSize(2)), 8, 2) is None  # too few to defer


def _run(f, i, w, b=None):
    b = [x + y for x, y in zip(i, w, strict=True)] if b is None else b
    return CostModel.from_lists(list(f), list(i), list(w), b=list(b), action_overhead=50e-6,
                                step_overhead=0.01, link=Link(latency=2e-4))


def test_the_calibration_fits_the_cap_from_its_second_curve_block():
    profile = four_layer_costs()
    bounds, rows, second_rows = (0, 2, 4), 1, 2
    held_at = {family: order_held_bytes(profile, bounds, rows, family, 2, 8)
               for family in ("1f1b", "1f1b+split", "zb-h1", "gpipe")}
    measured = stage_cost_model(profile, StageLayout(bounds, rows), (), Link())
    half = [x / 2 for x in measured.b]
    run = _run(measured.f, half, half)
    split = _run(measured.f, half, half)
    # The first curve block: its last stage's deferred W 1.2x (7 of 8 deferred).
    curve = _run(measured.f, half, [half[0], half[1] * (1 + 0.2 * 7 / 8)])
    gpipe = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.i], [t * 1.065 for t in run.w])
    # The second size: 1F1B's B twice the first's; the second curve block on a host 5% slower,
    # its deferred W (3 of 4) at most `most` seconds more than right after its I.
    second = _run([2 * t for t in measured.f], [2 * t for t in half], [2 * t for t in half])
    shares = family_deferred_shares("zb-h1", 2, 4, 1)
    run_bytes, curve_bytes = (order_held_bytes(profile, bounds, second_rows, family, 2, 4)
                              for family in ("1f1b", "zb-h1"))
    w_second = 2 * half[1]
    most = 0.2 * half[1] * 1.25  # 0.25 more than the first size's extra seconds
    slow = 1.05
    block = _run([2 * t * slow for t in measured.f], [2 * t * slow for t in half],
                 [2 * half[0] * slow, (w_second + shares[1] * most) * slow],
                 [2 * t * slow for t in measured.b])
    held = HeldBlock(gpipe, held_at["1f1b"], held_at["gpipe"], held_at["1f1b+split"], curve, held_at["zb-h1"],
                     family_state_weights("zb-h1", 2, 8, 1), family_deferred_shares("zb-h1", 2, 8, 1),
                     block, second_rows, run_bytes, curve_bytes, shares)
    priced, calibration = at_run_prices(profile, run, bounds, rows, [(second, second_rows)], split=split,
                                        split_stages=[1], held=held)
    factor = held_factor(priced.held_curve, curve_bytes[1] - run_bytes[1])[1]
    ratio = (w_second + shares[1] * most) / factor / w_second
    assert priced.deferred_weight_most_s == pytest.approx((ratio - 1) * w_second / shares[1])
    # Above the first size's extra seconds (its fraction of its W), so the first size keeps its price.
    at_first = priced.deferred_weight_grad * half[1]
    assert calibration.deferred_weight_most_s == priced.deferred_weight_most_s > at_first
    # Without the second block: no cap, and everything else as before.
    without, _ = at_run_prices(profile, run, bounds, rows, [(second, second_rows)], split=split,
                               split_stages=[1], held=replace(held, curve_rows=None))
    assert without == replace(priced, deferred_weight_most_s=0.0)
    with pytest.raises(ConfigError, match="a size the run did not measure"):
        at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1], held=held)
    with pytest.raises(ConfigError, match="2 stages, 1 deferred shares"):
        at_run_prices(profile, run, bounds, rows, [(second, second_rows)], split=split, split_stages=[1],
                      held=replace(held, curve_rows_deferred_shares=(0.5,)))
