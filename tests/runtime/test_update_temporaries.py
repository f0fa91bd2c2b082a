"""The update's temporaries as torch allocates them, against the plan's formulas
(`pipefold.plan.update_memory`, priced per rank by `pipefold.plan.memory.update_bytes`): the
profiler's CPU memory events around one gradient norm, one AdamW step and fp16's overflow check
and unscale of a small model, as `pipefold train` runs them (its parameter groups, its gradient
norm, its fp32 masters for bf16 weights, its loss scale). Allocation sizes are deterministic.

The foreach path is forced on CPU tensors (`foreach=True`): the code torch runs by default on
CUDA, the same list of square roots, one group at a time. What the formulas leave out is a few
bytes of step counters (under 2 KiB here: `torch.tensor(1.0)` per step and the single-tensor
loop's scalars)."""

import pytest
import torch
from torch import nn

from benchmarks.update_temporaries import exact_step_bytes, peak_bytes
from pipefold.cli.profile import _update_fields, _with_update_split
from pipefold.job.optim import no_decay, parameter_groups
from pipefold.model.zoo import gpt_layers
from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.estimate import GptEstimate, gpt_parameter_no_decay, gpt_parameter_numels
from pipefold.plan.hardware import load_hardware
from pipefold.plan.memory import update_bytes
from pipefold.plan.update_memory import (
    gradient_norm_bytes,
    layer_norm_bytes,
    overflow_check_bytes,
    update_temporaries,
)
from pipefold.runtime.clip import GradientScope
from pipefold.runtime.loss_scale import DynamicLossScale
from pipefold.runtime.master import fp32_master_weights
from pipefold.simulate import Link

COUNTERS = 2048
"""Bytes the formulas do not count: step counters and scalars."""


def _model(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    # An embedding, norms and biases (the group without decay, 34 K elements) beside two matrices
    # of different sizes (the decayed group, 41 K): the whole rank's list would be 1.8x the larger.
    layers = (nn.Embedding(512, 64), nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 96),
              nn.LayerNorm(96))
    return nn.Sequential(*layers).to(dtype)


def _stepped(model, *, foreach, masters):
    groups = parameter_groups([model], model.parameters(), weight_decay=0.1)
    adamw = fp32_master_weights(torch.optim.AdamW) if masters else torch.optim.AdamW
    optimizer = adamw(groups, lr=1e-3, foreach=foreach)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()  # the state exists from the first step on: the plan counts it apart
    return optimizer


def _priced(model, *, foreach, masters) -> int:
    """What the planner prices for a rank holding `model` (one layer carrying its bytes and its
    undecayed part), the gradient norm left out."""
    params = list(model.parameters())
    exempt = no_decay([model])
    fields = update_temporaries([p.numel() for p in params], value_bytes=2 if masters else 4, foreach=foreach,
                                masters=masters, no_decay=[id(p) in exempt for p in params])
    fields["gradient_norm_bytes"] = 0
    owned = sum(p.numel() * p.element_size() for p in params)
    free = sum(p.numel() * p.element_size() for p in params if id(p) in exempt)
    layer = LayerCost(forward_s=0.0, backward_s=0.0, activation_bytes=0, output_bytes=0,
                      parameter_bytes=owned, no_decay_parameter_bytes=free)
    return update_bytes(ModelCosts(layers=(layer,), **fields), [owned], [free])[0]


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "bf16-pure"])
def test_adamw_step_allocates_what_the_plan_prices(foreach, masters):
    model = _model(torch.bfloat16 if masters else torch.float32)
    optimizer = _stepped(model, foreach=foreach, masters=masters)
    # What torch allocates, exactly: the groups are separate calls whose temporaries are freed
    # at return. foreach: the larger group's list of fp32 square roots; single-tensor: a
    # parameter's sqrt and denominator beside the previous one's denominator, in its group's order.
    exact = exact_step_bytes(optimizer, foreach, masters)
    measured = peak_bytes(optimizer.step, "cpu")
    assert 0 <= measured - exact < COUNTERS, (measured, exact)
    # The plan: the larger group's list (exact); a group's two largest tensors (exact here but for
    # the undecayed group's second, a 256-element bias: 1 KiB).
    priced = _priced(model, foreach=foreach, masters=masters)
    assert 0 <= priced - exact <= 4 * 256, (priced, exact, measured)


def test_gradient_norm_allocates_what_the_plan_prices():
    model = _model()
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    scope = GradientScope(params=tuple(model.parameters()), not_counted=frozenset(), tp_group=None, tp_rank=0,
                          collectives=None, watchdog=None)
    measured = peak_bytes(scope.total_norm, "cpu")
    predicted = gradient_norm_bytes([p.numel() for p in model.parameters()])
    assert 0 <= measured - predicted < COUNTERS, (measured, predicted)


def test_a_ranks_gradient_norm_is_its_layers_largest():
    # A rank holding the model's layers from `first` on: its norm's copies against its layers'
    # `gradient_norm_bytes`, which take the previous layer's last tensor as the rank's first's
    # predecessor (an upper bound by 8 bytes x that tensor at the rank's first layer).
    layers = list(_model())
    for layer in layers:
        for param in layer.parameters():
            param.grad = torch.randn_like(param)
    per_layer = layer_norm_bytes([[p.numel() for p in layer.parameters()] for layer in layers])
    for first in range(len(layers)):
        params = tuple(p for layer in layers[first:] for p in layer.parameters())
        scope = GradientScope(params=params, not_counted=frozenset(), tp_group=None, tp_rank=0,
                              collectives=None, watchdog=None)
        measured = peak_bytes(scope.total_norm, "cpu")
        priced = max(per_layer[first:])
        before = list(layers[first - 1].parameters())[-1].numel() if first else 0
        assert 0 <= priced - measured + COUNTERS and priced - measured <= 8 * before, (
            first, measured, priced
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-gradients", "fp16-gradients"])
def test_fp16s_overflow_check_allocates_less_than_the_priced_norm_and_its_unscale_nothing(dtype):
    # pipefold train --precision fp16 keeps fp32 weights (autocast): fp32 gradients; fp16 ones
    # checked too. The check runs after the pipeline's call with what the norm sees live.
    params = list(_model(dtype).parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    scale = DynamicLossScale(2.0**16, growth_interval=100, group=None, watchdog=None)  # type: ignore[arg-type]
    measured = peak_bytes(lambda: scale.overflowed(params, torch.device("cpu")), "cpu")
    numels = [p.numel() for p in params]
    predicted = overflow_check_bytes(numels, params[0].element_size())
    assert 0 <= measured - predicted < COUNTERS, (measured, predicted)
    assert measured < gradient_norm_bytes(numels)
    scale.set_aside(params)  # .grad now the step's contribution: give it one, then unscale in place
    for param in params:
        param.grad = torch.randn_like(param)
    assert peak_bytes(lambda: scale.unscale_and_add_back(params), "cpu") < COUNTERS


@pytest.mark.parametrize("tied", [True, False])
def test_the_estimates_tensors_and_groups_are_the_built_in_gpts(tied):
    # What `plan --hardware` prices (the FLOP estimate's shapes and groups) and what `plan --profile`
    # reads off the model agree, tied embedding once.
    layers = gpt_layers(256, 64, 4, 2, 32, tie_embeddings=tied)
    numels = gpt_parameter_numels(2, 64, 32, 256, 1, tied=tied)
    flags = gpt_parameter_no_decay(2, tied=tied)
    assert _update_fields(layers, "cpu", "fp32") == update_temporaries(numels, value_bytes=4, foreach=False,
                                                                        masters=False, no_decay=flags)
    on_gpu = _update_fields(layers, "cuda", "bf16-pure")
    assert on_gpu["update_bytes_per_parameter_byte"] == on_gpu["update_group_bytes_per_parameter_byte"] == 2.0
    # Each layer's undecayed bytes: a profile's (parameter bytes x the layer's undecayed share) and
    # the estimate's.
    estimate = GptEstimate(hardware=load_hardware("h100-80gb"), num_layers=2, d_model=64, num_heads=4,
                           seq_len=32, vocab_size=256, dtype="fp32",
                           tie_embeddings=tied).at(1, 1, Link(), False)
    unsplit = ModelCosts(layers=tuple(
        LayerCost(forward_s=0.0, backward_s=0.0, activation_bytes=0, output_bytes=0,
                  parameter_bytes=layer.parameter_bytes) for layer in estimate.layers))
    profiled = _with_update_split(unsplit, layers)
    assert [layer.no_decay_parameter_bytes for layer in profiled.layers] == [
        layer.no_decay_parameter_bytes for layer in estimate.layers]
    # And each layer's norm copies: the profile's exact per layer, the estimate's blocks their largest.
    blocks = slice(2, -2)
    assert max(layer.gradient_norm_bytes for layer in profiled.layers[blocks]) == (
        estimate.layers[2].gradient_norm_bytes)
    assert [layer.gradient_norm_bytes for layer in profiled.layers[:2]] + [
        layer.gradient_norm_bytes for layer in profiled.layers[-2:]] == [
        layer.gradient_norm_bytes for layer in (*estimate.layers[:2], *estimate.layers[-2:])]
