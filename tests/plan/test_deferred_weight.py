"""A W priced slower away from its own I (pipefold.plan.deferred_weight): counted from the order,
fitted on the calibration's zb-h1 block against its split block, applied where the planner prices
an order; costs without the term price and read as before. Pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import ModelCosts
from pipefold.plan.calibrate import HeldBlock, at_run_prices
from pipefold.plan.deferred_weight import (
    LARGEST_DEFERRED_WEIGHT,
    fit_deferred_weight,
    stage_deferred_factors,
    stage_deferred_shares,
)
from pipefold.plan.evaluate import evaluate
from pipefold.plan.held_cost import (
    family_deferred_shares,
    family_state_weights,
    order_held_bytes,
    prices_held,
    with_held_cost,
)
from pipefold.plan.held_curve import held_factor
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule.ir import Action, Op, Schedule
from pipefold.schedule.registry import build
from pipefold.simulate import CostModel, Link
from tests.plan._four_layers import four_layer_costs


def _one_rank(*names: str) -> Schedule:
    ops = {"F": Op.F, "B": Op.B, "I": Op.I, "W": Op.W}
    actions = tuple(Action(ops[name[0]], int(name[1]), int(name[3:])) for name in names)
    return Schedule("hand", 1, 2, 3, (0, 0), (actions,))


def test_a_w_is_deferred_unless_its_own_i_ran_just_before_it_on_its_rank():
    # Stage 0: W0.0 right after I0.0 (own); W0.1 after another micro-batch's I; W0.2 after an F.
    # Stage 1: W1.0 after a B; W1.1 after another stage's I.
    schedule = _one_rank("F0.0", "I0.0", "W0.0", "F0.1", "F0.2", "I0.1", "I0.2", "W0.1", "F1.0", "W0.2",
                         "I1.0", "F1.1", "F1.2", "B1.2", "W1.0", "I1.1", "F0.3", "I0.3", "W1.1")
    assert stage_deferred_shares(schedule) == pytest.approx((2 / 3, 1.0))
    # A cool-down's I(a) I(b) W(a) W(b): W(a) deferred (I(b) between), W(b) not (only a W between).
    cool_down = _one_rank("F0.0", "F1.0", "I1.0", "I0.0", "W1.0", "W0.0")
    assert stage_deferred_shares(cool_down) == (0.0, 1.0)
    # No W: 0 (1F1B's stages).
    assert stage_deferred_shares(build("1f1b", num_ranks=2, num_microbatches=8)) == (0.0, 0.0)
    # zb-h1: stage 0's I and W adjacent (the runtime's B); the last stage's W after the next I but
    # its last (after the W before it: I(7) W(6) W(7)).
    assert family_deferred_shares("zb-h1", 2, 8, 1) == (0.0, 7 / 8)
    assert stage_deferred_factors((0.0, 0.5, 1.0), 0.2) == pytest.approx((1.0, 1.1, 1.2))
    with pytest.raises(ConfigError, match="ModelCosts.deferred_weight_grad"):
        stage_deferred_factors((1.0,), -0.1)


def test_the_extra_is_fitted_through_the_origin_over_the_stages_with_deferred_ws():
    # Stage 0's W not deferred: its ratio is not fitted.
    assert fit_deferred_weight([1.3, 1.0 + 0.17 * 0.5], (0.0, 0.5)) == pytest.approx(0.17)
    assert fit_deferred_weight([1.0, 0.95], (0.0, 1.0)) == 0.0  # faster away from its I: noise, kept at 0
    assert fit_deferred_weight([1.0, 2.0], (0.0, 1.0)) == LARGEST_DEFERRED_WEIGHT  # a burst of load: capped
    assert fit_deferred_weight([1.2, 1.2], (0.0, 0.0)) == 0.0  # nothing deferred: nothing to fit
    with pytest.raises(ConfigError, match="2 ratios for 1 stages"):
        fit_deferred_weight([1.0, 1.1], (0.5,))
    with pytest.raises(ConfigError, match="shares holds 1.5"):
        fit_deferred_weight([1.0, 1.1], (0.0, 1.5))
    with pytest.raises(ConfigError, match="ratios holds 0.0"):
        fit_deferred_weight([0.0, 1.1], (0.0, 1.0))


def test_an_order_is_slowed_on_its_deferred_ws_only_with_the_term():
    costs = four_layer_costs(deferred_weight_grad=0.2)
    assert prices_held(costs) and not prices_held(four_layer_costs())
    bounds = (0, 2, 4)
    model = stage_cost_model(costs, StageLayout(bounds, 1), (), Link())
    shares = family_deferred_shares("zb-h1", 2, 8, 1)
    slowed = with_held_cost(model, costs, (0, 1), (0, 0), bounds, (), shares)
    assert slowed.w == pytest.approx((model.w[0], model.w[1] * (1 + 0.2 * 7 / 8)))
    assert (slowed.f, slowed.i, slowed.b) == (model.f, model.i, model.b)  # W only
    # A first stage fed token ids has no I work: its W is its whole backward, never slowed.
    ids = replace(costs, input_requires_grad=False)
    assert with_held_cost(model, ids, (0, 1), (0, 0), bounds, (), (1.0, 1.0)).w == pytest.approx(
        (model.w[0], model.w[1] * 1.2))
    # No shares, or costs without the term: the model itself.
    assert with_held_cost(model, costs, (0, 1), (0, 0), bounds) is model
    assert with_held_cost(model, four_layer_costs(), (0, 1), (0, 0), bounds, (), shares) is model
    with pytest.raises(ConfigError, match="deferred_shares for 1 stages"):
        with_held_cost(model, costs, (0, 1), (0, 0), bounds, (), (0.5,))
    # The planner prices a family with it: zb-h1 slower, 1F1B (no W) alike.
    for family, slower in (("zb-h1", True), ("1f1b", False)):
        config = Config(family, 1, 8, 1)
        priced = evaluate(costs, config, 2, bounds, (), Link()).step_time
        plain = evaluate(four_layer_costs(), config, 2, bounds, (), Link()).step_time
        assert (priced > plain) is slower and priced >= plain


def test_costs_write_the_term_only_where_priced_and_older_files_read_and_price_as_before():
    plain = four_layer_costs()
    data = plain.to_json()
    assert "deferred_weight_grad" not in data
    assert ModelCosts.from_json(data) == plain
    priced = four_layer_costs(deferred_weight_grad=0.17)
    assert ModelCosts.from_json(priced.to_json()).deferred_weight_grad == 0.17
    config = Config("zb-h1", 1, 8, 1)
    assert (evaluate(ModelCosts.from_json(data), config, 2, (0, 2, 4), (), Link()).step_time
            == evaluate(plain, config, 2, (0, 2, 4), (), Link()).step_time)
    with pytest.raises(ConfigError, match="deferred_weight_grad = -0.1"):
        four_layer_costs(deferred_weight_grad=-0.1)


def _run(f, i, w):
    b = [x + y for x, y in zip(i, w, strict=True)]
    return CostModel.from_lists(list(f), list(i), list(w), b=b, action_overhead=50e-6, step_overhead=0.01,
                                link=Link(latency=2e-4))


def test_the_calibration_fits_the_term_from_its_zb_h1_w_over_its_split_blocks():
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    base, split_bytes, zb, gpipe = (order_held_bytes(profile, bounds, rows, family, 2, 8)
                                    for family in ("1f1b", "1f1b+split", "zb-h1", "gpipe"))
    measured = stage_cost_model(profile, StageLayout(bounds, rows), (), Link())
    half = [x / 2 for x in measured.b]
    run = _run(measured.f, half, half)
    split = _run(measured.f, [x * 1.05 for x in half], [x * 1.05 for x in half])
    # The zb-h1 block ran on a host 4% slower; its last stage's deferred W (7 of 8) 1.17x the
    # split block's, so its mean W 1 + 0.17 * 7 / 8.
    load, extra, share = 1.04, 0.17, 7 / 8
    curve = _run([t * load for t in measured.f], [x * 1.05 * load for x in half],
                 [half[0] * 1.05 * load, half[1] * 1.05 * load * (1 + extra * share)])
    block = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.i], [t * 1.065 for t in run.w])
    held = HeldBlock(block, base, gpipe, split_bytes, curve, zb, family_state_weights("zb-h1", 2, 8, 1),
                     family_deferred_shares("zb-h1", 2, 8, 1))
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1], held=held)
    # The curve block's drift (from its rank 0) and its B factor on the held curve taken out.
    bytes_factor = held_factor(priced.held_curve, zb[1] - base[1])[1]
    assert priced.deferred_weight_grad == pytest.approx(((1 + extra * share) / bytes_factor - 1) / share)
    assert calibration.deferred_weight_grad == priced.deferred_weight_grad
    # Without the shares (callers before the term), or without a split block: not fitted.
    before, old = at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1],
                                held=replace(held, curve_deferred_shares=()))
    assert before.deferred_weight_grad == 0.0 == old.deferred_weight_grad
    assert before == replace(priced, deferred_weight_grad=0.0)
    assert at_run_prices(profile, run, bounds, rows, held=held)[0].deferred_weight_grad == 0.0
    with pytest.raises(ConfigError, match="curve_deferred_shares has 1 entries"):
        at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1],
                      held=replace(held, curve_deferred_shares=(0.5,)))
