"""The pricing terms beyond the layers' measured time: fixed cost per call, runtime per action,
the optimizer update (pipefold.plan.calibrate); pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
from pipefold.plan.calibrate import (
    at_run_prices,
    first_stage_backward,
    fixed_seconds,
    update_time,
    with_fixed_costs,
)
from pipefold.plan.evaluate import evaluate
from pipefold.plan.space import Config
from pipefold.plan.stage_line import fit_stage_line
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link, simulate


def _layer(forward, backward, weight=None, parameter_bytes=100):
    return LayerCost(forward_s=forward, backward_s=backward, activation_bytes=10, output_bytes=10,
                     parameter_bytes=parameter_bytes, weight_grad_s=weight)


def _line(fixed_f, per_row_f, fixed_b, per_row_b, rows):
    return _layer(fixed_f + per_row_f * rows, fixed_b + per_row_b * rows)


def test_fixed_seconds_is_the_mean_intercept_of_f_and_b():
    # F = 0.3 + 0.5 r, B = 0.5 + 1.0 r: intercepts 0.3 and 0.5.
    fixed = fixed_seconds(_line(0.3, 0.5, 0.5, 1.0, 4), 4, _line(0.3, 0.5, 0.5, 1.0, 1), 1)
    assert fixed == pytest.approx(0.4)


def test_fixed_seconds_is_kept_within_zero_and_the_smaller_action():
    # Time that grows faster than the rows (noise) gives a negative intercept: no fixed part.
    assert fixed_seconds(_layer(4.0, 8.0), 4, _layer(0.5, 1.0), 1) == 0.0
    # All fixed and more: at most the smaller of F and B, so no share per row goes negative.
    assert fixed_seconds(_layer(1.0, 2.0), 4, _layer(1.2, 2.5), 2) == pytest.approx(1.0)
    # A layer without a backward has nothing a B could carry: no fixed part.
    assert fixed_seconds(_layer(1.0, 0.0), 4, _layer(0.5, 0.0), 1) == 0.0
    with pytest.raises(ConfigError, match="two different row counts"):
        fixed_seconds(_layer(1.0, 2.0), 4, _layer(1.0, 2.0), 4)


def test_with_fixed_costs_reproduces_both_measurements_f_plus_b():
    at_4 = ModelCosts(layers=(_line(0.3, 0.5, 0.5, 1.0, 4), _line(0.0, 0.1, 0.0, 0.2, 4)), reference_rows=4)
    at_1 = ModelCosts(layers=(_line(0.3, 0.5, 0.5, 1.0, 1), _line(0.0, 0.1, 0.0, 0.2, 1)), reference_rows=1)
    fitted = with_fixed_costs(at_4, at_1)
    assert [layer.fixed_s for layer in fitted.layers] == pytest.approx([0.4, 0.0])
    for rows, measured in ((4, at_4), (1, at_1)):
        model = stage_cost_model(fitted, StageLayout((0, 1, 2), rows), (), Link())
        for stage, layer in enumerate(measured.layers):
            assert model.f[stage] + model.b[stage] == pytest.approx(layer.forward_s + layer.backward_s)
    # Without the fit, one-row micro-batches cost a quarter of four-row ones: too cheap.
    plain = stage_cost_model(at_4, StageLayout((0, 1, 2), 1), (), Link())
    assert plain.f[0] + plain.b[0] < at_1.layers[0].forward_s + at_1.layers[0].backward_s
    assert "fitted against 1 row" in fitted.source


def test_with_fixed_costs_keeps_w_share_of_what_scales():
    at_2 = ModelCosts(layers=(_layer(1.0, 2.0, weight=1.0),), reference_rows=2)
    at_1 = ModelCosts(layers=(_layer(0.6, 1.2, weight=0.6),), reference_rows=1)
    fitted = with_fixed_costs(at_2, at_1).layers[0]
    assert fitted.fixed_s == pytest.approx(0.3)
    assert fitted.backward_s == pytest.approx(1.7)
    assert fitted.weight_grad_s == pytest.approx(1.0 * 1.7 / 2.0)
    with pytest.raises(ConfigError, match="same model"):
        with_fixed_costs(at_2, ModelCosts(layers=(_layer(1, 1),) * 2))


def test_costs_with_overheads_round_trip_and_refuse_negative():
    costs = ModelCosts(layers=(_layer(1, 2),), action_overhead_s=0.01, update_s_per_parameter_byte=1e-9)
    assert ModelCosts.from_json(costs.to_json()) == costs
    with pytest.raises(ConfigError, match="action_overhead_s"):
        ModelCosts(layers=(_layer(1, 2),), action_overhead_s=-1.0)


def test_action_overhead_reaches_the_simulator():
    costs = ModelCosts(layers=(_layer(1.0, 2.0),) * 4)
    layout = StageLayout((0, 2, 4), 1)
    model = stage_cost_model(replace(costs, action_overhead_s=0.5), layout, (), Link())
    assert model.action_overhead == 0.5
    from pipefold.schedule import build

    schedule = build("gpipe", num_ranks=2, num_microbatches=4)
    plain = simulate(schedule, stage_cost_model(costs, layout, (), Link())).makespan
    # Every action but a rank's first waits 0.5 more: the critical path grows by that.
    assert simulate(schedule, model).makespan >= plain + 0.5 * 7


def test_update_time_prices_the_rank_holding_the_most_parameter_bytes():
    costs = ModelCosts(layers=(_layer(1, 2),), update_s_per_parameter_byte=0.001)
    assert update_time(costs, [100, 300]) == pytest.approx(0.3)
    assert update_time(costs, []) == 0.0
    config = Config("1f1b", 1, 4, 1)
    layers = (_layer(1.0, 2.0, parameter_bytes=100),) * 3 + (_layer(1.0, 2.0, parameter_bytes=500),)
    base = ModelCosts(layers=layers)
    without = evaluate(base, config, 2, (0, 2, 4), (), Link())
    priced = evaluate(replace(base, update_s_per_parameter_byte=0.001), config, 2, (0, 2, 4), (), Link())
    assert priced.step_time == pytest.approx(without.step_time + 0.6)  # rank 1: 100 + 500 bytes


def test_per_action_overhead_moves_the_plan_to_fewer_microbatches():
    # With a runtime cost per action, many one-row micro-batches no longer win.
    costs = ModelCosts(layers=(_layer(0.01, 0.02),) * 4, reference_rows=1)
    options = PlanOptions(num_ranks=2, global_batch=16, schedules=("1f1b",))
    free = plan(costs, options).choice
    priced = plan(replace(costs, action_overhead_s=0.05), options).choice
    assert priced.num_microbatches < free.num_microbatches


def _token_model(**options):
    # Four layers, F 1 / I 1.5 / W 0.5 each, and a fixed second per call on the first two.
    layers = tuple(replace(_layer(1.0, 2.0, weight=0.5), fixed_s=0.25 if index < 2 else 0.0)
                   for index in range(4))
    return ModelCosts(layers=layers, reference_rows=2, **options)


def test_first_stage_backward_moves_its_input_half_into_w_for_token_ids():
    ids = _token_model(input_requires_grad=False)
    layout = StageLayout((0, 2, 4), rows=4)  # 2x the reference rows
    plain = stage_cost_model(ids, layout, (), Link())
    moved = first_stage_backward(plain, ids, layout.bounds)
    # Stage 0: I keeps the layers' fixed seconds (0.5), W gets the 2 layers x 1.5 x 2 = 6 s of I.
    assert moved.i[0] == pytest.approx(0.5)
    assert moved.w[0] == pytest.approx(plain.w[0] + 6.0)
    assert moved.b == plain.b and moved.f == plain.f
    # Later stages take their input's gradient: unchanged.
    assert moved.i[1:] == plain.i[1:] and moved.w[1:] == plain.w[1:]
    # A recomputed first stage keeps the forward it reruns in I.
    recomputed = stage_cost_model(ids, layout, (0,), Link())
    again = first_stage_backward(recomputed, ids, layout.bounds)
    assert again.i[0] == pytest.approx(0.5 + recomputed.f[0])
    assert again.b == recomputed.b


def test_first_stage_backward_leaves_a_float_input_and_round_trips():
    floats = _token_model()
    layout = StageLayout((0, 2, 4), rows=2)
    plain = stage_cost_model(floats, layout, (), Link())
    assert first_stage_backward(plain, floats, layout.bounds) is plain
    ids = _token_model(input_requires_grad=False)
    assert ModelCosts.from_json(ids.to_json()) == ids
    with pytest.raises(ConfigError, match="input_requires_grad"):
        _token_model(input_requires_grad="no")


def test_first_stage_backward_prices_the_planners_searched_orders():
    # Family orders put the first stage's backward last on its rank (moving work between its
    # I and W changes nothing there); a searched order may interleave other stages' work after
    # that I, so the order search and its prediction must see the I the runtime runs.
    ids = _token_model(input_requires_grad=False)
    result = plan(ids, PlanOptions(num_ranks=2, global_batch=8, max_virtual=2, order_search_s=0.15,
                                    order_search_total_s=0.6))  # room for a loaded host
    searched = [c for c in result.top if c.order is not None]
    assert searched, "the planner searched no order on the toy model"
    for candidate in searched:
        layout = StageLayout(candidate.bounds, candidate.microbatch_rows)
        model = first_stage_backward(stage_cost_model(ids, layout, candidate.recompute, Link()), ids,
                                     candidate.bounds)
        assert candidate.step_time == pytest.approx(simulate(candidate.order, model).makespan)


def _run(f, b, action_overhead=50e-6, step_overhead=0.01):
    return CostModel.from_lists(list(f), [x / 2 for x in b], [x / 2 for x in b], b=list(b),
                                action_overhead=action_overhead, step_overhead=step_overhead,
                                link=Link(latency=2e-4))


def _costs_with_fixed():
    layers = (
        replace(_layer(1.0, 2.0, weight=1.5, parameter_bytes=300), fixed_s=0.1),
        replace(_layer(2.0, 3.0, weight=1.0, parameter_bytes=100), fixed_s=0.2),
        replace(_layer(1.0, 1.0, weight=0.5, parameter_bytes=100), fixed_s=0.0),
    )
    return ModelCosts(layers=layers, reference_rows=2, action_overhead_s=7e-6,
                      update_s_per_parameter_byte=1e-9)


def test_at_run_prices_reproduces_the_runs_stage_costs_at_its_layout():
    costs = _costs_with_fixed()
    bounds, rows = (0, 1, 3), 4
    before = stage_cost_model(costs, StageLayout(bounds, rows), (), Link())
    run = _run([before.f[0] * 1.3, before.f[1] * 0.8], [before.b[0] * 1.1, before.b[1] * 0.7],
               action_overhead=60e-6, step_overhead=0.03)
    priced, calibration = at_run_prices(costs, run, bounds, rows)
    after = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    assert after.f == pytest.approx(run.f) and after.b == pytest.approx(run.b)
    assert calibration.forward_scale == pytest.approx((1.3, 0.8))
    assert calibration.backward_scale == pytest.approx((1.1, 0.7))
    # A layer keeps its W share of the backward; every layer of a stage gets the stage's scales.
    for old, new in zip(costs.layers, priced.layers, strict=True):
        assert new.weight_grad_s / new.backward_s == pytest.approx(old.weight_grad_s / old.backward_s)
    assert priced.layers[1].forward_s / costs.layers[1].forward_s == pytest.approx(
        priced.layers[2].forward_s / costs.layers[2].forward_s)
    # The runtime's own time per action and per step outside the actions replace the profile's:
    # the largest stage holds 300 parameter bytes, so the update prices 0.03 s there.
    assert priced.action_overhead_s == 60e-6 and calibration.action_overhead_s == 60e-6
    assert update_time(priced, [300, 200]) == pytest.approx(0.03)
    assert calibration.step_overhead_s == 0.03
    assert calibration.message_latency_s == 2e-4  # for the plan's link where none is given


def test_at_run_prices_carries_to_other_rows_and_partitions():
    costs = _costs_with_fixed()
    before = stage_cost_model(costs, StageLayout((0, 1, 3), 4), (), Link())
    run = _run([before.f[0] * 2.0, before.f[1] * 2.0], [before.b[0] * 2.0, before.b[1] * 2.0])
    priced, _ = at_run_prices(costs, run, (0, 1, 3), 4)
    # One scale for every stage: any partition and row count costs twice as much, fixed parts too.
    for bounds, rows in (((0, 2, 3), 1), ((0, 3), 8)):
        was = stage_cost_model(costs, StageLayout(bounds, rows), (), Link())
        now = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
        assert now.f == pytest.approx([2 * x for x in was.f])
        assert now.b == pytest.approx([2 * x for x in was.b])


def test_at_run_prices_refuses_a_run_of_another_partition():
    costs = _costs_with_fixed()
    with pytest.raises(ConfigError, match="the run measured 2 stages"):
        at_run_prices(costs, _run([1.0, 1.0], [1.0, 1.0]), (0, 3), 4)
    with pytest.raises(ConfigError, match="every layer"):
        at_run_prices(costs, _run([1.0, 1.0], [1.0, 1.0]), (0, 1, 2), 4)


def test_fit_stage_line_recovers_a_line_with_one_fixed_part():
    # F = 0.3 + 0.5 r and B = 0.3 + 1.0 r, measured at 4, 8 and 16 rows.
    line = fit_stage_line([(r, 0.3 + 0.5 * r, 0.3 + 1.0 * r) for r in (4, 8, 16)])
    assert (line.fixed_s, line.forward_s_per_row, line.backward_s_per_row) == pytest.approx((0.3, 0.5, 1.0))
    assert line.error == pytest.approx(0.0, abs=1e-9)
    # Two sizes are enough; F and B that disagree on the fixed part share the mean of theirs,
    # each missed by a few % at most.
    two = fit_stage_line([(4, 0.2 + 0.5 * 4, 0.4 + 1.0 * 4), (8, 0.2 + 0.5 * 8, 0.4 + 1.0 * 8)])
    assert 0.2 < two.fixed_s < 0.4 and 0 < two.error < 0.05


def test_fit_stage_line_keeps_the_fixed_part_within_bounds_and_needs_two_sizes():
    # Time that grows faster than the rows gives a negative intercept: no fixed part, all per row.
    line = fit_stage_line([(4, 1.0, 2.0), (8, 3.0, 6.0)])
    assert line.fixed_s == 0.0 and line.forward_s_per_row > 0 and line.backward_s_per_row > 0
    # Time that does not grow: at most 90% of the smallest action fixed, the rest per row.
    flat = fit_stage_line([(4, 1.0, 2.0), (8, 1.0, 2.0)])
    assert flat.fixed_s == pytest.approx(0.9) and flat.forward_s_per_row > 0
    with pytest.raises(ConfigError, match="two different row counts"):
        fit_stage_line([(4, 1.0, 2.0), (4, 1.1, 2.1)])


def _truth(costs, per_row):
    """`costs` with each layer's F and B per row times `per_row[layer]` (its fixed part twice)."""
    return replace(costs, layers=tuple(
        replace(layer, forward_s=layer.forward_s * k, backward_s=layer.backward_s * k,
                fixed_s=2 * layer.fixed_s, weight_grad_s=layer.weight_grad_s * k)
        for layer, k in zip(costs.layers, per_row, strict=True)))


def test_at_run_prices_at_several_sizes_prices_the_runs_growth_with_rows():
    # The run's layers grow 1.5x (stage 0) and 3x (stage 1) as fast with rows as the profile's,
    # their fixed parts twice the profile's: measured at 2, 4 and 8 rows on the partition (0, 1, 3).
    profile = _costs_with_fixed()
    truth = _truth(profile, (1.5, 3.0, 3.0))
    bounds = (0, 1, 3)

    def measured(rows):
        model = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
        return _run(model.f, model.b)

    priced, calibration = at_run_prices(profile, measured(2), bounds, 2, [(measured(r), r) for r in (4, 8)])
    assert calibration.measured_rows == (2, 4, 8) and calibration.fit_error == pytest.approx(0, abs=1e-9)
    assert calibration.fixed_s == pytest.approx((0.2, 0.4))
    # At the run's partition, any rows are priced as the run's layers cost (3 rows: not measured),
    # and so is a partition the run did not measure where a stage's layers shared their growth.
    for layout in (StageLayout(bounds, 3), StageLayout(bounds, 16), StageLayout((0, 1, 2, 3), 6)):
        now = stage_cost_model(priced, layout, (), Link())
        true = stage_cost_model(truth, layout, (), Link())
        assert now.f == pytest.approx(true.f) and now.b == pytest.approx(true.b)
        assert now.w == pytest.approx(true.w)  # each layer keeps its W share of B
    # One size: the profile's growth kept, only the level set at the measured rows.
    one, single = at_run_prices(profile, measured(2), bounds, 2)
    assert single.measured_rows == (2,) and single.fixed_s == ()
    at_8 = stage_cost_model(one, StageLayout(bounds, 8), (), Link())
    assert at_8.f[1] < 0.99 * stage_cost_model(truth, StageLayout(bounds, 8), (), Link()).f[1]


def test_at_run_prices_leaves_the_tied_exchange_out_of_the_update():
    # A tied embedding and head on two ranks: the run's time outside the actions holds their
    # gradient's exchange, which the plan adds apart; the update is the rest.
    layers = tuple(_layer(1.0, 2.0, weight=1.0, parameter_bytes=100) for _ in range(4))
    costs = ModelCosts(layers=layers, reference_rows=1, tied_layers=((0, 3),))
    bounds, rows, latency = (0, 2, 4), 1, 2e-4
    model = stage_cost_model(costs, StageLayout(bounds, rows), (), Link())
    run = _run(model.f, model.b, step_overhead=0.01)  # its link: 2e-4 s per message
    priced, calibration = at_run_prices(costs, run, bounds, rows)
    assert calibration.tied_exchange_s == pytest.approx(latency)  # one message each way, at once
    assert update_time(priced, [200, 200]) == pytest.approx(0.01 - latency)
    # The plan's step for the run's own configuration: its time outside the actions once.
    config, link = Config("1f1b", 1, 8, rows), Link(latency=latency)
    candidate = evaluate(priced, config, 2, bounds, (), link)
    bare = evaluate(replace(priced, update_s_per_parameter_byte=0.0), config, 2, bounds, (), link)
    assert candidate.tied_exchange_s == pytest.approx(latency)
    assert candidate.step_time - (bare.step_time - bare.tied_exchange_s) == pytest.approx(0.01)


def _split_truth(costs, weight_factor, split_backward_share, split_overhead_s=0.0):
    """`costs` with each layer's W share of B times `weight_factor[layer]` and the split's own
    share of the backward's work (and seconds per action)."""
    layers = tuple(replace(layer, weight_grad_s=min(layer.weight_s * k, layer.backward_s))
                   for layer, k in zip(costs.layers, weight_factor, strict=True))
    return replace(costs, layers=layers, split_backward_share=split_backward_share,
                   split_overhead_s=split_overhead_s)


def test_at_run_prices_prices_i_and_w_as_the_split_phase_measured_them():
    # The run's split backward: W takes 1.2x (stage 0) and 1.5x (stage 1) the profile's share of
    # B, and each I and W 6% of its stage's backward work beyond its part of B; its gap between
    # actions 20 us longer.
    profile = replace(_costs_with_fixed(), overhead_s=0.01)
    truth = _split_truth(profile, (1.2, 1.5, 1.5), 0.06)
    bounds, rows = (0, 1, 3), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)  # 1F1B: F and B only
    split = replace(measured, action_overhead=run.action_overhead + 20e-6)
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split)
    assert calibration.split_backward_share == pytest.approx(0.06)
    assert calibration.split_overhead_s == pytest.approx(1.5 * 20e-6)  # the gaps: seconds per action
    assert priced.split_overhead_s == calibration.split_overhead_s
    assert priced.split_backward_share == calibration.split_backward_share
    assert calibration.split_action_overhead_s == pytest.approx(70e-6)
    assert calibration.weight_share == pytest.approx(
        [sum(layer.weight_s for layer in truth.layers[start:stop]) / sum(
            layer.backward_s for layer in truth.layers[start:stop]) for start, stop in ((0, 1), (1, 3))])
    for layout in (StageLayout(bounds, rows), StageLayout(bounds, 8), StageLayout((0, 1, 2, 3), 1)):
        # The longer gap is priced with I and W: their actions' own seconds as measured.
        now = stage_cost_model(replace(priced, split_overhead_s=0.0), layout, (), Link())
        true = stage_cost_model(truth, layout, (), Link())
        # F and B as the 1F1B phase measured them; I and W as the split phase did, at any rows.
        assert now.f == pytest.approx(true.f) and now.b == pytest.approx(true.b)
        assert now.i == pytest.approx(true.i) and now.w == pytest.approx(true.w)
    # Without the split phase, I + W is priced at B's cost and W keeps the profile's share.
    plain, none = at_run_prices(profile, run, bounds, rows)
    assert plain.split_overhead_s == 0.0 and none.weight_share == () and none.split_overhead_s == 0.0
    assert plain.split_backward_share == 0.0 == none.split_backward_share
    model = stage_cost_model(plain, StageLayout(bounds, rows), (), Link())
    assert model.w[1] < 0.9 * measured.w[1]
    with pytest.raises(ConfigError, match="the split phase measured 1 stages"):
        at_run_prices(profile, run, bounds, rows, split=_run([1.0], [1.0]))


def test_at_run_prices_split_phase_of_a_first_stage_fed_token_ids():
    # Token ids: the first stage's I only enters and leaves; its W runs the whole backward.
    profile = replace(_costs_with_fixed(), input_requires_grad=False)
    truth = _split_truth(profile, (1.0, 1.5, 1.5), 0.04)
    bounds, rows = (0, 1, 3), 2
    layout = StageLayout(bounds, rows)
    measured = first_stage_backward(stage_cost_model(truth, layout, (), Link()), truth, bounds)
    run = _run(measured.f, measured.b)
    split = replace(measured, action_overhead=run.action_overhead)
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=split)
    assert calibration.split_backward_share == pytest.approx(0.04)
    now = first_stage_backward(stage_cost_model(priced, layout, (), Link()), priced, bounds)
    assert now.i == pytest.approx(measured.i) and now.w == pytest.approx(measured.w)
    assert now.b == pytest.approx(measured.b)
    # Its layers take the other stage's factor (1.5x W share), kept within their B.
    assert priced.layers[0].weight_grad_s == pytest.approx(min(1.5 * 1.5, 2.0))
    assert calibration.weight_share[0] == pytest.approx(1.0)


def test_at_run_prices_split_phase_prices_a_fused_stage_from_the_others():
    # The runtime ran stage 0's I and W as one B (nothing between them, no other rank waiting):
    # its measured I and W are B's halves and say nothing of the split; stage 1's are priced.
    profile = _costs_with_fixed()
    truth = _split_truth(profile, (1.5, 1.5, 1.5), 0.05)
    bounds, rows = (0, 1, 3), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)
    fused = replace(measured, i=(measured.b[0] / 2, measured.i[1]), w=(measured.b[0] / 2, measured.w[1]),
                    action_overhead=run.action_overhead)
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=fused, split_stages=[1])
    assert calibration.split_backward_share == pytest.approx(0.05)
    now = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    assert now.i == pytest.approx(measured.i) and now.w == pytest.approx(measured.w)
    # Measured on no stage: no split prices.
    plain, none = at_run_prices(profile, run, bounds, rows, split=fused, split_stages=[])
    assert plain.split_overhead_s == 0.0 and none.weight_share == ()


def test_at_run_prices_split_phase_takes_the_load_of_the_1f1b_block():
    # The host's load moved between the blocks: the split block's every time is 1.5x, its F too,
    # so its I and W are taken at the 1F1B block's level.
    profile = _costs_with_fixed()
    truth = _split_truth(profile, (1.2, 1.5, 1.5), 0.05)
    bounds, rows = (0, 1, 3), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    run = _run(measured.f, measured.b)
    slow = replace(measured, f=tuple(1.5 * x for x in measured.f), i=tuple(1.5 * x for x in measured.i),
                   w=tuple(1.5 * x for x in measured.w), b=tuple(1.5 * x for x in measured.b),
                   action_overhead=run.action_overhead * 1.5)
    priced, calibration = at_run_prices(profile, run, bounds, rows, split=slow)
    assert calibration.split_backward_share == pytest.approx(0.05)
    now = stage_cost_model(priced, StageLayout(bounds, rows), (), Link())
    assert now.i == pytest.approx(measured.i) and now.w == pytest.approx(measured.w)


def test_a_16_bit_runs_casts_are_in_its_measured_forwards_not_priced_again():
    costs = replace(_costs_with_fixed(), cast_s_per_parameter_byte=2e-10)
    bounds, rows = (0, 1, 3), 4
    before = stage_cost_model(costs, StageLayout(bounds, rows), (), Link())
    run = _run(before.f, before.b)
    priced, _ = at_run_prices(costs, run, bounds, rows)
    assert priced.cast_s_per_parameter_byte == 0.0
