"""Property: the planner's cheap lower bound never exceeds the simulated step, so pruning by it
never drops a configuration that could have won; with ranks sharing cores, split backwards priced
apart from B, and sends on a link; and it is exact for 1f1b on equal stages."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan.bounds import SERIAL_FAMILIES, backward_kind, step_time_lower_bound
from pipefold.schedule import build, names
from pipefold.simulate import CostModel, Link, simulate

times = st.floats(0.0, 4.0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(names()),
    p=st.integers(1, 5),
    m=st.integers(1, 12),
    v=st.integers(1, 3),
    data=st.data(),
    num_cores=st.one_of(st.none(), st.floats(0.25, 6.0)),
)
def test_lower_bound_holds(name, p, m, v, data, num_cores):
    try:
        schedule = build(name, num_ranks=p, num_microbatches=m, num_virtual=v)
    except ScheduleError:
        return
    n = schedule.num_stages
    per_stage = st.lists(times, min_size=n, max_size=n)
    costs = CostModel.from_lists(
        data.draw(per_stage), data.draw(per_stage), data.draw(per_stage),
        b=data.draw(st.one_of(st.just([]), per_stage)),
        message_bytes=data.draw(st.lists(st.integers(0, 1000), min_size=n - 1, max_size=n - 1)),
        link=Link(latency=data.draw(st.floats(0.0, 1.0)), bandwidth=data.draw(st.floats(100.0, 1e4))),
        num_cores=num_cores,
    )
    makespan = simulate(schedule, costs).makespan
    for backward in ("any", backward_kind(schedule)):
        bound = step_time_lower_bound(costs, schedule.placement, m, backward, serial=name in SERIAL_FAMILIES)
        assert bound <= makespan * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("p,m", [(2, 8), (4, 4), (4, 16), (8, 3)])
def test_lower_bound_is_exact_for_1f1b_on_equal_stages(p, m):
    schedule = build("1f1b", num_ranks=p, num_microbatches=m)
    costs = CostModel.uniform(p, f=1.0, i=1.0, w=1.0, b=2.0)
    bound = step_time_lower_bound(costs, schedule.placement, m, backward_kind(schedule))
    assert bound == pytest.approx(simulate(schedule, costs).makespan)


@pytest.mark.parametrize("p,m", [(1, 5), (2, 8), (4, 4), (8, 3)])
def test_serial_bound_is_exact_for_naive_on_equal_stages(p, m):
    # m round trips of p stages each, where the plain bound is 1F1B's (m + p - 1) (f + b).
    schedule = build("naive", num_ranks=p, num_microbatches=m)
    costs = CostModel.uniform(p, f=1.0, i=1.0, w=1.0, b=2.0)
    makespan = simulate(schedule, costs).makespan
    assert step_time_lower_bound(costs, schedule.placement, m, "B", serial=True) == pytest.approx(makespan)
    assert makespan == pytest.approx(m * p * 3.0)
    if p > 1 and m > 1:
        assert step_time_lower_bound(costs, schedule.placement, m, "B") < makespan


def test_the_serial_bound_is_the_naive_orders_alone():
    # The order search bounds any order of a configuration's actions ("any"), which a naive
    # record may stand for: there the serial bound does not hold.
    from pipefold.plan import LayerCost, ModelCosts, PlanOptions
    from pipefold.plan.search import _Search
    from pipefold.plan.tensor import LinearCosts

    costs = ModelCosts(layers=tuple(LayerCost(1.0, 2.0, 100, 10) for _ in range(4)))
    search = _Search(LinearCosts(costs), PlanOptions(num_ranks=4, global_batch=8, microbatches=8,
                                                     schedules=("naive", "1f1b")))
    records = {r.config.schedule: r for r in search.records()}
    naive, one_f_one_b = records["naive"], records["1f1b"]
    assert naive.bounds == one_f_one_b.bounds and naive.placement == one_f_one_b.placement
    assert search.bound(naive, (), "any") == search.bound(one_f_one_b, (), "any")
    # m round trips of F and the input-gradient half (the order's backward kind not read yet).
    assert search.bound(naive, ()) == pytest.approx(8 * 4 * (1.0 + 1.0))
    assert search.bound(naive, ()) > search.bound(one_f_one_b, ())
