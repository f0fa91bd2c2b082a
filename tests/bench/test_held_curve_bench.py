"""benchmarks/held_curve.py's line through 1F1B's and GPipe's points (what a slope per byte prices)."""

import pytest

from benchmarks.held_curve import slope_prediction


def test_the_line_passes_through_both_measured_points_and_between_them():
    assert slope_prediction(9.0, 72.0, 1.24, 9.0) == pytest.approx(1.0)
    assert slope_prediction(9.0, 72.0, 1.24, 72.0) == pytest.approx(1.24)
    # zb-h2's last rank, 26 MiB: a quarter of GPipe's extra bytes, a quarter of its slowdown.
    assert slope_prediction(9.0, 72.0, 1.24, 26.0) == pytest.approx(1 + 0.24 * 17 / 63)


def test_no_slowdown_below_the_base_or_without_a_gpipe_point_above_it():
    assert slope_prediction(16.0, 64.0, 1.2, 10.0) == 1.0
    assert slope_prediction(16.0, 16.0, 1.2, 30.0) == 1.0
    assert slope_prediction(16.0, 64.0, 0.9, 40.0) == 1.0  # GPipe ran faster: the fit keeps 0


def _stored_calibration(tmp_path):
    """A calibration run's file as `pipefold.cli.calibration_run` writes it, of a 4-layer model on
    [2, 2] at 8 micro-batches of one row: GPipe F 1.10x / 1.20x 1F1B's, B 1.05x / 1.10x, zb-h1's
    last rank F 1.06x (its first as 1F1B's)."""
    import json

    from pipefold.plan import LayerCost, ModelCosts
    from pipefold.simulate import CostModel, Link

    layer = LayerCost(forward_s=0.01, backward_s=0.02, activation_bytes=2**20, output_bytes=1000,
                      parameter_bytes=4000, weight_grad_s=0.01)
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(ModelCosts(layers=(layer,) * 4, reference_rows=1).to_json()))

    def model(f, b):
        return CostModel.from_lists(list(f), [x / 2 for x in b], [x / 2 for x in b], b=list(b),
                                    action_overhead=50e-6, step_overhead=0.01,
                                    link=Link(latency=2e-4)).to_json()

    run_f, run_b = (0.020, 0.021), (0.040, 0.041)
    phase = {"num_microbatches": 8, "schedule": "1f1b", "costs": model(run_f, run_b)}
    calibration = {
        "partition": "[0:2 | 2:4]", "batch_size": 8, "phases": [phase],
        "split_phase": {"num_microbatches": 8, "schedule": "zb-h1", "split_stages": [1],
                        "costs": model((run_f[0], run_f[1] * 1.06), run_b)},
        "held_phase": {"num_microbatches": 8, "schedule": "gpipe",
                       "costs": model((run_f[0] * 1.10, run_f[1] * 1.20),
                                      (run_b[0] * 1.05, run_b[1] * 1.10))},
    }
    folder = tmp_path / "cal0"
    folder.mkdir()
    (folder / "calibration.json").write_text(json.dumps(calibration))
    return costs, folder / "calibration.json"


def test_a_stored_calibration_is_priced_by_the_curve_through_its_points_and_by_the_line(tmp_path):
    from benchmarks.held_curve import _priced

    costs, path = _stored_calibration(tmp_path)
    found = _priced(costs, path)
    gpipe, zb = found["families"]["gpipe"], found["families"]["zb-h1"]
    # The curve passes through GPipe's points and zb-h1's last rank's; the line through GPipe's
    # (least squares over the most any rank held) prices the small excess lower.
    assert [row["f_curve"] for row in gpipe] == pytest.approx([1.10, 1.20])
    assert zb[0]["f_curve"] == pytest.approx(1.0) and zb[1]["f_curve"] == pytest.approx(1.06)
    assert zb[1]["f_line"] < zb[1]["f_curve"]
    assert found["drift"] == pytest.approx(1.0) and len(found["curve_mib"]) == 3
