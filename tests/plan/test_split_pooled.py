"""The split share pooled with the one-process profile's estimate of it
(`pipefold.plan.split_fit.profile_split_share`, `pooled_split_share`): the profile's (I + W - B) / 2B
over the calibration's split stages, averaged with the split block's fit. Pure logic, one process."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.calibrate import at_run_prices
from pipefold.plan.split_fit import pooled_split_share, profile_split_share
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import CostModel, Link


def test_the_profiles_share_is_half_its_extra_over_b_on_the_split_stages_only():
    # Layer 0 (stage 0, not split) would read -0.25; stage 1's layers 0.04 and 0.08 of their B.
    layers = ((0.5, 1.0, 2.0), (1.0, 1.08, 2.0), (2.0, 2.32, 4.0))
    assert profile_split_share(layers, (0, 1, 3), {1}) == pytest.approx((0.08 + 0.32) / (2 * 6.0))
    # Two split stages: their mean; shares kept in [0, 0.45] as the block's are.
    both = ((1.0, 1.04, 2.0), *layers[1:])
    assert profile_split_share(both, (0, 2, 3), {0, 1}) == pytest.approx((0.12 / 8.0 + 0.32 / 8.0) / 2)
    assert profile_split_share(((1.0, 1.0, 1.0),), (0, 1), {0}) == 0.45
    assert profile_split_share(((0.1, 0.1, 1.0),), (0, 1), {0}) == 0.0
    # Nothing to estimate from: no split stage, or no timed backward there.
    assert profile_split_share(layers, (0, 1, 3), set()) is None
    assert profile_split_share(((0.0, 0.0, 0.0),), (0, 1), {0}) is None
    with pytest.raises(ConfigError, match="2 layers, the partition .* covers 3"):
        profile_split_share(layers[:2], (0, 1, 3), {1})


def test_the_pool_is_the_mean_of_the_two_and_the_blocks_alone_without_a_profile():
    assert pooled_split_share(0.019, 0.05) == pytest.approx(0.0345)
    assert pooled_split_share(0.019, None) == 0.019


def _costs():
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=10, output_bytes=10,
                             parameter_bytes=100, weight_grad_s=0.5) for _ in range(4))
    return ModelCosts(layers=layers, reference_rows=2, overhead_s=0.01)


def test_the_calibration_prices_the_pooled_share_and_keeps_the_blocks_w_share():
    profile = _costs()
    truth = replace(profile, split_backward_share=0.07)
    bounds, rows = (0, 1, 4), 4
    measured = stage_cost_model(truth, StageLayout(bounds, rows), (), Link())
    halves = [x / 2 for x in measured.b]
    run = CostModel.from_lists(list(measured.f), halves, halves, b=list(measured.b), action_overhead=50e-6,
                               step_overhead=0.01, link=Link(latency=2e-4))
    split = replace(measured, action_overhead=run.action_overhead)
    block, alone = at_run_prices(profile, run, bounds, rows, split=split)
    # The profile timed stage 1's layers (1:4) with I + W 3% beyond B, stage 0's 20% (both split here).
    layer_split = ((1.2, 1.2, 2.0),) + ((1.03, 1.03, 2.0),) * 3
    pooled, calibration = at_run_prices(profile, run, bounds, rows, split=split, layer_split=layer_split)
    estimate = (0.2 / 2 + 0.03 / 2) / 2
    assert calibration.split_share_profile == pytest.approx(estimate)
    assert calibration.split_share_block == pytest.approx(0.07) == alone.split_share_block
    assert pooled.split_backward_share == pytest.approx((0.07 + estimate) / 2)
    assert calibration.split_backward_share == pooled.split_backward_share
    assert alone.split_share_profile is None and block.split_backward_share == pytest.approx(0.07)
    # W's share of each stage's backward stays what the block measured.
    assert calibration.weight_share == alone.weight_share
    assert [layer.weight_grad_s for layer in pooled.layers] == [layer.weight_grad_s for layer in block.layers]
