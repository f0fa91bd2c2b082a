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
