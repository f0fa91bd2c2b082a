"""The price of a micro-batch size between the sizes a calibration run measured (pure logic, one
process): `pipefold.plan.row_scales` and `pipefold.plan.calibrate.measured_row_scales`."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.calibrate import at_run_prices, measured_row_scales
from pipefold.plan.row_scales import check_row_scales, row_scale
from pipefold.plan.stages import StageLayout, stage_arrays, stage_cost_model
from pipefold.simulate import CostModel, Link

SCALES = ((1, 1.3, 1.2), (2, 1.1, 1.0), (4, 1.0, 1.0), (16, 1.2, 1.1))


def test_row_scale_interpolates_between_measured_sizes_and_holds_outside():
    assert row_scale(SCALES, 1) == (1.3, 1.2) and row_scale(SCALES, 4) == (1.0, 1.0)
    assert row_scale(SCALES, 3) == pytest.approx((1.05, 1.0))  # halfway between 2 and 4 rows
    assert row_scale(SCALES, 10) == pytest.approx((1.1, 1.05))
    assert row_scale(SCALES, 64) == (1.2, 1.1)  # beyond the largest: its scale
    assert row_scale((), 3) == (1.0, 1.0)  # none measured: the line alone


@pytest.mark.parametrize(("scales", "message"), [
    (((0, 1.0, 1.0),), "rows = 0; give the micro-batch's rows, an integer >= 1"),
    (((2, 1.0, 1.0), (1, 1.0, 1.0)), r"rows \[2, 1\]; give each size once, in increasing order"),
    (((2, 1.0, 1.0), (2, 1.1, 1.0)), r"rows \[2, 2\]"),
    (((1, 0.0, 1.0),), "F scale = 0.0 at 1 rows; give a positive number"),
    (((1, 1.0, float("nan")),), "B scale = nan at 1 rows"),
    (((1, 1.0),), r"entry \(1, 1.0\); give \[rows, F scale, B scale\]"),
    ((3,), "entry 3; give"),
])
def test_check_row_scales_refuses_bad_entries(scales, message):
    with pytest.raises(ConfigError, match=message):
        check_row_scales(scales)


def _costs(**options):
    layers = tuple(replace(LayerCost(forward_s=f, backward_s=2 * f, activation_bytes=10, output_bytes=10,
                                     parameter_bytes=100, weight_grad_s=f), fixed_s=0.05)
                   for f in (1.0, 2.0, 1.0))
    return ModelCosts(layers=layers, reference_rows=2, **options)


def test_row_scales_multiply_a_stages_times_and_round_trip_through_json():
    plain, scaled = _costs(), _costs(row_scales=SCALES)
    for rows, (f_scale, b_scale) in ((1, (1.3, 1.2)), (3, (1.05, 1.0))):
        layout = StageLayout((0, 1, 3), rows)
        before, after = stage_arrays(plain, layout, ()), stage_arrays(scaled, layout, ())
        assert after.f == pytest.approx(before.f * f_scale) and after.b == pytest.approx(before.b * b_scale)
        assert after.w == pytest.approx(before.w * b_scale)
    assert ModelCosts.from_json(scaled.to_json()) == scaled
    data = scaled.to_json()
    data["row_scales"] = [[1, -1.0, 1.0]]
    with pytest.raises(ConfigError, match="F scale = -1.0 at 1 rows"):
        ModelCosts.from_json(data)
    data["row_scales"] = 5
    with pytest.raises(ConfigError, match="row_scales = 5; give a list of"):
        ModelCosts.from_json(data)


def _run(f, b):
    return CostModel.from_lists(list(f), [x / 2 for x in b], [x / 2 for x in b], b=list(b),
                                action_overhead=50e-6, step_overhead=0.01, link=Link(latency=2e-4))


def test_at_run_prices_passes_through_sizes_a_line_misses():
    # A stage's time is a line over rows except at 1 and 2 rows, where it is 30% and 10% above (a
    # CPU host's per call costs): a line fitted from 1 to 16 rows misses them; the price does not.
    profile = _costs()
    bounds = (0, 1, 3)
    above = {1: 1.3, 2: 1.1}

    def measured(rows):
        model = stage_cost_model(profile, StageLayout(bounds, rows), (), Link())
        k = above.get(rows, 1.0)
        return _run([x * k for x in model.f], [x * k for x in model.b])

    sizes = (4, 8, 16, 2, 1)
    others = [(measured(r), r) for r in sizes[1:]]
    priced, calibration = at_run_prices(profile, measured(4), bounds, 4, others)
    assert calibration.fit_error > 0.05  # one line does not fit 1 to 16 rows
    assert [entry[0] for entry in priced.row_scales] == [1, 2, 4, 8, 16]
    line = replace(priced, row_scales=())

    def largest_miss(costs):
        misses = []
        for rows in (1, 2, 4, 8, 16):
            now, true = stage_cost_model(costs, StageLayout(bounds, rows), (), Link()), measured(rows)
            misses += [abs(a / b - 1) for a, b in zip(now.f + now.b, true.f + true.b, strict=True)]
        return max(misses)

    # Every measured size priced as measured (the stages' mean scale), where the line alone misses.
    assert largest_miss(priced) < 0.03 and largest_miss(line) > 0.05
    # Between 2 and 4 rows, the price lies between the line's and the measured neighbours' ratio.
    at_three = stage_arrays(priced, StageLayout(bounds, 3), ())
    plain_three = stage_arrays(line, StageLayout(bounds, 3), ())
    assert (at_three.f / plain_three.f) == pytest.approx(
        [row_scale(priced.row_scales, 3)[0]] * 2)
    assert priced.row_scales[1][1] > row_scale(priced.row_scales, 3)[0] > priced.row_scales[2][1] * 0.999


def test_measured_row_scales_are_one_where_the_line_fits():
    profile = _costs()
    bounds = (0, 1, 3)
    lines = {r: stage_cost_model(profile, StageLayout(bounds, r), (), Link()) for r in (4, 1, 8)}
    points = [(_run(model.f, model.b), r) for r, model in lines.items()]
    scales = measured_row_scales(profile, points, bounds)
    assert [entry[0] for entry in scales] == [1, 4, 8]
    assert [value for entry in scales for value in entry[1:]] == pytest.approx([1.0] * 6)
