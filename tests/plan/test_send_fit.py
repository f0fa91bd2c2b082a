"""The runtime's time per action and a send's occupancy of its sender, fitted from a calibration
run's gaps (pipefold.plan.send_fit, pipefold.runtime.send_gaps) and priced by the planner only
where fitted; pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.calibrate import at_run_prices
from pipefold.plan.evaluate import evaluate
from pipefold.plan.send_fit import SendGaps, fit_send_costs
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.runtime.send_gaps import measured_send_gaps
from pipefold.schedule import build
from pipefold.simulate import CostModel, Link, simulate

KEPT = 40e-6
FIXED = 50e-6
PER_BYTE = 3e-10  # ~315 us per MiB


def _costs() -> ModelCosts:
    layer = LayerCost(forward_s=1e-3, backward_s=2e-3, activation_bytes=1000, output_bytes=2**16,
                      parameter_bytes=4000, weight_grad_s=1e-3)
    return ModelCosts(layers=(layer,) * 4, reference_rows=1, action_overhead_s=7e-6)


def _measured_gaps(message_bytes: int, name: str = "1f1b") -> SendGaps:
    """What the calibration records for a block run by a runtime whose sends cost what the
    simulator is told: the simulated timeline's gaps."""
    schedule = build(name, num_ranks=2, num_microbatches=8)
    model = CostModel.uniform(schedule.num_stages, f=1e-3, i=1e-3, w=1e-3, message_bytes=message_bytes,
                              action_overhead=KEPT)
    model = replace(model, send_overhead=FIXED, send_seconds_per_byte=PER_BYTE)
    return SendGaps.from_json(measured_send_gaps([simulate(schedule, model)], schedule))


def test_fit_recovers_known_costs_from_simulated_timelines():
    sizes = (2**16, 2**17, 2**18, 2**19)
    fit = fit_send_costs([(_measured_gaps(size), size) for size in sizes])
    assert fit is not None
    assert fit.action_overhead_s == pytest.approx(KEPT)
    assert fit.send_overhead_s == pytest.approx(FIXED)
    assert fit.send_s_per_byte == pytest.approx(PER_BYTE)
    # 1F1B on 2 ranks: every other action sends (rank 0's F, rank 1's B).
    gaps = _measured_gaps(2**18)
    assert gaps.num_sent and gaps.num_kept
    assert gaps.sent_s == pytest.approx(KEPT + FIXED + PER_BYTE * 2**18)


def test_fit_of_one_size_or_a_falling_line_prices_no_bytes():
    one = fit_send_costs([(SendGaps(150e-6, 40e-6, 10, 10), 2**18)])
    assert one is not None and one.send_overhead_s == pytest.approx(110e-6) and one.send_s_per_byte == 0.0
    falling = fit_send_costs([(SendGaps(150e-6, 40e-6, 10, 10), 2**16),
                              (SendGaps(100e-6, 40e-6, 10, 10), 2**18)])
    assert falling is not None and falling.send_s_per_byte == 0.0
    assert falling.send_overhead_s == pytest.approx(85e-6)
    # A line through the points would cross zero below them: through zero instead.
    steep = fit_send_costs([(SendGaps(40e-6 + 10e-6, 40e-6, 10, 10), 2**16),
                            (SendGaps(40e-6 + 100e-6, 40e-6, 10, 10), 2**18)])
    assert steep is not None and steep.send_overhead_s == 0.0 and steep.send_s_per_byte > 0
    # One rank: nothing crossed.
    assert fit_send_costs([(SendGaps(0.0, 40e-6, 0, 10), 2**18)]) is None
    with pytest.raises(ConfigError, match="num_sent"):
        SendGaps.from_json({"sent_s": 1e-4, "kept_s": 4e-5, "num_kept": 3})


def test_at_run_prices_takes_the_sends_apart_from_the_time_per_action():
    costs = _costs()
    bounds, sizes = (0, 2, 4), (4, 2)
    points = [stage_cost_model(costs, StageLayout(bounds, rows), (), Link()) for rows in sizes]
    runs = [replace(point, action_overhead=90e-6) for point in points]
    gaps = [_measured_gaps(point.message_bytes[0]) for point in points]
    priced, calibration = at_run_prices(costs, runs[0], bounds, sizes[0], [(runs[1], sizes[1])],
                                        send_gaps=gaps)
    assert priced.action_overhead_s == pytest.approx(KEPT)
    assert priced.send_overhead_s == pytest.approx(FIXED)
    assert priced.send_s_per_byte == pytest.approx(PER_BYTE)
    assert calibration.mean_gap_s == pytest.approx(90e-6) and len(calibration.send_points) == 2
    model = stage_cost_model(priced, StageLayout(bounds, 8), (), Link())
    assert model.send_time(0) == pytest.approx(FIXED + PER_BYTE * model.message_bytes[0])
    # Without the gaps: the run's mean gap for every action, nothing for a send (as before).
    plain, plain_calibration = at_run_prices(costs, runs[0], bounds, sizes[0], [(runs[1], sizes[1])])
    assert plain.action_overhead_s == pytest.approx(90e-6) and plain.send_overhead_s == 0.0
    assert plain_calibration.mean_gap_s == 0.0
    with pytest.raises(ConfigError, match="send gaps"):
        at_run_prices(costs, runs[0], bounds, sizes[0], [(runs[1], sizes[1])], send_gaps=gaps[:1])


def test_old_cost_files_price_as_before_and_priced_sends_cost_the_crossing_orders_more():
    costs = _costs()
    data = costs.to_json()
    assert "send_overhead_s" not in data and "send_s_per_byte" not in data  # written as before
    again = ModelCosts.from_json(data)
    assert again == costs and again.send_overhead_s == 0.0 and again.send_s_per_byte == 0.0
    priced = replace(costs, send_overhead_s=FIXED, send_s_per_byte=PER_BYTE)
    assert ModelCosts.from_json(priced.to_json()) == priced
    with pytest.raises(ConfigError, match="send_s_per_byte"):
        replace(costs, send_s_per_byte=-1.0)
    bounds = (0, 1, 2, 3, 4)
    for family in ("interleaved-1f1b", "zb-v"):
        config = Config(family, 2, 8, 1)
        before = evaluate(costs, config, 2, bounds, (), Link()).step_time
        assert evaluate(again, config, 2, bounds, (), Link()).step_time == before
        # Each rank sends 16-24 messages a step, each costing its sender FIXED + PER_BYTE x 64 KiB.
        after = evaluate(priced, config, 2, bounds, (), Link()).step_time
        assert after > before
