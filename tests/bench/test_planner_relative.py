"""benchmarks/planner.py's forecast error relative to the defaults' (the host's speed taken out)."""

import pytest

from benchmarks.planner import relative_errors


def _row(label, forecast, measured):
    return {"label": label, "forecast_s": forecast, "measured_s": measured}


def test_a_host_slower_for_every_configuration_leaves_the_relative_error_at_zero():
    rows = [_row("choice: zb-v", 0.150, 0.150 * 1.3), _row("#2: 1f1b", 0.160, 0.160 * 1.3),
            _row("default (1f1b m=8)", 0.170, 0.170 * 1.3), _row("former default (uniform)", 0.18, 0.2)]
    assert [label for label, _ in relative_errors(rows)] == ["choice: zb-v", "#2: 1f1b"]
    assert [error for _, error in relative_errors(rows)] == pytest.approx([0.0, 0.0])


def test_a_configuration_priced_cheap_against_the_defaults_reads_negative():
    rows = [_row("choice: zb-v", 0.100, 0.150), _row("default (1f1b m=8)", 0.150, 0.150)]
    assert relative_errors(rows) == [("choice: zb-v", pytest.approx(0.100 / 0.150 - 1))]
    assert relative_errors([_row("choice: zb-v", 0.1, 0.1)]) == []
