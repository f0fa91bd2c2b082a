"""Cost model from a per-layer profile, and the gradient check."""

import pytest
import torch

from benchmarks.harness.pairs import pair
from benchmarks.harness.predict import calibration_scale, cost_model, predict
from benchmarks.harness.reference import GradientMismatch, check_gradients
from benchmarks.harness.results import LayerCost


def _costs():
    return [
        LayerCost(forward_s=1.0 + i, backward_s=2.0 + i, input_grad_s=1.0, activation_bytes=10 * (i + 1),
                  output_bytes=100 + i)
        for i in range(8)
    ]


def test_cost_model_sums_layers_per_stage():
    model = cost_model(_costs(), 2, scale=0.5)
    # Stage 0 = layers 0..3: forward 1+2+3+4 = 10, backward 2+3+4+5 = 14, I = 4.
    assert model.f == (5.0, 13.0)
    assert model.b == (7.0, 15.0)
    assert model.i == (2.0, 2.0)
    assert model.w == (5.0, 13.0)  # W = B - I per layer
    assert model.activation_bytes == (100, 260)
    assert model.message_bytes == (103,)  # output of layer 3


def test_calibration_matches_baseline():
    costs = _costs()
    scale = calibration_scale(costs, 4, baseline_s=10.0)
    assert scale * 4 * sum(c.forward_s + c.backward_s for c in costs) == pytest.approx(10.0)


def test_prediction_of_gpipe_with_uniform_layers_has_textbook_bubble():
    uniform = [LayerCost(1.0, 2.0, 1.0, 0, 0) for _ in range(8)]
    timeline = predict(pair("gpipe"), 2, 4, uniform)
    # (p-1)/(m+p-1) = 1/5 with equal stages and free links.
    assert timeline.bubble_fraction == pytest.approx(0.2)
    assert timeline.makespan == pytest.approx(5 * 12.0)


def test_check_gradients_reports_the_parameter():
    reference = {"0.weight": torch.ones(3)}
    assert check_gradients("lib", {"0.weight": torch.ones(3)}, reference) == 0.0
    with pytest.raises(GradientMismatch, match="'0.weight'"):
        check_gradients("lib", {"0.weight": torch.ones(3) * 1.1}, reference)
    with pytest.raises(GradientMismatch, match="no counterpart"):
        check_gradients("lib", {"9.bias": torch.ones(1)}, reference)
    with pytest.raises(GradientMismatch, match="no gradients"):
        check_gradients("lib", {}, reference)
