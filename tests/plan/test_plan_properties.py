"""Property: for random layer costs, the plan's prediction is a re-simulation of its configuration."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.plan import ModelCosts, NoFeasiblePlan, PlanOptions, plan
from pipefold.plan.stages import StageLayout, stage_cost_model, transient_bytes
from pipefold.schedule import build
from pipefold.simulate import Link, simulate
from pipefold.simulate.memory import later_activation_bytes_peak
from tests.plan._layer_costs import layer_costs

layers = layer_costs(2000)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layer_list=st.lists(layers, min_size=2, max_size=6),
    num_ranks=st.integers(1, 3),
    batch=st.sampled_from([1, 2, 4, 6]),
    limit=st.integers(2000, 60000),
    overhead=st.floats(0.0, 0.5),
    num_cores=st.one_of(st.none(), st.integers(1, 3)),
)
def test_prediction_is_a_resimulation_and_fits(layer_list, num_ranks, batch, limit, overhead, num_cores):
    costs = ModelCosts(layers=tuple(layer_list), overhead_s=overhead)
    if num_ranks > costs.num_layers:
        return
    try:
        result = plan(costs, PlanOptions(num_ranks=num_ranks, global_batch=batch, memory_limit=limit,
                                          max_virtual=2, top=3, num_cores=num_cores))
    except NoFeasiblePlan as error:
        assert error.least.peak_memory > limit
        return
    choice = result.choice
    assert choice.peak_memory <= limit
    # A searched order ("auto") carries its schedule; a family's is rebuilt from its name.
    schedule = choice.order or build(choice.schedule, num_ranks=num_ranks,
                                     num_microbatches=choice.num_microbatches, num_virtual=choice.num_virtual)
    layout = StageLayout(choice.bounds, choice.microbatch_rows)
    model = stage_cost_model(costs, layout, choice.recompute, Link(), num_cores)
    timeline = simulate(schedule, model)
    assert timeline.makespan == pytest.approx(choice.step_time, rel=1e-12)
    transient = transient_bytes(costs, layout, choice.recompute, schedule.placement, num_ranks)
    owned = [0] * num_ranks
    for stage, rank in enumerate(schedule.placement):
        owned[rank] += model.weight_bytes[stage]
    # Weights (every live version), two Adam moments per weight byte, and one gradient per weight
    # byte beside the activations held from the rank's first backward on (none made before it).
    later = later_activation_bytes_peak(timeline, model)
    totals = [timeline.weight_bytes_peak[r] + 2 * owned[r] + transient[r]
              + max(timeline.activation_bytes_peak[r], later[r] + owned[r])
              for r in range(num_ranks)]
    assert max(totals) == choice.peak_memory <= limit
