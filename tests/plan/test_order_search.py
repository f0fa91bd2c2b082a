"""`find_schedule`: searched schedules are valid, within the memory cap, and never slower than 1F1B.

Memory without sizes in the cost model is counted as the ZB paper counts it: each
(stage, micro-batch) holds 1 from the end of its F to the end of its W (or B).
`unit_peak` prices a schedule that way, independently of the search's own bookkeeping.
"""

import subprocess
import sys
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import CostModelError, ScheduleError
from pipefold.plan import find_schedule, search_schedule
from pipefold.schedule import (
    Op,
    WeightUpdate,
    build,
    looped_placement,
    lower,
    names,
    v_placement,
    validate,
)
from pipefold.schedule.io import from_json, to_json
from pipefold.simulate import CostModel, simulate

# Short budgets keep the sweeps fast; the list scheduler runs in full whatever the budget.
BUDGET = 0.02


def unit_memory(costs):
    ones = (1,) * costs.num_stages
    return replace(costs, activation_bytes=ones, weight_grad_bytes=ones)


def unit_peak(schedule, costs):
    return max(simulate(schedule, unit_memory(costs)).activation_bytes_peak)


def makespan(schedule, costs):
    return simulate(schedule, costs).makespan


def check_runnable(schedule, num_ranks, num_microbatches):
    validate(schedule)
    assert schedule.name == "auto"
    assert schedule.weight_update is WeightUpdate.FLUSH
    assert (schedule.num_ranks, schedule.num_microbatches) == (num_ranks, num_microbatches)
    assert {a.op for row in schedule.actions for a in row} <= {Op.F, Op.B, Op.I, Op.W}


times = st.floats(0.1, 5.0, allow_nan=False, allow_infinity=False)


@st.composite
def uneven_costs(draw, num_stages):
    return CostModel.from_lists(
        f=draw(st.lists(times, min_size=num_stages, max_size=num_stages)),
        i=draw(st.lists(times, min_size=num_stages, max_size=num_stages)),
        w=draw(st.lists(times, min_size=num_stages, max_size=num_stages)),
    )


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_ranks=st.integers(1, 6), num_microbatches=st.integers(1, 12),
       split=st.booleans())
def test_valid_within_1f1b_memory_and_never_slower_than_1f1b(data, num_ranks, num_microbatches, split):
    costs = data.draw(uneven_costs(num_ranks))
    schedule = find_schedule(costs, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             split_backward=split, time_budget_s=BUDGET)
    check_runnable(schedule, num_ranks, num_microbatches)
    if not split:
        assert all(a.op in (Op.F, Op.B) for row in schedule.actions for a in row)
    one_f_one_b = build("1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches)
    assert makespan(schedule, costs) <= makespan(one_f_one_b, costs) * (1 + 1e-9)
    assert unit_peak(schedule, costs) <= min(num_ranks, num_microbatches)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), num_ranks=st.integers(1, 6), num_microbatches=st.integers(1, 12),
       slack=st.integers(0, 4))
def test_list_scheduler_alone_respects_any_feasible_cap(data, num_ranks, num_microbatches, slack):
    """Without the families as seeds, every cap from one micro-batch per rank up is kept, in bytes."""
    sizes = st.lists(st.integers(1, 1000), min_size=num_ranks, max_size=num_ranks)
    activation, kept = data.draw(sizes), data.draw(sizes)
    costs = replace(data.draw(uneven_costs(num_ranks)), activation_bytes=tuple(activation),
                    weight_grad_bytes=tuple(kept))
    smallest = max(max(a, k) for a, k in zip(activation, kept, strict=True))
    limit = smallest + slack * min(activation)
    result = search_schedule(costs, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             memory_limit=limit, time_budget_s=BUDGET, include_families=False)
    check_runnable(result.schedule, num_ranks, num_microbatches)
    peak = simulate(result.schedule, costs).activation_bytes_peak
    assert max(peak) <= limit
    assert result.peak_memory == peak and result.memory_unit == "bytes"


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(2, 4), (3, 6), (4, 8), (4, 12), (6, 12)])
def test_uniform_costs_reach_zb_h1_bubble_from_the_list_scheduler_alone(num_ranks, num_microbatches):
    costs = CostModel.uniform(num_ranks)
    result = search_schedule(costs, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             time_budget_s=0.2, include_families=False)
    zb_h1 = simulate(build("zb-h1", num_ranks=num_ranks, num_microbatches=num_microbatches), costs)
    assert result.bubble_fraction <= zb_h1.bubble_fraction + 1e-9
    assert unit_peak(result.schedule, costs) <= num_ranks  # 1F1B's peak, as ZB-H1's
    assert result.memory_limit == num_ranks and result.memory_unit == "stage micro-batches"


def flush_families(num_ranks, num_microbatches):
    found = []
    for name in names():
        try:
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=1)
        except ScheduleError:
            continue
        if schedule.weight_update is WeightUpdate.FLUSH:
            found.append(schedule)
    return found


def test_one_slow_stage_beats_every_hand_written_family():
    """Stage 1 of 4 costs 1.5x (F = I = W = 1.5, the others 1), 8 micro-batches.

    No schedule ends before stage 1 has done its 8 x 4.5 of work after the first F of
    stage 0 (1): 37. The search reaches that bound; the families pace every rank alike
    and the best of them that fits 1F1B's memory (zb-h1) takes 38.
    """
    costs = CostModel.from_lists(f=[1, 1.5, 1, 1], i=[1, 1.5, 1, 1], w=[1, 1.5, 1, 1])
    schedule = find_schedule(costs, num_ranks=4, num_microbatches=8, time_budget_s=0.2)
    assert makespan(schedule, costs) == pytest.approx(1 + 8 * 4.5)
    assert unit_peak(schedule, costs) <= 4
    fitting = [s for s in flush_families(4, 8) if unit_peak(s, costs) <= 4]
    assert {s.name for s in fitting} >= {"1f1b", "zb-h1"}
    assert min(makespan(s, costs) for s in fitting) == pytest.approx(38)


@pytest.mark.parametrize("placement", ["v", "looped"])
def test_two_stages_per_rank(placement):
    costs = CostModel.from_lists(f=[1, 1, 2, 1, 1, 1, 1, 1], i=[1, 1, 2, 1, 1, 1, 1, 1],
                                 w=[1, 1, 2, 1, 1, 1, 1, 1])
    result = search_schedule(costs, num_ranks=4, num_microbatches=8, num_virtual=2, placement=placement,
                             time_budget_s=0.2)
    schedule = result.schedule
    check_runnable(schedule, 4, 8)
    expected = v_placement(4, 2) if placement == "v" else looped_placement(4, 2)
    assert schedule.placement == expected
    assert unit_peak(schedule, costs) <= result.memory_limit == 4 * 2  # min(p, m) x 2 chunks
    # Interleaved 1F1B holds more than 1F1B (10 chunks here); given its memory, the search matches it.
    fastest = min((c for c in result.baselines if c.placement == expected), key=lambda c: c.makespan)
    again = search_schedule(costs, num_ranks=4, num_microbatches=8, num_virtual=2, placement=placement,
                            memory_limit=fastest.peak_memory, time_budget_s=0.2)
    assert again.makespan <= fastest.makespan * (1 + 1e-9)
    assert unit_peak(again.schedule, costs) <= fastest.peak_memory


def test_link_latency_is_part_of_the_costs():
    costs = replace(CostModel.uniform(4), message_bytes=(1000,) * 3)
    costs = replace(costs, link=type(costs.link)(latency=0.5, bandwidth=1e6))
    result = search_schedule(costs, num_ranks=4, num_microbatches=6, time_budget_s=0.2)
    assert result.makespan == pytest.approx(makespan(result.schedule, costs))
    assert result.makespan <= makespan(build("1f1b", num_ranks=4, num_microbatches=6), costs)


def test_found_schedule_lowers_and_round_trips_through_json():
    costs = CostModel.from_lists(f=[1, 2, 1], i=[1, 2, 1], w=[0.5, 1, 0.5])
    schedule = find_schedule(costs, num_ranks=3, num_microbatches=6, time_budget_s=0.1)
    program = lower(schedule)
    sends = [a for row in program.instructions for a in row if a.op in (Op.SEND_F, Op.SEND_B)]
    assert len(sends) == 2 * 2 * 6  # two boundaries, one activation and one gradient per micro-batch
    assert from_json(to_json(schedule)) == schedule


def test_result_reports_where_it_came_from():
    result = search_schedule(CostModel.uniform(3), num_ranks=3, num_microbatches=6, time_budget_s=0.05)
    assert result.origin.startswith(("list scheduler", "family "))
    assert result.evaluations > 0 and result.local_moves >= 0
    assert [c.makespan for c in result.baselines] == sorted(c.makespan for c in result.baselines)
    assert {c.name for c in result.baselines} >= {"1f1b", "zb-h1", "gpipe"}


def test_errors_name_the_value_and_the_fix():
    costs = CostModel.uniform(4)
    with pytest.raises(ScheduleError, match="memory_limit >= 1"):
        find_schedule(costs, num_ranks=4, num_microbatches=8, memory_limit=0)
    with pytest.raises(CostModelError, match="num_stages=4"):
        find_schedule(costs, num_ranks=2, num_microbatches=8)
    with pytest.raises(ScheduleError, match="looped"):
        find_schedule(CostModel.uniform(8), num_ranks=4, num_microbatches=8, num_virtual=2)
    with pytest.raises(ScheduleError, match="placement="):
        find_schedule(costs, num_ranks=4, num_microbatches=8, placement="diagonal")


def test_searching_imports_no_torch():
    code = (
        "import sys\n"
        "from pipefold.plan import find_schedule\n"
        "from pipefold.simulate import CostModel\n"
        "find_schedule(CostModel.uniform(2), num_ranks=2, num_microbatches=3, time_budget_s=0)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_strict_budget_holds_at_64_ranks_and_512_microbatches():
    # One list-scheduler run at this size takes seconds, 48 of them minutes: a strict budget (the
    # planner's) stops the run in progress and answers, here with nothing scored in time.
    costs = CostModel.uniform(64)
    start = time.perf_counter()
    try:
        found = search_schedule(costs, num_ranks=64, num_microbatches=512, time_budget_s=0.5,
                                strict_budget=True)
    except ScheduleError as error:
        assert "time budget of 0.5 s was spent before any order" in str(error)
    else:
        assert found.evaluations >= 1
    assert time.perf_counter() - start < 6.0
