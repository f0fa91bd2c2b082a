"""Every schedule family: legal everywhere it claims to be, refused elsewhere, and true to its numbers.

The unit-cost checks replay a schedule with F = I = W = 1 and B = 2 time units per
stage-chunk and no communication time (`unit_makespan`); the textbook bubble
formulas are statements about exactly that model.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.schedule import Op, WeightUpdate, build, family, names
from pipefold.schedule.deps import backward_of, data_inputs
from pipefold.schedule.ir import contiguous_placement, looped_placement, v_placement

ORDER = [
    "naive",
    "gpipe",
    "1f1b",
    "interleaved-1f1b",
    "looped-bfs",
    "zb-h1",
    "zb-h2",
    "zb-v",
    "v-half",
    "v-min",
    "dualpipe-v",
    "pipedream",
    "pipedream-2bw",
]
# The legal num_virtual of each family, written independently of the code under test.
LEGAL_VIRTUAL = {
    "naive": {1},
    "gpipe": {1},
    "1f1b": {1},
    "interleaved-1f1b": None,  # any v >= 1
    "looped-bfs": None,
    "zb-h1": {1},
    "zb-h2": {1},
    "zb-v": {2},
    "v-half": {2},
    "v-min": {2},
    "dualpipe-v": {2},
    "pipedream": {1},
    "pipedream-2bw": {1},
}
V_FAMILIES = {"zb-v", "v-half", "v-min", "dualpipe-v"}
ASYNC = {"pipedream": WeightUpdate.STASH, "pipedream-2bw": WeightUpdate.DOUBLE_BUFFER}
COST = {Op.F: 1, Op.I: 1, Op.W: 1, Op.B: 2, Op.STEP: 0}


def legal(name, num_virtual):
    allowed = LEGAL_VIRTUAL[name]
    return allowed is None or num_virtual in allowed


def unit_times(schedule):
    """(first start, last end) per rank, and the makespan, with unit costs and free communication."""
    backward = backward_of(schedule)
    end = {}
    spans = [None] * schedule.num_ranks
    free = [0] * schedule.num_ranks
    positions = [0] * schedule.num_ranks
    remaining = sum(len(row) for row in schedule.actions)
    while remaining:
        before = remaining
        for rank, row in enumerate(schedule.actions):
            while positions[rank] < len(row):
                action = row[positions[rank]]
                inputs = data_inputs(action, schedule, backward)
                if not all(needed in end for needed in inputs):
                    break
                start = max([free[rank]] + [end[needed] for needed in inputs])
                end[action] = free[rank] = start + COST[action.op]
                first = start if spans[rank] is None else spans[rank][0]
                spans[rank] = (first, end[action])
                positions[rank] += 1
                remaining -= 1
        assert remaining < before, "unit-cost replay stalled on a validated schedule"
    return spans, max(free)


def unit_makespan(schedule):
    return unit_times(schedule)[1]


def peak_in_flight(row, *, released_by=(Op.B, Op.W)):
    """Most forwards done minus releasing ops done, counting along one rank's order."""
    held = peak = 0
    for action in row:
        if action.op is Op.F:
            held += 1
        elif action.op in released_by:
            held -= 1
        peak = max(peak, held)
    return peak


def test_families_registered_in_the_documented_order():
    assert names() == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_family_describes_itself(name):
    entry = family(name)
    for text in (entry.summary, entry.bubble, entry.memory, entry.legal):
        assert text.strip()
    expected_default = 2 if name in V_FAMILIES | {"interleaved-1f1b", "looped-bfs"} else 1
    assert entry.default_virtual == expected_default
    assert entry.generate.__doc__ and "rank 0" in entry.generate.__doc__, "docstring draws the shape"


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(ORDER),
    num_ranks=st.integers(1, 8),
    num_microbatches=st.integers(1, 32),
    num_virtual=st.integers(1, 4),
)
def test_every_legal_combination_builds_and_every_other_is_refused(
    name, num_ranks, num_microbatches, num_virtual
):
    if not legal(name, num_virtual):
        with pytest.raises(ScheduleError, match="num_virtual"):
            build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
        return
    schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    assert schedule.name == name
    assert (schedule.num_ranks, schedule.num_microbatches) == (num_ranks, num_microbatches)
    assert schedule.num_stages == num_ranks * num_virtual
    if name in V_FAMILIES:
        assert schedule.placement == v_placement(num_ranks, 2)
    elif num_virtual > 1:
        assert schedule.placement == looped_placement(num_ranks, num_virtual)
    else:
        assert schedule.placement == contiguous_placement(num_ranks)
    assert schedule.weight_update is ASYNC.get(name, WeightUpdate.FLUSH)
    has_step = any(a.op is Op.STEP for _, _, a in schedule.iter_actions())
    assert has_step == (name in ASYNC)


@pytest.mark.parametrize("name", ORDER)
def test_default_virtual_builds(name):
    schedule = build(name, num_ranks=3, num_microbatches=7)
    assert schedule.num_virtual == family(name).default_virtual


def test_bad_counts_are_named():
    with pytest.raises(ScheduleError, match="num_ranks"):
        build("1f1b", num_ranks=0, num_microbatches=4)
    with pytest.raises(ScheduleError, match="num_microbatches"):
        build("zb-v", num_ranks=2, num_microbatches=0)


def test_refusal_offers_an_alternative():
    with pytest.raises(ScheduleError, match="num_virtual=2.*interleaved-1f1b") as info:
        build("zb-v", num_ranks=2, num_microbatches=4, num_virtual=3)
    assert "got num_virtual=3" in str(info.value)


# ---- memory: micro-batches in flight, counted along each rank's order -------------------------


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_1f1b_peak_in_flight_is_min_p_minus_r_and_m(num_ranks):
    for num_microbatches in range(1, 33):
        schedule = build("1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches)
        peaks = [peak_in_flight(row) for row in schedule.actions]
        assert peaks == [min(num_ranks - rank, num_microbatches) for rank in range(num_ranks)]


@pytest.mark.parametrize("num_ranks", [1, 2, 5, 8])
def test_gpipe_holds_every_microbatch(num_ranks):
    for num_microbatches in (1, 3, 16):
        schedule = build("gpipe", num_ranks=num_ranks, num_microbatches=num_microbatches)
        assert [peak_in_flight(row) for row in schedule.actions] == [num_microbatches] * num_ranks


def test_naive_holds_one_microbatch():
    schedule = build("naive", num_ranks=4, num_microbatches=6)
    assert [peak_in_flight(row) for row in schedule.actions] == [1, 1, 1, 1]


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_zb_h1_memory_matches_1f1b(num_ranks):
    for num_microbatches in range(1, 33):
        schedule = build("zb-h1", num_ranks=num_ranks, num_microbatches=num_microbatches)
        until_i = [peak_in_flight(row, released_by=(Op.I,)) for row in schedule.actions]
        until_w = [peak_in_flight(row, released_by=(Op.W,)) for row in schedule.actions]
        assert until_i == [min(num_ranks - rank, num_microbatches) for rank in range(num_ranks)]
        assert max(until_w) == min(num_ranks, num_microbatches)


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_zb_h2_holds_at_most_2p_minus_1(num_ranks):
    for num_microbatches in range(1, 33):
        schedule = build("zb-h2", num_ranks=num_ranks, num_microbatches=num_microbatches)
        peaks = [peak_in_flight(row, released_by=(Op.W,)) for row in schedule.actions]
        assert max(peaks) <= min(2 * num_ranks - 1, num_microbatches)
        if num_microbatches >= 2 * num_ranks - 1:
            assert peaks[0] == 2 * num_ranks - 1


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("num_virtual", [2, 3, 4])
def test_interleaved_holds_megatron_warmup_plus_one(num_ranks, num_virtual):
    num_microbatches = 4 * num_ranks
    schedule = build(
        "interleaved-1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual
    )
    expected = [
        min((num_virtual - 1) * num_ranks + 2 * (num_ranks - 1 - rank) + 1, num_virtual * num_microbatches)
        for rank in range(num_ranks)
    ]
    assert [peak_in_flight(row) for row in schedule.actions] == expected


def test_looped_bfs_holds_every_chunk():
    schedule = build("looped-bfs", num_ranks=3, num_microbatches=5, num_virtual=3)
    assert [peak_in_flight(row) for row in schedule.actions] == [15, 15, 15]


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_v_schedules_memory(num_ranks):
    num_microbatches = 4 * num_ranks
    peaks = {
        name: [
            peak_in_flight(row, released_by=(Op.B, Op.W))
            for row in build(name, num_ranks=num_ranks, num_microbatches=num_microbatches).actions
        ]
        for name in V_FAMILIES
    }
    assert peaks["zb-v"] == [2 * num_ranks] * num_ranks
    assert peaks["dualpipe-v"] == [2 * num_ranks + 1] * num_ranks
    assert max(peaks["v-half"]) <= num_ranks + 2
    assert max(peaks["v-min"]) <= math.ceil(2 * num_ranks / 3) + 2
    # Against 1F1B's p stages = 2p chunks on rank 0: about 1/2 and 1/3 once p is large enough.
    if num_ranks >= 4:
        assert max(peaks["v-half"]) <= num_ranks + 2 < 2 * num_ranks
        assert max(peaks["v-min"]) < max(peaks["v-half"])


# ---- asynchronous schedules: where the optimizer steps go -----------------------------------


@pytest.mark.parametrize("num_ranks,num_microbatches", [(1, 1), (2, 3), (4, 8), (4, 2), (8, 32)])
def test_pipedream_steps_right_after_every_backward(num_ranks, num_microbatches):
    schedule = build("pipedream", num_ranks=num_ranks, num_microbatches=num_microbatches)
    for row in schedule.actions:
        for position, action in enumerate(row):
            if action.op is Op.B:
                step = row[position + 1]
                assert (step.op, step.stage, step.microbatch) == (Op.STEP, action.stage, action.microbatch)
            if action.op is Op.STEP:
                assert row[position - 1].op is Op.B
        compute = [a for a in row if a.op is not Op.STEP]
        assert compute == list(build("1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches).actions[
            row[0].stage
        ])


def live_weight_versions(row):
    """Most weight versions needed at once on one rank: the current one plus those stashed
    by in-flight micro-batches (a forward uses the current version, its backward the same)."""
    version = 0
    seen_by = {}
    peak = 1
    for action in row:
        if action.op is Op.F:
            seen_by[action.microbatch] = version
        elif action.op is Op.B:
            del seen_by[action.microbatch]
        elif action.op is Op.STEP:
            version += 1
        peak = max(peak, len(set(seen_by.values()) | {version}))
    return peak


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_2bw_keeps_at_most_two_weight_versions(num_ranks):
    for num_microbatches in range(1, 33):
        schedule = build("pipedream-2bw", num_ranks=num_ranks, num_microbatches=num_microbatches)
        for row in schedule.actions:
            assert live_weight_versions(row) <= 2
            backwards = 0
            for position, action in enumerate(row):
                if action.op is Op.B:
                    backwards += 1
                    steps = position + 1 < len(row) and row[position + 1].op is Op.STEP
                    due = backwards % num_ranks == 0 or backwards == num_microbatches
                    assert steps == due, (num_microbatches, row)


def test_pipedream_needs_more_versions_than_2bw():
    row = build("pipedream", num_ranks=4, num_microbatches=8).actions[0]
    assert live_weight_versions(row) == 4


# ---- bubbles under unit costs ----------------------------------------------------------------


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("num_microbatches", [1, 3, 8, 16])
def test_flush_textbook_bubbles(num_ranks, num_microbatches):
    p, m = num_ranks, num_microbatches
    assert unit_makespan(build("naive", num_ranks=p, num_microbatches=m)) == 3 * p * m
    # GPipe and 1F1B: bubble (p-1)/(m+p-1), i.e. a makespan of 3(m+p-1).
    assert unit_makespan(build("gpipe", num_ranks=p, num_microbatches=m)) == 3 * (m + p - 1)
    assert unit_makespan(build("1f1b", num_ranks=p, num_microbatches=m)) == 3 * (m + p - 1)
    for v in (2, 3):
        if m < p:
            # With fewer micro-batches than ranks a loop's round trip is the critical path.
            continue
        # Looped BFS: (p-1)/(v*m+p-1) with chunk costs 1/v of a stage.
        assert unit_makespan(build("looped-bfs", num_ranks=p, num_microbatches=m, num_virtual=v)) == 3 * (
            v * m + p - 1
        )


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("num_virtual", [2, 3, 4])
def test_interleaved_bubble_when_m_is_a_multiple_of_p(num_ranks, num_virtual):
    for num_microbatches in (num_ranks, 2 * num_ranks, 4 * num_ranks):
        schedule = build(
            "interleaved-1f1b",
            num_ranks=num_ranks,
            num_microbatches=num_microbatches,
            num_virtual=num_virtual,
        )
        assert unit_makespan(schedule) == 3 * (num_virtual * num_microbatches + num_ranks - 1)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_zb_h1_bubble_is_a_third_of_1f1b(num_ranks):
    for num_microbatches in (num_ranks, 2 * num_ranks, 24):
        schedule = build("zb-h1", num_ranks=num_ranks, num_microbatches=num_microbatches)
        assert unit_makespan(schedule) == 3 * num_microbatches + num_ranks - 1


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_zb_h2_is_a_gapless_parallelogram(num_ranks):
    for num_microbatches in (2 * num_ranks - 1, 2 * num_ranks, 32):
        spans, _ = unit_times(build("zb-h2", num_ranks=num_ranks, num_microbatches=num_microbatches))
        assert spans == [(rank, 3 * num_microbatches + rank) for rank in range(num_ranks)]


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
def test_zb_h2_is_never_slower_than_zb_h1(num_ranks):
    for num_microbatches in range(1, 2 * num_ranks + 2):
        h1 = unit_makespan(build("zb-h1", num_ranks=num_ranks, num_microbatches=num_microbatches))
        h2 = unit_makespan(build("zb-h2", num_ranks=num_ranks, num_microbatches=num_microbatches))
        assert h2 <= h1


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v"])
def test_v_zero_bubble_makespan(num_ranks, name):
    for num_microbatches in (2 * num_ranks, 3 * num_ranks, 32):
        schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches)
        assert unit_makespan(schedule) == 6 * num_microbatches + num_ranks - 1


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 6, 8])
def test_controllable_memory_bubbles_against_1f1b(num_ranks):
    num_microbatches = 4 * num_ranks
    one_f_one_b = unit_makespan(build("1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches))
    # A chunk is half a stage: in stage units the V makespan is half the chunk-unit count.
    v_half = unit_makespan(build("v-half", num_ranks=num_ranks, num_microbatches=num_microbatches)) / 2
    v_min = unit_makespan(build("v-min", num_ranks=num_ranks, num_microbatches=num_microbatches)) / 2
    ideal = 3 * num_microbatches
    assert v_half < one_f_one_b
    assert (v_min - ideal) / v_min <= 1.7 * (one_f_one_b - ideal) / one_f_one_b
    if num_ranks in (2, 4):
        assert v_min < one_f_one_b


def test_v_greedy_refuses_a_cap_below_one_microbatch():
    from pipefold.schedule.families._v_greedy import greedy_v_rows

    with pytest.raises(ScheduleError, match="cap=1"):
        greedy_v_rows(2, 4, 1)
    assert sum(len(row) for row in greedy_v_rows(2, 4, 2)) == 3 * 4 * 4
