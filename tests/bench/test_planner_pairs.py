"""benchmarks/planner.py's adjacent pairs: their forecast errors and where they run among the rounds."""

import pytest

from benchmarks.planner import pair_errors, pairs_after_round


def _pair(forecast, measured):
    return {"forecast_s": forecast, "measured_s": measured}


def test_each_pair_reads_its_forecast_over_its_own_measured_step_and_the_median_of_them():
    errors, middle = pair_errors([_pair(0.150, 0.200), _pair(0.220, 0.200), _pair(0.200, 0.250)])
    assert errors == pytest.approx([-0.25, 0.10, -0.20])
    assert middle == pytest.approx(-0.20)
    assert pair_errors([]) == ([], None)


@pytest.mark.parametrize(("num_rounds", "num_pairs", "expected"), [
    (4, 3, [[0], [1], [2], []]),       # fewer pairs than rounds: one after each of the first
    (2, 5, [[0], [1, 2, 3, 4]]),       # more: the rest after the last round
    (3, 0, [[], [], []]),
    (1, 2, [[0, 1]]),
])
def test_pair_i_runs_after_round_i_and_the_rest_after_the_last(num_rounds, num_pairs, expected):
    placed = [list(pairs_after_round(index, num_rounds, num_pairs)) for index in range(num_rounds)]
    assert placed == expected
    assert sorted(sum(placed, [])) == list(range(num_pairs))  # every pair once


def test_host_speed_reads_the_first_run_against_the_later_ones_and_a_run_by_its_thirds():
    from benchmarks.host_speed import after_idle_ratio, thirds

    assert after_idle_ratio([0.150, 0.200, 0.220, 0.210]) == pytest.approx(0.150 / 0.210)
    assert after_idle_ratio([0.150]) is None
    assert thirds([0.3, 0.2, 0.2, 0.25, 0.25, 0.25, 0.4]) == pytest.approx((0.25, 0.325))
    assert thirds([0.2, 0.3]) == pytest.approx((0.2, 0.3))


def test_the_calibrations_first_block_is_read_apart_from_its_later_blocks():
    from benchmarks.planner import calibration_blocks

    # blocks of 4: the first leaves out 2 (allocation), a later block its first (a switch)
    steps = [0.9, 0.5, 0.30, 0.32, 0.6, 0.20, 0.21, 0.22, 0.7, 0.23, 0.24, 0.25]
    assert calibration_blocks(steps, [4, 4, 4], 2) == pytest.approx((0.31, 0.225))
    assert calibration_blocks(steps[:4], [4], 2) is None  # one block: nothing to compare
    assert calibration_blocks(steps, [4, 4], 2) is None   # steps that are not those blocks'


def test_each_pairs_calibration_reads_against_the_defaults_trained_right_after():
    from benchmarks.planner import calibration_over_train

    pairs = [{"calibration_step_s": 0.160, "defaults_measured_s": 0.200},
             {"calibration_step_s": None, "defaults_measured_s": 0.200},  # --calibrate-steps 0
             {"calibration_step_s": 0.220, "defaults_measured_s": 0.200}]
    assert calibration_over_train(pairs) == pytest.approx([0.8, 1.1])


def test_host_speed_alternates_the_calibration_and_train_and_keeps_the_pairs_that_had_a_core():
    from benchmarks.host_speed import calibration_first, quiet_ratios

    assert [calibration_first(index) for index in range(4)] == [True, False, True, False]

    def pair(ratio, calibration_share, train_share):
        return {"ratio": ratio, "calibration": {"core_share": calibration_share},
                "train": {"core_share": train_share}}

    pairs = [pair(1.04, 1.0, 0.99), pair(1.77, 0.49, 0.99), pair(0.60, 0.99, 0.5), pair(0.96, 0.95, 0.91)]
    assert quiet_ratios(pairs) == [0.96, 1.04]
    assert quiet_ratios(pairs, share=0.4) == [0.60, 0.96, 1.04, 1.77]


def test_a_pairs_forecast_error_is_the_launches_ratio_times_the_relative_pricing():
    from benchmarks.planner import pair_parts

    pair = {"forecast_s": 0.125, "measured_s": 0.134, "calibration_step_s": 0.136,
            "defaults_measured_s": 0.152}
    launches, relative = pair_parts(pair)
    assert launches == pytest.approx(0.136 / 0.152)
    assert relative == pytest.approx((0.125 / 0.136) / (0.134 / 0.152))
    assert launches * relative == pytest.approx(0.125 / 0.134)  # the forecast over measured, exactly
    assert pair_parts({**pair, "calibration_step_s": None}) is None
