"""benchmarks/order_pair.py: the rotation of configurations per round, per-round ratios, and the
measured cost per action kind."""

import math

import pytest

from benchmarks.order_pair import kind_costs, rotation, round_ratios


def test_each_round_starts_at_the_next_configuration():
    assert [rotation(r, 2) for r in range(3)] == [[0, 1], [1, 0], [0, 1]]
    assert [rotation(r, 3) for r in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_ratios_are_taken_within_a_round_against_the_first_configuration():
    ratios = round_ratios([[0.200, 0.400], [0.180, 0.440]])  # the second round ran twice as slow
    assert ratios[0] == pytest.approx([1.0, 1.0]) and ratios[1] == pytest.approx([0.9, 1.1])


def test_kind_costs_sum_the_stages_that_ran_the_kind():
    nan = math.nan
    sums = kind_costs({"F": [1.0, 2.0], "I": [nan, 0.5], "W": [nan, 0.25], "B": [3.0, nan]})
    assert sums == pytest.approx({"F": 3.0, "I": 0.5, "W": 0.25, "B": 3.0})
    assert kind_costs({"F": [1.0], "I": [nan], "W": [nan], "B": [2.0]})["I"] is None


def test_cross_simulation_prices_each_order_on_the_same_costs():
    from benchmarks.order_pair import cross_ratios
    from pipefold.schedule import build
    from pipefold.simulate import CostModel, simulate

    gpipe = build("gpipe", num_ranks=2, num_microbatches=4)
    one_f_one_b = build("1f1b", num_ranks=2, num_microbatches=4)
    fast = CostModel.from_lists([1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    slow = CostModel.from_lists([3.0, 3.0], [3.0, 3.0], [3.0, 3.0])  # a run on a host 3x slower
    ratios = cross_ratios([gpipe, one_f_one_b], [fast, slow])
    assert ratios[0] == [1.0, 1.0]
    expected = simulate(one_f_one_b, fast).makespan / simulate(gpipe, fast).makespan
    assert ratios[1] == pytest.approx([expected, expected])  # the host's speed cancels
