"""Property: the planner's cheap lower bound never exceeds the simulated step, so pruning by it
never drops a configuration that could have won; with ranks sharing cores too."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan.bounds import step_time_lower_bound
from pipefold.schedule import build, names
from pipefold.simulate import CostModel, Link, simulate

times = st.floats(0.0, 4.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
        link=Link(latency=data.draw(st.floats(0.0, 1.0))), num_cores=num_cores,
    )
    bound = step_time_lower_bound(costs, schedule.placement, m)
    assert bound <= simulate(schedule, costs).makespan * (1 + 1e-9) + 1e-9
