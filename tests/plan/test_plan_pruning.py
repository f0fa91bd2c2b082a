"""Property: pruning by bounds and deciding memory from the order never loses the winner. On random
small problems, the plan's choice is in the best time bucket of an exhaustive search that simulates
every family, stages per rank, micro-batch count and recomputed subset with `simulate`."""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.balance import balance
from pipefold.plan import ModelCosts, NoFeasiblePlan, PlanOptions, plan
from pipefold.plan.ranking import time_bucket
from pipefold.plan.space import search_space
from pipefold.plan.stages import StageLayout, stage_cost_model, stage_weights, transient_bytes
from pipefold.schedule import build
from pipefold.simulate import Link, simulate
from pipefold.simulate.memory import later_activation_bytes_peak
from tests.plan._layer_costs import layer_costs

layers = layer_costs(2000)


def _exhaustive(costs: ModelCosts, options: PlanOptions) -> list[tuple[float, int]]:
    """(step, peak memory) of every configuration and recompute subset."""
    found = []
    num_ranks = options.num_ranks
    assert num_ranks is not None
    for config in search_space(options, costs.num_layers).configs:
        schedule = build(config.schedule, num_ranks=num_ranks, num_microbatches=config.num_microbatches,
                         num_virtual=config.num_virtual)
        num_stages = schedule.num_stages
        bounds = balance(stage_weights(costs, config.microbatch_rows), num_stages).bounds
        layout = StageLayout(bounds, config.microbatch_rows)
        for size in range(num_stages + 1):
            for recompute in itertools.combinations(range(num_stages), size):
                model = stage_cost_model(costs, layout, recompute, Link())
                timeline = simulate(schedule, model)
                transient = transient_bytes(costs, layout, recompute, schedule.placement, num_ranks)
                owned = [0] * num_ranks
                for stage, rank in enumerate(schedule.placement):
                    owned[rank] += model.weight_bytes[stage]
                # Weights, two Adam moments per weight byte, and the gradients beside what the rank
                # holds from its first backward on (none exist before it: the update frees them).
                later = later_activation_bytes_peak(timeline, model)
                peak = max(timeline.weight_bytes_peak[r] + 2 * owned[r] + transient[r]
                           + max(timeline.activation_bytes_peak[r], later[r] + owned[r])
                           for r in range(num_ranks))
                found.append((timeline.makespan, peak))
    return found


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layer_list=st.lists(layers, min_size=2, max_size=4),
    num_ranks=st.integers(1, 2),
    batch=st.sampled_from([2, 4]),
    limit=st.integers(2000, 60000),
    overhead=st.floats(0.0, 0.5),
)
def test_the_choice_is_in_the_best_bucket_of_an_exhaustive_search(
    layer_list, num_ranks, batch, limit, overhead
):
    costs = ModelCosts(layers=tuple(layer_list), overhead_s=overhead)
    if num_ranks > costs.num_layers:
        return
    options = PlanOptions(num_ranks=num_ranks, global_batch=batch, memory_limit=limit, max_virtual=2,
                          order_search_s=0, exhaustive_recompute_stages=4, top=1)
    fitting = [step for step, peak in _exhaustive(costs, options) if peak <= limit]
    try:
        choice = plan(costs, options).choice
    except NoFeasiblePlan:
        assert not fitting
        return
    assert fitting and choice.peak_memory <= limit
    assert time_bucket(choice.step_time) == min(time_bucket(step) for step in fitting)
