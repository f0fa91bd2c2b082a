"""How `plan --profile`'s calibration says the host's speed moved while it measured (one process)."""

import pytest

from pipefold.cli.plan_calibrate import UNSTEADY_SPREAD, speed_spread


def test_a_steady_run_has_no_spread_and_one_slow_step_does_not_make_it_unsteady():
    assert speed_spread([0.2] * 8) == 0.0
    # A collection or a page fault: one step twice as slow, the quartiles untouched.
    assert speed_spread([0.2] * 7 + [0.4]) < UNSTEADY_SPREAD


def test_a_run_whose_speed_moved_reports_its_interquartile_range_over_the_median():
    steps = [0.16, 0.17, 0.2, 0.2, 0.26, 0.27, 0.28, 0.35]  # a calibration run of this host's slow phase
    spread = speed_spread(steps)
    # statistics.quantiles (exclusive): quartiles 0.1775 and 0.2775 around a median of 0.23.
    assert spread == pytest.approx((0.2775 - 0.1775) / 0.23)
    assert spread > UNSTEADY_SPREAD


def test_too_few_steps_give_no_spread():
    assert speed_spread([0.1, 0.3, 0.5]) == 0.0
