"""The split backward's own seconds as a share of the stage's backward work
(`ModelCosts.split_backward_share`): priced at any rows, fitted by the calibration, and costs
written before it priced as before."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.calibrate import at_run_prices, first_stage_backward
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link


def _costs(**options):
    # Four layers, F 1 / I 1.5 / W 0.5 each at 2 rows, a fixed second per call on the first two,
    # 0.01 s per layer and action.
    layers = tuple(
        LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=10, output_bytes=10, parameter_bytes=100,
                  weight_grad_s=0.5, fixed_s=0.25 if index < 2 else 0.0)
        for index in range(4))
    return ModelCosts(layers=layers, reference_rows=2, overhead_s=0.01, **options)


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("recompute", [(), (1,)])
def test_each_i_and_w_pays_the_share_of_its_stages_backward_work_at_any_rows(rows, recompute):
    before = _costs(split_overhead_s=0.003)
    shared = replace(before, split_backward_share=0.06)
    layout = StageLayout((0, 1, 4), rows)
    old = stage_cost_model(before, layout, recompute, Link())
    new = stage_cost_model(shared, layout, recompute, Link())
    assert new.f == old.f and new.b == old.b
    for stage, layers in enumerate((1, 3)):
        fixed = 0.01 * layers
        # The stage's backward work: B less the seconds per layer and action, and less the
        # forward a recomputed stage reruns (which the share does not grow with).
        work = new.b[stage] - fixed - (new.f[stage] if stage in recompute else 0.0)
        assert new.i[stage] - old.i[stage] == pytest.approx(0.06 * work)
        assert new.w[stage] - old.w[stage] == pytest.approx(0.06 * work)
    # The share grows with the rows (the work does); the seconds per action do not.
    small = stage_cost_model(shared, StageLayout((0, 1, 4), 1), (), Link())
    large = stage_cost_model(shared, StageLayout((0, 1, 4), 8), (), Link())
    small_extra = small.i[1] + small.w[1] - small.b[1] - 0.03 - 2 * 0.003
    large_extra = large.i[1] + large.w[1] - large.b[1] - 0.03 - 2 * 0.003
    assert large_extra / small_extra == pytest.approx((large.b[1] - 0.03) / (small.b[1] - 0.03))


@pytest.mark.parametrize("recompute", [(), (0,)])
def test_first_stage_backward_moves_the_same_input_work_with_a_share(recompute):
    # Token ids: the first stage's I keeps its fixed seconds, the split's seconds and share (and a
    # rerun forward); its I work moves into W, as without the share.
    before = _costs(split_overhead_s=0.003, input_requires_grad=False)
    shared = replace(before, split_backward_share=0.06)
    layout = StageLayout((0, 2, 4), 4)
    old = first_stage_backward(stage_cost_model(before, layout, recompute, Link()), before, layout.bounds)
    unmoved = stage_cost_model(shared, layout, recompute, Link())
    new = first_stage_backward(unmoved, shared, layout.bounds)
    work = unmoved.b[0] - 0.02 - (unmoved.f[0] if recompute else 0.0)
    assert new.i[0] == pytest.approx(old.i[0] + 0.06 * work)
    assert new.w[0] == pytest.approx(old.w[0] + 0.06 * work)
    assert new.i[0] + new.w[0] == pytest.approx(unmoved.i[0] + unmoved.w[0])


def test_costs_written_before_the_share_read_and_price_as_before():
    before = _costs(split_overhead_s=8.4e-4)
    written = before.to_json()
    assert "split_backward_share" not in written  # a file as calibrations before it wrote
    loaded = ModelCosts.from_json(written)
    assert loaded == before and loaded.split_backward_share == 0.0
    model = stage_cost_model(loaded, StageLayout((0, 2, 4), 4), (), Link())
    # I = fixed + own + split + the layers' I at 4 rows; W = fixed + split + their W: as before.
    assert model.i[0] == pytest.approx(0.02 + 0.5 + 8.4e-4 + 2 * 1.5 * 2)
    assert model.w[1] == pytest.approx(0.02 + 8.4e-4 + 2 * 0.5 * 2)
    assert model.b[1] == pytest.approx(0.02 + 2 * 2.0 * 2)
    shared = replace(before, split_backward_share=0.06)
    assert ModelCosts.from_json(shared.to_json()) == shared


@pytest.mark.parametrize("share", [0.5, -0.01, math.nan, True, "0.1"])
def test_a_share_outside_its_range_is_refused(share):
    with pytest.raises(ConfigError, match="split_backward_share"):
        _costs(split_backward_share=share)


def _run(model, action_overhead=50e-6):
    halves = [x / 2 for x in model.b]
    return CostModel.from_lists(list(model.f), halves, halves, b=list(model.b),
                                action_overhead=action_overhead, step_overhead=0.01, link=Link(latency=2e-4))


def test_calibration_fits_the_share_at_one_size_and_prices_other_sizes():
    # The split phase measured at 4 rows; I and W priced at 1 and 16 rows as the truth runs them.
    profile = _costs()
    truth = replace(profile, split_backward_share=0.07)
    bounds, rows = (0, 1, 4), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured)
    priced, calibration = at_run_prices(profile, run, bounds, rows,
                                        split=replace(measured, action_overhead=run.action_overhead))
    assert calibration.split_backward_share == pytest.approx(0.07) == priced.split_backward_share
    assert calibration.split_overhead_s == pytest.approx(0.0)
    for other in (1, 16):
        now = stage_cost_model(priced, StageLayout(bounds, other), (), Link())
        true = stage_cost_model(truth, StageLayout(bounds, other), (), Link())
        assert now.i == pytest.approx(true.i) and now.w == pytest.approx(true.w)
    # A constant fitted at 4 rows (what calibrations before priced) misses both sizes.
    constant = replace(truth, split_backward_share=0.0,
                       split_overhead_s=(measured.i[1] + measured.w[1] - measured.b[1] - 0.03) / 2)
    for other, low in ((1, False), (16, True)):
        then = stage_cost_model(constant, StageLayout(bounds, other), (), Link())
        true = stage_cost_model(truth, StageLayout(bounds, other), (), Link())
        assert (then.w[1] < true.w[1]) == low


def test_a_shorter_split_gap_lowers_the_share_not_below_zero():
    # The split phase's gaps between actions ran shorter than 1F1B's (noise): no seconds per
    # action, and the share takes the difference, as the seconds did before.
    profile = _costs()
    truth = replace(profile, split_backward_share=0.07)
    bounds, rows = (0, 1, 4), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured)
    shorter = replace(measured, action_overhead=run.action_overhead - 40e-6)
    _, calibration = at_run_prices(profile, run, bounds, rows, split=shorter)
    gap = 1.5 * 40e-6
    work = [measured.b[stage] - 0.01 * layers for stage, layers in enumerate((1, 3))]
    assert calibration.split_overhead_s == 0.0
    assert calibration.split_backward_share == pytest.approx(sum(0.07 - gap / x for x in work) / 2)
    # A split phase that ran faster than B everywhere fits no share at all.
    quick = replace(measured, i=tuple(x / 2 for x in measured.b), w=tuple(x / 2 for x in measured.b),
                    action_overhead=run.action_overhead - 40e-6)
    _, none = at_run_prices(profile, run, bounds, rows, split=quick)
    assert none.split_backward_share == 0.0 and none.split_overhead_s == 0.0
