"""The held-memory price as a curve through every measured point (pipefold.plan.held_curve), each
layer against the bytes its own calibration rank held, and the split block's drift taken from the
ranks that held no more there. Pure logic, one process."""

import random
from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import ModelCosts, PlanOptions, plan
from pipefold.plan.calibrate import HeldBlock, at_run_prices
from pipefold.plan.evaluate import evaluate
from pipefold.plan.held_cost import held_extra, order_held_bytes, stage_held_factors, with_held_cost
from pipefold.plan.held_curve import check_held_curve, fit_held_curve, held_factor
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link
from tests.plan._four_layers import MB, four_layer_costs


def test_the_curve_passes_through_every_point_linear_between_and_flat_past_the_last():
    # The concave shape measured: +9 MiB already most of +49 MiB's slowdown.
    curve = fit_held_curve([(9 * MB, 1.08), (49 * MB, 1.13), (63 * MB, 1.15)],
                           [(49 * MB, 1.065), (63 * MB, 1.075)])
    assert [knot[0] for knot in curve] == [9 * MB, 49 * MB, 63 * MB]
    assert [knot[1] for knot in curve] == pytest.approx([1.08, 1.13, 1.15])
    assert held_factor(curve, 9 * MB)[0] == pytest.approx(1.08)
    assert held_factor(curve, 4.5 * MB)[0] == pytest.approx(1.04)  # from (0, 1) to the first knot
    assert held_factor(curve, 29 * MB)[0] == pytest.approx(1.105)
    assert held_factor(curve, 500 * MB) == held_factor(curve, 63 * MB) == (curve[-1][1], curve[-1][2])
    assert held_factor(curve, 0) == held_factor(curve, -5 * MB) == held_factor((), 9 * MB) == (1.0, 1.0)
    # B: F's shape scaled to GPipe's B points (here half of F's excess at both).
    assert [knot[2] for knot in curve] == pytest.approx([1.04, 1.065, 1.075])
    # A straight line through GPipe's points alone would price +9 MiB at a fifth of the measured +8%.
    assert (1.13 - 1) * 9 / 49 < 0.3 * (held_factor(curve, 9 * MB)[0] - 1)


def test_the_curve_is_monotone_and_never_below_one_whatever_the_noise():
    # Faster while holding more is noise: kept at 1; a later point below an earlier one is pooled.
    curve = fit_held_curve([(5 * MB, 0.97), (9 * MB, 1.12), (49 * MB, 1.08), (63 * MB, 1.20)], [])
    assert [knot[1] for knot in curve] == pytest.approx([1.0, 1.10, 1.10, 1.20])
    assert all(knot[2] == 1.0 for knot in curve)  # no B point: B not slowed
    rng = random.Random(7)
    for _ in range(200):
        points = [(rng.uniform(0.1, 80) * MB, rng.uniform(0.8, 1.4)) for _ in range(rng.randint(1, 6))]
        back = [(x, rng.uniform(0.8, 1.4)) for x, _ in points[: rng.randint(0, len(points))]]
        curve = fit_held_curve(points, back)
        grid = [held_factor(curve, x * MB / 4) for x in range(-4, 400)]
        assert all(f >= 1 and b >= 1 for f, b in grid)
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(grid, grid[1:], strict=False))
    with pytest.raises(ConfigError, match="no stage held more than in the 1F1B run"):
        fit_held_curve([(0.0, 1.2), (-3.0, 1.1)], [])


@pytest.mark.parametrize(("knots", "message"), [
    ([(MB, 1.1)], r"held_curve entry \(1048576, 1.1\); give \[bytes beyond"),
    ([(0, 1.1, 1.0)], r"held_curve bytes = 0.0; give a finite number > 0"),
    ([(MB, 0.9, 1.0)], r"held_curve F factor = 0.9 at 1048576 bytes; give a finite number >= 1"),
    ([(2 * MB, 1.1, 1.0), (MB, 1.2, 1.0)], r"held_curve bytes \[2097152.0, 1048576.0\]; give each once, in "
                                          "increasing order"),
    ([(MB, 1.2, 1.1), (2 * MB, 1.1, 1.1)], r"held_curve factors .*; give factors that do not fall"),
])
def test_a_bad_curve_is_refused_with_the_field_and_the_fix(knots, message):
    with pytest.raises(ConfigError, match=message):
        check_held_curve(knots)
    with pytest.raises(ConfigError, match=message):
        four_layer_costs(held_curve=tuple(knots))


def test_bad_layer_references_are_refused_and_costs_without_the_new_fields_load_as_before():
    with pytest.raises(ConfigError, match=r"held_reference_layer_bytes = \(1.0, 2.0\); give one finite "
                                          r"number >= 0 per layer \(4\)"):
        four_layer_costs(held_reference_layer_bytes=(1.0, 2.0))
    with pytest.raises(ConfigError, match="model costs held_curve = 3; give a list"):
        ModelCosts.from_json({**four_layer_costs().to_json(), "held_curve": 3})
    # A costs file of an earlier calibration (a slope, one reference, no curve): priced by the line.
    old = four_layer_costs(held_forward_per_byte=0.004 / MB, held_backward_per_byte=0.001 / MB,
                           held_reference_bytes=3 * MB)
    data = old.to_json()
    del data["held_curve"], data["held_reference_layer_bytes"]
    loaded = ModelCosts.from_json(data)
    assert loaded == old
    assert stage_held_factors(loaded, (0, 2, 4), (0, 1), (10 * MB, 2 * MB)) == (
        (1 + 0.004 * 7, 1 + 0.001 * 7), (1.0, 1.0))


def test_each_layer_is_priced_against_the_bytes_its_own_calibration_rank_held():
    # Layers 0-1 measured on a rank holding 16 MB, layers 2-3 on one holding 9 MB.
    curve = ((8 * MB, 1.08, 1.04), (48 * MB, 1.16, 1.08))
    costs = four_layer_costs(held_curve=curve, held_reference_layer_bytes=(16 * MB,) * 2 + (9 * MB,) * 2,
                   held_reference_bytes=16 * MB)
    # Rank 1 holding 17 MB: 8 MB beyond its layers' 9 (+8% F), where the most any rank held (16)
    # would leave it +1 MB (+1%).
    factors = stage_held_factors(costs, (0, 2, 4), (0, 1), (16 * MB, 17 * MB))
    assert factors[0] == (1.0, 1.0) and factors[1] == pytest.approx((1.08, 1.04))
    one = replace(costs, held_reference_layer_bytes=())
    assert stage_held_factors(one, (0, 2, 4), (0, 1), (16 * MB, 17 * MB))[1][0] == pytest.approx(1.01)
    # A stage of layers from both calibration ranks: its layers' factors weighted by their time.
    layers = list(costs.layers)
    layers[1] = replace(layers[1], forward_s=0.03)
    mixed = replace(costs, layers=tuple(layers))
    (forward, _), = stage_held_factors(mixed, (1, 3), (0,), (17 * MB,))
    assert forward == pytest.approx((0.03 * 1.01 + 0.01 * 1.08) / 0.04)
    # The rank's extra in the plan's lines: over its layers together.
    extra = held_extra(costs, (16 * MB, 17 * MB), (0, 1), (0, 2, 4))
    assert extra[0] == (0.0, 0.0) and extra[1] == pytest.approx((0.08, 0.04))


def _run(f, b, i=None, w=None, action_overhead=50e-6):
    return CostModel.from_lists(list(f), list(i or [x / 2 for x in b]), list(w or [x / 2 for x in b]),
                                b=list(b), action_overhead=action_overhead, step_overhead=0.01,
                                link=Link(latency=2e-4))


def test_the_split_blocks_drift_is_taken_from_the_ranks_that_held_no_more_there():
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    base, zb, gpipe = (order_held_bytes(profile, bounds, rows, family, 2, 8)
                       for family in ("1f1b", "zb-h1", "gpipe"))
    assert zb[0] <= base[0] and zb[1] > base[1]  # on 2 ranks zb-h1's last rank holds more, its first not
    measured = stage_cost_model(replace(profile, split_backward_share=0.1), StageLayout(bounds, rows), (),
                                Link())
    run = _run(measured.f, measured.b)
    # The truth: F 1.08x and B 1.04x on zb-h1's last rank (its excess), GPipe F 1.13x, B 1.065x; the
    # host 10% slower during the whole split block.
    load, held_f, held_b = 1.1, (1.0, 1.08), (1.0, 1.04)
    split = _run([t * load * k for t, k in zip(measured.f, held_f, strict=True)], measured.b,
                 [t * load * k for t, k in zip(measured.i, held_b, strict=True)],
                 [t * load * k for t, k in zip(measured.w, held_b, strict=True)],
                 action_overhead=50e-6 * load)
    block = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.b])
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split,
                                        held=HeldBlock(block, base, gpipe, zb))
    assert calibration.split_drift == pytest.approx(1 / load)
    # zb-h1's last rank gives the curve's first point, its load out: F 1.08 at its excess.
    assert held_factor(priced.held_curve, zb[1] - base[1]) == pytest.approx((1.08, 1.04))
    # Its held B slowdown priced by the curve, not in the split's own seconds: recovered exactly.
    assert priced.split_backward_share == pytest.approx(0.1)
    # The run's zb-h1 is priced as its block measured it (the load out): F, I and W per stage.
    model = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    slowed = with_held_cost(model, priced, (0, 1), zb, bounds)
    for kind in ("f", "i", "w"):
        assert getattr(slowed, kind) == pytest.approx([t / load for t in getattr(split, kind)])
    # Taken per stage, as before, the last rank's held slowdown left its I and W (priced 1.04x low).
    per_stage, _ = at_run_prices(profile, run, bounds, rows, split=split)
    assert per_stage.split_backward_share < 0.1 - 0.02 / 2  # its work: its B (no seconds per layer)


def test_a_priced_step_is_never_below_the_unslowed_one():
    # The search's lower bounds are taken on the unslowed costs: every factor >= 1 keeps them valid.
    curve = fit_held_curve([(0.5 * MB, 1.3), (2 * MB, 1.2), (6 * MB, 1.5)], [(6 * MB, 1.2)])
    costs = four_layer_costs(held_curve=curve, held_reference_layer_bytes=(3 * MB, 3 * MB, 1 * MB, 1 * MB))
    plain = four_layer_costs()
    count = 0
    for family in ("1f1b", "gpipe", "zb-h1", "zb-h2", "interleaved-1f1b"):
        for m in (2, 4, 8):
            virtual = 2 if family == "interleaved-1f1b" else 1
            bounds = (0, 1, 2, 3, 4) if virtual == 2 else (0, 2, 4)
            config = Config(family, virtual, m, 1)
            slowed = evaluate(costs, config, 2, bounds, (), Link())
            base = evaluate(plain, config, 2, bounds, (), Link())
            assert slowed.step_time >= base.step_time
            count += slowed.step_time > base.step_time
    assert count > 0  # the curve priced something
    options = PlanOptions(num_ranks=2, global_batch=8, max_virtual=2, order_search_s=0.0)
    assert plan(costs, options).choice.step_time >= plan(plain, options).choice.step_time


def _split_block(measured, run, load, split_on, forward_after_w=1.0):
    """A "1f1b+split" block as the runtime measures it: its first stage's I and W run as one B
    (fused: the halves of B), the others' I and W apart at the split's price; every time `load`x;
    a split stage's F `forward_after_w`x (an F after a W, not after a B)."""
    f = [t * load * (forward_after_w if stage in split_on else 1.0) for stage, t in enumerate(measured.f)]
    i = [t * load if stage in split_on else run.b[stage] * load / 2 for stage, t in enumerate(measured.i)]
    w = [t * load if stage in split_on else run.b[stage] * load / 2 for stage, t in enumerate(measured.w)]
    b = [t if stage in split_on else t * load for stage, t in enumerate(run.b)]  # the fused B at the load too
    return _run(f, b, i, w, action_overhead=50e-6 * load)


def test_the_split_blocks_drift_is_taken_from_the_stages_that_ran_1f1bs_actions_there():
    # "1f1b+split" holds 1F1B's bytes on every rank, but its split stage runs each F after a W,
    # 20% slower on this host: that is not the host's load, and divided out of its I and W it
    # would price the split's seconds low. The drift comes from the fused first stage alone.
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    base, split_bytes, gpipe = (order_held_bytes(profile, bounds, rows, family, 2, 8)
                                for family in ("1f1b", "1f1b+split", "gpipe"))
    assert split_bytes == base  # the split in place holds what 1F1B holds
    truth = replace(profile, split_backward_share=0.1)
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)
    load = 1.1
    split = _split_block(measured, run, load, {1}, forward_after_w=1.2)
    block = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.b])
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1],
                                        held=HeldBlock(block, base, gpipe, split_bytes))
    assert calibration.split_drift == pytest.approx(1 / load)
    assert priced.split_backward_share == pytest.approx(0.1)
    model = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    assert model.i[1] == pytest.approx(measured.i[1]) and model.w[1] == pytest.approx(measured.w[1])
    # Its ranks held no more: no points of its own on the curve (GPipe's alone here).
    gpipe_excess = sorted({float(g - b) for g, b in zip(gpipe, base, strict=True)})
    assert [knot[0] for knot in priced.held_curve] == gpipe_excess
    # Where every stage ran I and W apart, its ranks that held no more give the drift, as before.
    both = _split_block(measured, run, load, {0, 1})
    _, every = at_run_prices(profile, run, bounds, rows, split=both,
                             held=HeldBlock(block, base, gpipe, split_bytes))
    assert every.split_drift == pytest.approx(1 / load)


def test_the_curve_block_gives_the_small_excess_points_and_the_split_block_the_splits_seconds():
    profile = four_layer_costs()
    bounds, rows = (0, 2, 4), 1
    base, split_bytes, zb, gpipe = (order_held_bytes(profile, bounds, rows, family, 2, 8)
                                    for family in ("1f1b", "1f1b+split", "zb-h1", "gpipe"))
    assert zb[0] <= base[0] and zb[1] > base[1]
    truth = replace(profile, split_backward_share=0.1)
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)
    # The curve block (zb-h1): F 1.08x on its last rank (its excess), the host 5% slower during it;
    # its I and W carry whatever they carry, unused. The split block: 1F1B's bytes, the host 10% slower.
    curve_load = 1.05
    # (Its first stage's B, 1F1B's own there, at the load too.)
    curve = _run([t * curve_load * k for t, k in zip(measured.f, (1.0, 1.08), strict=True)],
                 [t * curve_load for t in measured.b], [t * 2.0 for t in measured.i],
                 [t * 2.0 for t in measured.w])
    split = _split_block(measured, run, 1.1, {1}, forward_after_w=1.2)
    block = _run([t * 1.13 for t in run.f], [t * 1.065 for t in run.b])
    held = HeldBlock(block, base, gpipe, split_bytes, curve, zb)
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split, split_stages=[1], held=held)
    assert calibration.curve_drift == pytest.approx(1 / curve_load)
    assert calibration.held_curve_block_bytes == zb
    assert held_factor(priced.held_curve, zb[1] - base[1])[0] == pytest.approx(1.08)
    # The split's seconds are the split's own: no held factor divided out of them (its bytes are
    # 1F1B's), none of zb-h1's slowdown left in them.
    assert priced.split_backward_share == pytest.approx(0.1)
    model = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    assert model.i[1] == pytest.approx(measured.i[1]) and model.w[1] == pytest.approx(measured.w[1])
    # A curve block of other stages or peaks is refused, naming the fix.
    with pytest.raises(ConfigError, match="the curve block measured 1 stages"):
        at_run_prices(profile, run, bounds, rows, held=replace(held, curve=_run([1.0], [1.0])))
    with pytest.raises(ConfigError, match="HeldBlock.curve_bytes has 1 peaks"):
        at_run_prices(profile, run, bounds, rows, held=replace(held, curve_bytes=zb[:1]))
