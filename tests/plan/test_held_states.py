"""An F priced by the I states its rank holds (pipefold.plan.held_states): counted from the order,
fitted on the calibration's zb-h1 block, applied where the planner prices an order. Pure logic,
one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import ModelCosts
from pipefold.plan.calibrate import HeldBlock, at_run_prices
from pipefold.plan.evaluate import evaluate
from pipefold.plan.held_cost import (
    family_state_weights,
    held_extra,
    order_held_bytes,
    prices_held,
    with_held_cost,
)
from pipefold.plan.held_curve import held_factor
from pipefold.plan.held_states import (
    fit_state_slowdown,
    forward_state_counts,
    stage_state_factors,
    stage_state_weights,
    state_weight,
)
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule.ir import Action, Op, Schedule
from pipefold.schedule.registry import build
from pipefold.simulate import CostModel, Link
from tests.plan._four_layers import four_layer_costs


def _one_rank(*names: str) -> Schedule:
    ops = {"F": Op.F, "B": Op.B, "I": Op.I, "W": Op.W}
    actions = tuple(Action(ops[name[0]], 0, int(name[1:])) for name in names)
    return Schedule("hand", 1, 1, 3, (0,), (actions,))


def test_an_f_counts_the_i_states_whose_w_has_not_run_on_its_rank():
    # zb-h1's last rank: F(k) I(k) W(k-1): one state held at every F but the first.
    counts = forward_state_counts(_one_rank("F0", "I0", "F1", "W0", "I1", "F2", "W1", "I2", "W2"))
    assert counts == ((0, 1, 1),)
    # Each W right after its I (the runtime runs the pair as one B): none held at any F.
    counts = forward_state_counts(_one_rank("F0", "I0", "W0", "F1", "I1", "W1", "F2", "I2", "W2"))
    assert counts == ((0, 0, 0),)
    # Two deferred: two states at the third F.
    counts = forward_state_counts(_one_rank("F0", "I0", "F1", "I1", "F2", "W0", "W1", "I2", "W2"))
    assert counts == ((0, 1, 2),)
    assert forward_state_counts(_one_rank("F0", "B0", "F1", "B1", "F2", "B2")) == ((0, 0, 0),)
    # The families: 1F1B none; zb-h1's last stage one from its second F; zb-h2's two from its third.
    one_f_one_b, zb_h1, zb_h2 = (forward_state_counts(build(name, num_ranks=2, num_microbatches=8))
                                 for name in ("1f1b", "zb-h1", "zb-h2"))
    assert one_f_one_b == ((0,) * 8, (0,) * 8)
    assert zb_h1 == ((0,) * 8, (0,) + (1,) * 7)
    assert zb_h2 == ((0,) * 8, (0, 1) + (2,) * 6)


def test_more_states_weigh_more_and_a_stage_takes_its_fs_mean():
    assert [state_weight(n) for n in range(4)] == [0.0, 1.0, 1.5, 2.0]
    with pytest.raises(ConfigError, match="held I states = -1"):
        state_weight(-1)
    weights = stage_state_weights(build("zb-h2", num_ranks=2, num_microbatches=8))
    assert weights == pytest.approx((0.0, (1.0 + 6 * 1.5) / 8))
    assert stage_state_factors(weights, 0.1) == pytest.approx((1.0, 1 + 0.1 * 10 / 8))
    with pytest.raises(ConfigError, match="ModelCosts.held_state_forward"):
        stage_state_factors(weights, -0.1)


def test_the_slowdown_is_fitted_through_the_origin_over_the_stages_that_held_states():
    weights = stage_state_weights(build("zb-h1", num_ranks=2, num_microbatches=8))  # (0, 7/8)
    assert fit_state_slowdown([1.02, 1 + 0.12 * 7 / 8], weights) == pytest.approx(0.12)  # stage 0: no state
    assert fit_state_slowdown([1.0, 0.97], weights) == 0.0  # faster while holding one: noise, kept at 0
    assert fit_state_slowdown([1.1, 1.1], (0.0, 0.0)) == 0.0  # no state held: nothing to fit
    with pytest.raises(ConfigError, match="2 ratios for 1 stages"):
        fit_state_slowdown([1.0, 1.1], (0.5,))
    with pytest.raises(ConfigError, match="ratios holds 0.0"):
        fit_state_slowdown([0.0, 1.1], weights)


def test_an_order_holding_states_is_slowed_by_them_and_only_with_the_term():
    costs = four_layer_costs(held_state_forward=0.1)
    assert prices_held(costs) and not prices_held(four_layer_costs())
    bounds = (0, 2, 4)
    model = stage_cost_model(costs, StageLayout(bounds, 1), (), Link())
    peaks = (0, 0)
    weights = family_state_weights("zb-h2", 2, 8, 1)
    slowed = with_held_cost(model, costs, (0, 1), peaks, bounds, weights)
    assert slowed.f == pytest.approx((model.f[0], model.f[1] * (1 + 0.1 * 10 / 8)))
    assert (slowed.i, slowed.w, slowed.b) == (model.i, model.w, model.b)  # F only
    # What the plan reports per rank (a candidate's `held_slowdown`) says it too.
    extra = held_extra(costs, peaks, (0, 1), bounds, weights)
    assert extra[0] == (0.0, 0.0) and extra[1] == pytest.approx((0.1 * 10 / 8, 0.0))
    assert held_extra(costs, peaks, (0, 1), bounds) == ((0.0, 0.0), (0.0, 0.0))
    # No weights (an order not counted), or costs without the term: as before.
    assert with_held_cost(model, costs, (0, 1), peaks, bounds) is model
    assert with_held_cost(model, four_layer_costs(), (0, 1), peaks, bounds, weights) is model
    with pytest.raises(ConfigError, match="state_weights for 1 stages"):
        with_held_cost(model, costs, (0, 1), peaks, bounds, (0.5,))
    # The planner prices a family with it: zb-h1 slower with the term, 1F1B (no state) alike.
    for family, slower in (("zb-h1", True), ("1f1b", False)):
        config = Config(family, 1, 8, 1)
        priced = evaluate(costs, config, 2, bounds, (), Link()).step_time
        plain = evaluate(four_layer_costs(), config, 2, bounds, (), Link()).step_time
        assert (priced > plain) is slower and priced >= plain


def test_costs_write_the_term_only_where_priced_and_older_files_read_without_it():
    plain = four_layer_costs()
    assert "held_state_forward" not in plain.to_json()
    assert ModelCosts.from_json(plain.to_json()) == plain
    priced = four_layer_costs(held_state_forward=0.12)
    assert ModelCosts.from_json(priced.to_json()).held_state_forward == 0.12
    with pytest.raises(ConfigError, match="held_state_forward = -0.1"):
        four_layer_costs(held_state_forward=-0.1)


def _run(f, b):
    return CostModel.from_lists(list(f), [x / 2 for x in b], [x / 2 for x in b], b=list(b),
                                action_overhead=50e-6, step_overhead=0.01, link=Link(latency=2e-4))


def test_the_calibration_fits_the_term_on_its_zb_h1_block_and_the_curve_keeps_gpipes_points():
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    base, split_bytes, zb, gpipe = (order_held_bytes(profile, bounds, rows, family, 2, 8)
                                    for family in ("1f1b", "1f1b+split", "zb-h1", "gpipe"))
    measured = stage_cost_model(profile, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)
    # The zb-h1 block: the host 5% slower during it; its last stage's F 1.12x per F holding one state.
    load, slowdown = 1.05, 0.12
    weights = family_state_weights("zb-h1", 2, 8, 1)
    curve = _run([t * load * (1 + slowdown * k) for t, k in zip(measured.f, weights, strict=True)],
                 measured.b)
    block = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.b])
    held = HeldBlock(block, base, gpipe, split_bytes, curve, zb, weights)
    priced, calibration = at_run_prices(profile, run, bounds, rows, held=held)
    # GPipe's points alone give the curve; the zb-h1 block's F, its bytes factor on that curve and
    # the drift taken out, gives s(1).
    gpipe_excess = sorted({float(g - b) for g, b in zip(gpipe, base, strict=True)})
    assert [knot[0] for knot in priced.held_curve] == gpipe_excess
    bytes_factor = held_factor(priced.held_curve, zb[1] - base[1])[0]
    assert bytes_factor > 1
    expected = ((1 + slowdown * weights[1]) / bytes_factor - 1) / weights[1]
    assert priced.held_state_forward == pytest.approx(expected)
    assert calibration.held_state_forward == priced.held_state_forward
    # Priced back on the block's own order, its last stage's F is what the block measured.
    model = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    again = with_held_cost(model, priced, (0, 1), zb, bounds, weights)
    assert again.f[1] == pytest.approx(run.f[1] * (1 + slowdown * weights[1]))
    # Without the block's weights (the callers before the term): its point on the bytes curve, as before.
    before, old = at_run_prices(profile, run, bounds, rows, held=replace(held, curve_state_weights=()))
    assert before.held_state_forward == 0.0 == old.held_state_forward
    assert held_factor(before.held_curve, zb[1] - base[1])[0] == pytest.approx(1 + slowdown * weights[1])
    with pytest.raises(ConfigError, match="curve_state_weights has 1 entries"):
        at_run_prices(profile, run, bounds, rows, held=replace(held, curve_state_weights=(0.5,)))
