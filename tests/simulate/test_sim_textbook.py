"""The simulator is exact on the textbook cases of each schedule family.

Each test skips, naming the family, while that family is not registered yet.
p = ranks, m = micro-batches, v = virtual stages per rank; uniform costs.
"""

import math

import pytest

from pipefold.schedule import build, names
from pipefold.simulate import CostModel, simulate


def build_or_skip(name, num_ranks, num_microbatches, num_virtual=None):
    if name not in names():
        pytest.skip(f"schedule family {name!r} is not registered yet")
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)


SHAPES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 3), (4, 8), (4, 2), (8, 32), (5, 7)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_gpipe_and_1f1b_bubble(name, p, m):
    timeline = simulate(build_or_skip(name, p, m), CostModel.uniform(p))
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert timeline.makespan == pytest.approx(3 * (m + p - 1))


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_1f1b_peak_in_flight_is_min_p_minus_r_and_m(p, m):
    timeline = simulate(build_or_skip("1f1b", p, m), CostModel.uniform(p, activation_bytes=5))
    assert [timeline.peak_activations(r) for r in range(p)] == [min(p - r, m) for r in range(p)]
    assert timeline.activation_bytes_peak == tuple(5 * min(p - r, m) for r in range(p))


@pytest.mark.parametrize(("p", "m"), SHAPES)
def test_gpipe_peak_in_flight_is_m(p, m):
    timeline = simulate(build_or_skip("gpipe", p, m), CostModel.uniform(p))
    assert [timeline.peak_activations(r) for r in range(p)] == [m] * p


@pytest.mark.parametrize("name", ["interleaved-1f1b", "looped-bfs"])
@pytest.mark.parametrize(("p", "m", "v"), [(2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 4, 4), (8, 32, 4), (3, 6, 1)])
def test_interleaved_bubble(name, p, m, v):
    # A virtual stage is 1/v of a full stage, so the whole model costs the same for every v.
    costs = CostModel.uniform(p * v, f=1 / v, i=1 / v, w=1 / v)
    timeline = simulate(build_or_skip(name, p, m, v), costs)
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(1, 3), (2, 2), (2, 5), (4, 4), (4, 8), (8, 32), (5, 7)])
def test_zb_h1_bubble_with_equal_f_i_w(p, m):
    timeline = simulate(build_or_skip("zb-h1", p, m), CostModel.uniform(p, f=1, i=1, w=1))
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))
    assert [timeline.peak_activations(r) for r in range(p)] == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 5), (4, 8), (8, 16), (4, 2)])
def test_zb_h2_peak_is_at_most_2p_minus_1(p, m):
    timeline = simulate(build_or_skip("zb-h2", p, m), CostModel.uniform(p))
    assert max(timeline.peak_activations(r) for r in range(p)) <= 2 * p - 1


# m >= 2p-1: fewer micro-batches cannot fill ZB-H2's 2(p-1-r)+1 warm-up forwards.
@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 5), (4, 8), (8, 16)])
def test_zb_h2_steady_state_bubble_vanishes_without_a_barrier(p, m):
    schedule = build_or_skip("zb-h2", p, m)
    costs = CostModel.uniform(p)
    one = simulate(schedule, costs)
    many = simulate(schedule, costs, num_steps=16, sync=False)
    assert many.steady_state_bubble() == pytest.approx(0.0, abs=1e-9)
    assert many.bubble_fraction < one.bubble_fraction / 8  # fill and drain paid once in 16 steps
    # With a barrier every step pays fill and drain again.
    flushed = simulate(schedule, costs, num_steps=4, sync=True)
    assert flushed.bubble_fraction == pytest.approx(one.bubble_fraction)


@pytest.mark.parametrize(("p", "m"), [(4, 8), (8, 32)])
def test_1f1b_keeps_its_bubble_across_steps(p, m):
    # Contrast with ZB-H2: 1F1B's last backward on rank 0 ends each step, so nothing overlaps.
    timeline = simulate(build_or_skip("1f1b", p, m), CostModel.uniform(p), num_steps=4, sync=False)
    assert timeline.steady_state_bubble() == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(
    ("name", "num_chunks"), [("v-half", lambda p: p + 2), ("v-min", lambda p: math.ceil(2 * p / 3) + 2)]
)
@pytest.mark.parametrize(("p", "m"), [(4, 8), (4, 16), (8, 32), (6, 12)])
def test_v_schedules_cut_1f1b_activation_memory(name, num_chunks, p, m):
    # Stage-activation units: a V chunk is half a stage, so it holds half the bytes.
    base = simulate(build_or_skip("1f1b", p, m), CostModel.uniform(p, activation_bytes=2))
    timeline = simulate(build_or_skip(name, p, m, 2), CostModel.uniform(2 * p, activation_bytes=1))
    peak = max(timeline.activation_bytes_peak)
    assert peak <= num_chunks(p)
    assert peak < max(base.activation_bytes_peak)


def test_v_min_holds_less_than_v_half_and_about_a_third_of_1f1b_at_depth():
    p, m = 12, 48

    def peak(name, num_virtual, bytes_per_stage):
        schedule = build_or_skip(name, p, m, num_virtual)
        costs = CostModel.uniform(p * num_virtual, activation_bytes=bytes_per_stage)
        return max(simulate(schedule, costs).activation_bytes_peak)

    base, half, third = peak("1f1b", 1, 6), peak("v-half", 2, 3), peak("v-min", 2, 3)
    assert third < half < base
    assert half / base == pytest.approx(1 / 2, abs=0.1)
    assert third / base == pytest.approx(1 / 3, abs=0.1)


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 6), (4, 8), (8, 16), (6, 7)])
def test_pipedream_stashes_at_most_min_p_minus_r_versions(p, m):
    timeline = simulate(build_or_skip("pipedream", p, m), CostModel.uniform(p), num_steps=3, sync=False)
    bound = [min(p - r, m) for r in range(p)]
    assert all(held <= most for held, most in zip(timeline.weight_versions_peak, bound, strict=True))
    if m >= 2 * p:  # long enough for a full steady state on every rank
        assert list(timeline.weight_versions_peak) == bound


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 6), (4, 8), (8, 16), (6, 7)])
def test_pipedream_2bw_holds_at_most_two_versions(p, m):
    schedule = build_or_skip("pipedream-2bw", p, m)
    timeline = simulate(schedule, CostModel.uniform(p, weight_bytes=10), num_steps=3, sync=False)
    assert max(timeline.weight_versions_peak) <= 2
    assert max(timeline.weight_bytes_peak) <= 20


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_flush_schedules_hold_one_weight_version(name):
    timeline = simulate(build_or_skip(name, 4, 8), CostModel.uniform(4, weight_bytes=3))
    assert timeline.weight_versions_peak == (1, 1, 1, 1)
    assert timeline.weight_bytes_peak == (3, 3, 3, 3)
