"""Autocast's 16-bit weight copies priced as the runtime makes them (pipefold.plan.precision_costs):
once a step where the casts are held, at every forward under full sharding (one process, no torch)."""

from dataclasses import replace

import pytest

from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.evaluate import evaluate
from pipefold.plan.space import Config
from pipefold.simulate import Link

NUM_LAYERS, WEIGHT_BYTES = 4, 1000
CAST_S, CAST_BYTES = 1e-6, 0.5  # per parameter byte: a 16-bit copy of fp32 weights


def _costs(**fields):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=100, output_bytes=10,
                             parameter_bytes=WEIGHT_BYTES) for _ in range(NUM_LAYERS))
    return ModelCosts(layers=layers, **fields)


def _evaluate(costs, *, recompute=(), **options):
    return evaluate(costs, Config("1f1b", 1, 4, 1), 2, (0, 2, NUM_LAYERS), recompute, Link(), **options)


def test_held_casts_add_every_stages_casts_once_to_the_step():
    plain = _evaluate(_costs())
    casting = _evaluate(_costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES))
    # The fill passes every stage's first forward in turn: all the pipeline's weights, cast once.
    assert casting.step_time - plain.step_time == pytest.approx(CAST_S * NUM_LAYERS * WEIGHT_BYTES)
    assert [m.casts for m in casting.memory] == [CAST_BYTES * 2 * WEIGHT_BYTES] * 2  # held once a rank
    assert [m.activations for m in casting.memory] == [m.activations for m in plain.memory]


@pytest.mark.parametrize("recompute", [(), (0, 1)])
def test_full_sharding_casts_at_every_forward_and_each_micro_batch_keeps_its_copies(recompute):
    options = {"num_data_parallel": 2, "shard": "full", "price_exposure": False}
    plain = _evaluate(_costs(), recompute=recompute, **options)
    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    casting = _evaluate(costs, recompute=recompute, **options)
    stage_cast = CAST_S * 2 * WEIGHT_BYTES
    # 1f1b, 2 ranks, 4 micro-batches: the last rank's 4 F in a row on the critical path at least,
    # and more than held casts would cost (each stage once).
    assert casting.step_time - plain.step_time >= 4 * stage_cast * (1 - 1e-9)
    assert casting.step_time - plain.step_time > 2 * stage_cast
    assert all(m.casts == 0 for m in casting.memory)  # none held for the step
    copies = [c.activations - p.activations for c, p in zip(casting.memory, plain.memory, strict=True)]
    if recompute:
        assert copies == [0, 0]  # a checkpointed forward saves nothing; its rerun casts again
        # ... which B pays too: more than the forwards alone.
        assert casting.step_time - plain.step_time > 8 * stage_cast * (1 - 1e-9)
    else:
        # Rank 0 holds 2 micro-batches in flight at its peak (1f1b, 2 ranks), rank 1 one: their copies.
        assert copies == [2 * CAST_BYTES * 2 * WEIGHT_BYTES, CAST_BYTES * 2 * WEIGHT_BYTES]


def test_the_cast_price_survives_the_costs_file():
    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    again = ModelCosts.from_json(costs.to_json())
    assert again.cast_s_per_parameter_byte == CAST_S
    with pytest.raises(Exception, match="cast_s_per_parameter_byte"):
        replace(costs, cast_s_per_parameter_byte=-1.0)


@pytest.mark.parametrize("shard", ["replicate", "full"])
def test_the_search_prices_the_copies_as_evaluate_does(shard):
    from pipefold.plan import PlanOptions, plan

    costs = _costs(cast_s_per_parameter_byte=CAST_S, cast_bytes_per_parameter_byte=CAST_BYTES)
    options = PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, order_search_s=0, schedules=("1f1b",),
                          microbatches=4, recompute="none", shard=shard)
    choice = plan(costs, options).choice
    again = evaluate(costs, Config("1f1b", 1, 4, choice.microbatch_rows, shard=shard), 2, choice.bounds,
                     choice.recompute, Link(), num_data_parallel=2, shard=shard)
    # (The search's costs carry one replica's share of the optimizer state under full sharding.)
    assert [(m.activations, m.casts) for m in choice.memory] == [(m.activations, m.casts) for m in again.memory]
    assert choice.step_time == pytest.approx(again.step_time)
    assert all((m.casts == 0) == (shard == "full") for m in choice.memory)
