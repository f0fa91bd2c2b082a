"""Refusing a split by its weights' floor before searching it (`pipefold.plan.splits`) never loses
the winner: the floor is at most what any partition puts on its fullest rank, and on random small
problems the plan with the floor is the plan without it (the same choice and ranked list, or the
same error)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipefold.plan.search as search_module
from pipefold.balance import balance
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, PlanOptions, plan
from pipefold.plan.memory import static_bytes
from pipefold.plan.splits import static_floor
from pipefold.plan.stages import StageLayout, stage_cost_model, stage_weights
from pipefold.schedule.ir import contiguous_placement
from pipefold.simulate import Link
from tests.plan._layer_costs import layer_costs

layers = layer_costs(20000, min_parameter_bytes=1)


def _costs(layer_list: list[LayerCost], tie: bool, optimizer: float) -> ModelCosts:
    tied = ((0, len(layer_list) - 1),) if tie and len(layer_list) > 1 else ()
    if tied:  # a tied pair holds one weight: give both ends the same bytes
        first = layer_list[0]
        layer_list = [*layer_list[:-1], LayerCost(layer_list[-1].forward_s, layer_list[-1].backward_s,
                                                  layer_list[-1].activation_bytes,
                                                  layer_list[-1].output_bytes, first.parameter_bytes)]
    return ModelCosts(layers=tuple(layer_list), tied_layers=tied,
                      optimizer_bytes_per_parameter_byte=optimizer)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_list=st.lists(layers, min_size=2, max_size=9), tie=st.booleans(), data=st.data(),
       optimizer=st.floats(0.0, 4.0))
def test_the_floor_is_at_most_the_fullest_rank(layer_list, tie, data, optimizer):
    costs = _costs(layer_list, tie, optimizer)
    num_ranks = data.draw(st.integers(1, costs.num_layers))
    num_virtual = data.draw(st.integers(1, max(1, costs.num_layers // num_ranks)))
    num_stages = num_ranks * num_virtual
    # Any partition and any placement, the balanced one among them.
    if data.draw(st.booleans()):
        bounds = balance(stage_weights(costs, 1), num_stages).bounds
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, costs.num_layers - 1), min_size=num_stages - 1,
                                        max_size=num_stages - 1))) if num_stages > 1 else []
        bounds = (0, *cuts, costs.num_layers)
    placement = tuple(data.draw(st.permutations(list(range(num_ranks)) * num_virtual)))
    if num_virtual == 1 and data.draw(st.booleans()):
        placement = contiguous_placement(num_ranks)
    model = stage_cost_model(costs, StageLayout(bounds, 1), (), Link())
    fullest = max(static_bytes(costs, model, placement, num_ranks))
    assert static_floor(costs, "replicate", num_ranks) <= fullest
    assert static_floor(costs, "full", num_ranks) <= fullest


def _outcome(costs: ModelCosts, options: PlanOptions) -> object:
    try:
        result = plan(costs, options).to_json()
    except NoFeasiblePlan as error:
        return str(error)
    return result["choice"], result["top"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_list=st.lists(layers, min_size=2, max_size=5), tie=st.booleans(),
       limit=st.integers(5_000, 150_000), devices=st.sampled_from([2, 4]), shard=st.sampled_from(
           ["replicate", "auto"]))
def test_the_plan_with_the_floor_is_the_plan_without(layer_list, tie, limit, devices, shard):
    costs = _costs(layer_list, tie, 2.0)
    options = PlanOptions(num_devices=devices, global_batch=8, memory_limit=limit, max_virtual=2,
                          order_search_s=0, shard=shard)
    with_floor = _outcome(costs, options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search_module, "floor_problem", lambda *args: None)
        without = _outcome(costs, options)
    assert with_floor == without


def test_a_split_over_its_floor_is_refused_with_the_reason():
    # 8 layers of 1 MB weights, 4 bytes of weights, gradients and optimizer state per weight byte:
    # one pipeline rank needs 32 MB, two 16 MB each, four 8 MB.
    costs = ModelCosts(layers=tuple(LayerCost(1.0, 2.0, 1000, 100, 1_000_000) for _ in range(8)),
                       optimizer_bytes_per_parameter_byte=2.0)
    result = plan(costs, PlanOptions(num_devices=8, global_batch=8, memory_limit=10_000_000,
                                     order_search_s=0))
    verdicts = {v.subject: v for v in result.degrees}
    refused = [v for v in verdicts.values() if "in every setting" in v.reason]
    assert refused and all(v.status == "over-memory" for v in refused)
    # One pipeline rank holds all 32 MB: the floor is its exact excess.
    assert "exceed the limit on rank 0 by 21 MiB" in verdicts["dp=8 x pp=1"].reason
    assert result.choice.num_ranks >= 4
