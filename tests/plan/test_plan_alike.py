"""Identical layers priced alike (pipefold.plan.alike): a one-process profile's noise between
identical blocks must not decide between two orders; pure logic, one process."""

from dataclasses import replace

import pytest

from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.alike import alike_groups, pool_alike
from pipefold.plan.calibrate import at_run_prices, first_stage_backward
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule.io import from_json
from pipefold.simulate import CostModel, Link, simulate

_BLOCK = dict(activation_bytes=4210688, output_bytes=262144, parameter_bytes=793088)


def _gpt(block_forward):
    """The built-in GPT's eight layers (embedding, positions, blocks, norm, tied head) as a
    profile measured them at 4 rows: block times as given, each block's backward twice its
    forward, a third of that the weight gradient; an I or a W 0.84 ms beyond its share of B, as
    the calibration run measured the split backward."""
    blocks = [LayerCost(forward_s=f, backward_s=2 * f, weight_grad_s=2 * f / 3, fixed_s=2e-4,
                        **_BLOCK) for f in block_forward]
    return ModelCosts(layers=(
        LayerCost(forward_s=0.0, backward_s=1.4e-4, weight_grad_s=1.1e-4, fixed_s=4.7e-5,
                  activation_bytes=4096, output_bytes=262144, parameter_bytes=131072),
        LayerCost(forward_s=6e-5, backward_s=1.9e-4, weight_grad_s=1e-4, fixed_s=3.4e-5, activation_bytes=0,
                  output_bytes=262144, parameter_bytes=65536),
        *blocks,
        LayerCost(forward_s=1e-4, backward_s=2.1e-4, weight_grad_s=7.5e-5, fixed_s=1e-5,
                  activation_bytes=266240, output_bytes=262144, parameter_bytes=1024),
        LayerCost(forward_s=3.6e-4, backward_s=8.3e-4, weight_grad_s=3.4e-4, activation_bytes=262144,
                  output_bytes=524288, parameter_bytes=131072),
    ), reference_rows=4, tied_layers=((0, 7),), input_requires_grad=False, action_overhead_s=1e-4,
        split_overhead_s=8.4e-4)


def test_the_blocks_are_one_group_and_the_tied_or_unique_layers_none():
    costs = _gpt([3.1e-3, 2.1e-3, 2.8e-3, 3.5e-3])
    assert alike_groups(costs) == ((2, 3, 4, 5),)
    pooled = pool_alike(costs)
    for index in (2, 3, 4, 5):
        layer = pooled.layers[index]
        assert layer.forward_s == pytest.approx(2.875e-3) and layer.backward_s == pytest.approx(5.75e-3)
        assert layer.weight_grad_s == pytest.approx(5.75e-3 / 3) and layer.fixed_s == pytest.approx(2e-4)
    for index in (0, 1, 6, 7):
        assert pooled.layers[index] == costs.layers[index]
    # The model's total time is kept.
    assert sum(layer.forward_s + layer.backward_s for layer in pooled.layers) == pytest.approx(
        sum(layer.forward_s + layer.backward_s for layer in costs.layers))
    # A block of other sizes (wider) is not the same layer: left as measured.
    wider = replace(costs, layers=(*costs.layers[:5], replace(costs.layers[5], parameter_bytes=2 * 793088),
                                   *costs.layers[6:]))
    assert alike_groups(wider) == ((2, 3, 4),)
    assert pool_alike(wider).layers[5] == wider.layers[5]
    one = replace(costs, layers=costs.layers[:3], tied_layers=())  # one block: nothing to pool
    assert pool_alike(one) == one


# Two orders the planner searched for 2 ranks, 4 stages of partition [3, 1, 1, 3], 4 micro-batches:
# stages interleaved over the ranks (0 and 2 on rank 0) and a V (0 and 3 on rank 0).
_INTERLEAVED = {
    "format": "pipefold.schedule", "version": 1, "name": "auto", "num_ranks": 2, "num_stages": 4,
    "num_microbatches": 4, "placement": [0, 1, 0, 1], "weight_update": "flush", "actions": [
        "F0.0 F0.1 F2.0 F2.1 F0.2 F0.3 B2.0 I2.1 I0.0 W2.1 F2.2 I0.1 W0.0 F2.3 I2.2 W0.1 I0.2 W2.2 I2.3 W0.2 "
        "I0.3 W2.3 W0.3".split(),
        "F1.0 F1.1 F3.0 I3.0 F3.1 I3.1 I1.0 F1.2 I1.1 F1.3 F3.2 I3.2 W3.0 F3.3 I1.2 I3.3 W3.1 W1.0 I1.3 W1.1 "
        "W3.2 W1.2 W3.3 W1.3".split()]}
_V = {
    "format": "pipefold.schedule", "version": 1, "name": "auto", "num_ranks": 2, "num_stages": 4,
    "num_microbatches": 4, "placement": [0, 1, 1, 0], "weight_update": "flush", "actions": [
        "F0.0 F0.1 F0.2 F3.0 B3.0 F3.1 F0.3 B3.1 F3.2 B0.0 B3.2 F3.3 B3.3 B0.1 B0.2 B0.3".split(),
        "F1.0 F2.0 F1.1 F2.1 F1.2 B2.0 F2.2 B1.0 F1.3 B2.1 F2.3 B1.1 B2.2 B1.2 I2.3 I1.3 W2.3 W1.3".split()]}


def _makespans(costs, bounds, rows):
    layout = StageLayout(bounds, rows)
    model = first_stage_backward(stage_cost_model(costs, layout, (), Link(latency=3e-4), 2.0), costs, bounds)
    return [simulate(from_json(order), model).makespan for order in (_INTERLEAVED, _V)], model


def test_profile_noise_between_blocks_does_not_decide_between_two_orders():
    """The profile timed four identical blocks 1.5x apart; a run of 1F1B's partition [0, 4, 8]
    measured its two stages (two blocks each) as the blocks really cost, alike. Calibrated on
    that run, the profile's shares inside a stage price a single-block stage of [3, 1, 1, 3] by
    the profile's noise: the interleaved order forecast ahead of the V, which at the true costs is
    the faster by several percent (what `pipefold train` measured). Pooling the blocks first
    ranks them as the true costs do."""
    rows = 8
    truth = _gpt([2.9e-3] * 4)
    profile = _gpt([3.1e-3, 2.1e-3, 2.8e-3, 3.5e-3])
    calibration = (0, 4, 8)
    run = stage_cost_model(truth, StageLayout(calibration, rows), (), Link(latency=3e-4))
    run = CostModel.from_lists(list(run.f), list(run.i), list(run.w), b=list(run.b), link=run.link,
                               action_overhead=1e-4)
    bounds = (0, 3, 4, 5, 8)
    (true_interleaved, true_v), true_model = _makespans(truth, bounds, rows)
    assert true_v < 0.93 * true_interleaved

    noisy, _ = at_run_prices(profile, run, calibration, rows)
    (interleaved, v), model = _makespans(noisy, bounds, rows)
    assert interleaved < v  # the profile's noise ranks them the other way
    assert model.f[1] < 0.85 * true_model.f[1]  # a single-block stage priced by the profile's noise

    pooled, _ = at_run_prices(pool_alike(profile), run, calibration, rows)
    (interleaved, v), model = _makespans(pooled, bounds, rows)
    assert v < 0.93 * interleaved
    assert model.f == pytest.approx(true_model.f, rel=0.01)
    assert v == pytest.approx(true_v, rel=0.02) and interleaved == pytest.approx(true_interleaved, rel=0.02)
