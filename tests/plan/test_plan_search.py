"""The planner's choice against brute force, the memory limit, and how a tighter limit moves it."""

import itertools
import math

import pytest

from pipefold.balance import balance
from pipefold.plan import LayerCost, ModelCosts, NoFeasiblePlan, PlanOptions, evaluate, plan
from pipefold.plan.ranking import rank_key
from pipefold.plan.space import is_asynchronous, search_space
from pipefold.plan.stages import stage_weights


def uniform_costs(num_layers=6, overhead_s=0.5):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=100,
                      parameter_bytes=500)
    return ModelCosts(layers=(layer,) * num_layers, reference_rows=1, overhead_s=overhead_s)


def mixed_costs():
    # Uneven layers: a heavy head, a cheap embedding, activations that do not follow time.
    spec = [(0.2, 0.3, 200, 50), (1.0, 2.0, 1500, 100), (1.5, 2.5, 900, 100), (1.0, 2.2, 1200, 100),
            (0.7, 1.0, 400, 60), (2.0, 4.0, 2500, 80)]
    layers = tuple(
        LayerCost(forward_s=f, backward_s=b, activation_bytes=a, output_bytes=o, parameter_bytes=300,
                  weight_grad_s=b * 0.4)
        for f, b, a, o in spec
    )
    return ModelCosts(layers=layers, reference_rows=2, input_bytes=40, overhead_s=0.1)


def brute_force(costs, options):
    """Every configuration of the space, every subset of recomputed stages, simulated."""
    best = None
    for config in search_space(options, costs.num_layers).configs:
        num_stages = options.num_ranks * config.num_virtual
        bounds = balance(stage_weights(costs, config.microbatch_rows), num_stages).bounds
        subsets = [()] if is_asynchronous(config.schedule) else [
            s for size in range(num_stages + 1) for s in itertools.combinations(range(num_stages), size)
        ]
        for subset in subsets:
            candidate = evaluate(costs, config, options.num_ranks, bounds, subset, options.link)
            fits = candidate.peak_memory <= options.memory_limit
            if fits and (best is None or rank_key(candidate) < rank_key(best)):
                best = candidate
    return best


@pytest.mark.parametrize("costs", [uniform_costs(), mixed_costs()], ids=["uniform", "mixed"])
@pytest.mark.parametrize("limit", [math.inf, 10000, 8500])
def test_choice_is_the_best_feasible_by_brute_force(costs, limit):
    # Up to 4 stages every recompute subset is tried, so the family search is exact there (searched
    # orders, which may beat every family, are off here: tests/plan/test_plan_refine.py checks them).
    options = PlanOptions(num_ranks=2, global_batch=4, memory_limit=limit, max_virtual=2, order_search_s=0)
    expected = brute_force(costs, options)
    if expected is None:
        with pytest.raises(NoFeasiblePlan):
            plan(costs, options)
        return
    result = plan(costs, options)
    assert result.choice.step_time == pytest.approx(expected.step_time, rel=1e-12)
    assert rank_key(result.choice) == rank_key(expected)


def test_top_candidates_respect_the_limit_and_are_sorted():
    result = plan(uniform_costs(), PlanOptions(num_ranks=2, global_batch=8, memory_limit=10000, top=6))
    assert result.top[0] == result.choice
    assert len(result.top) == 6
    assert all(candidate.peak_memory <= 10000 for candidate in result.top)
    assert [rank_key(c) for c in result.top] == sorted(rank_key(c) for c in result.top)
    # Ranked by time first (in 1% buckets): nothing lower in the table is clearly faster.
    assert all(c.step_time >= result.choice.step_time / 1.01 for c in result.top)
    assert max(result.peak_memory) == result.choice.peak_memory <= 10000


def test_a_tighter_limit_moves_the_choice_toward_less_memory():
    costs = uniform_costs()

    def choice(limit):  # the families' trade-off: searched orders off
        options = PlanOptions(num_ranks=2, global_batch=8, memory_limit=limit, order_search_s=0)
        return plan(costs, options).choice

    free = choice(math.inf)
    assert (free.schedule, free.num_virtual, free.num_microbatches, free.recompute) == (
        "interleaved-1f1b", 3, 4, ()
    )
    # 12000 bytes: interleaving holds too much; plain 1F1B with more, smaller micro-batches fits.
    tighter = choice(12000)
    assert (tighter.schedule, tighter.num_microbatches, tighter.recompute) == ("1f1b", 8, ())
    assert tighter.peak_memory < free.peak_memory and tighter.step_time > free.step_time
    # 9000 bytes: only recomputation gets there (6 stages: the greedy recompute search).
    tightest = choice(9000)
    assert tightest.recompute and tightest.peak_memory <= 9000
    assert tightest.step_time > tighter.step_time


def test_infeasible_limit_names_the_least_memory_that_fits_and_how():
    costs = uniform_costs()
    options = PlanOptions(num_ranks=2, global_batch=8, memory_limit=7000)
    with pytest.raises(NoFeasiblePlan) as caught:
        plan(costs, options)
    error = caught.value
    assert error.least.peak_memory == 7300
    message = str(error)
    assert "7000" not in message or "6.84 KiB" in message
    assert "7.13 KiB" in message and "(7300 bytes)" in message
    assert "recompute none -> all 2 stages" in message
    # The named amount is exactly enough.
    fitted = plan(costs, PlanOptions(num_ranks=2, global_batch=8, memory_limit=error.least.peak_memory))
    assert fitted.choice.peak_memory <= 7300


def test_explanation_covers_every_family_and_the_settings():
    from pipefold.schedule import names

    result = plan(uniform_costs(), PlanOptions(num_ranks=2, global_batch=8, memory_limit=12000,
                                               order_search_s=0))
    assert [verdict.subject for verdict in result.families] == names()
    statuses = {verdict.subject: verdict.status for verdict in result.families}
    assert statuses["1f1b"] == "chosen"
    assert statuses["pipedream"] == "not-applicable"
    assert statuses["interleaved-1f1b"] in ("over-memory", "slower", "pruned")
    reasons = {verdict.subject: verdict.reason for verdict in result.settings}
    assert "slower than the choice" in reasons["num_microbatches=4"] or "over the memory" in reasons[
        "num_microbatches=4"]
    assert "slower than the choice" in reasons["recompute=all"]
    text = result.explain()
    assert "choice: 1f1b v=1, 8 micro-batches of 1" in text and "Pipeline(schedule='1f1b'" in text


def test_pins_and_async():
    costs = uniform_costs()
    pinned = plan(costs, PlanOptions(num_ranks=2, global_batch=8, schedules=("gpipe",), microbatches=2))
    assert (pinned.choice.schedule, pinned.choice.num_microbatches) == ("gpipe", 2)
    assert {v.status for v in pinned.families if v.subject != "gpipe"} == {"not-searched"}
    with_async = plan(costs, PlanOptions(num_ranks=2, global_batch=8, allow_async=True,
                                         schedules=("pipedream",)))
    assert with_async.choice.schedule == "pipedream" and with_async.choice.recompute == ()
    full = plan(costs, PlanOptions(num_ranks=2, global_batch=8, recompute="full", schedules=("1f1b",)))
    assert full.choice.recompute == (0, 1)
    assert full.choice.layout_kwargs()["recompute"] == [0, 1, 2, 3, 4, 5]


def test_uneven_microbatches_use_the_largest_one():
    result = plan(uniform_costs(), PlanOptions(num_ranks=2, global_batch=7, uneven=True, microbatches=3,
                                               schedules=("1f1b",)))
    assert (result.choice.num_microbatches, result.choice.microbatch_rows) == (3, 3)


def test_bad_options_are_refused_naming_the_field():
    from pipefold.errors import ConfigError, ScheduleError

    with pytest.raises(ConfigError, match="microbatches = 3 does not divide the global batch 8"):
        PlanOptions(num_ranks=2, global_batch=8, microbatches=3)
    with pytest.raises(ConfigError, match="num_ranks = 0"):
        PlanOptions(num_ranks=0, global_batch=8)
    with pytest.raises(ConfigError, match="memory_limit"):
        PlanOptions(num_ranks=2, global_batch=8, memory_limit=-1)
    with pytest.raises(ScheduleError, match="unknown schedule 'nope'"):
        PlanOptions(num_ranks=2, global_batch=8, schedules=("nope",))


def test_eight_ranks_sixty_four_layers_plans_within_the_limit():
    # A scale test: the whole search at 8 ranks and 64 layers finishes and fits. How long it
    # takes (about 10 s on one core of the 2-vCPU VM) is not asserted: a timed assertion
    # failed CI at 15.3 s on a busy machine, and timings belong in benchmarks.
    from pipefold.plan import gpt_costs

    costs = gpt_costs(num_layers=60, d_model=2048, num_heads=16, seq_len=2048, vocab_size=50257, flops=3e14,
                      bytes_per_value=2, overhead_s=1e-4)
    assert costs.num_layers == 64
    result = plan(costs, PlanOptions(num_ranks=8, global_batch=64, memory_limit=16 * 2**30))
    assert result.choice.peak_memory <= 16 * 2**30
