"""The pricing terms beyond the layers' measured time: fixed cost per call, runtime per action,
the optimizer update (pipefold.plan.calibrate); pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
from pipefold.plan.calibrate import fixed_seconds, update_time, with_fixed_costs
from pipefold.plan.evaluate import evaluate
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import Link, simulate


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
