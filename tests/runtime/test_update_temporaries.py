"""The update's temporaries as torch allocates them, against the plan's formulas
(`pipefold.plan.update_memory`): the profiler's CPU memory events around one gradient norm and
one AdamW step of a small model, as `pipefold train` runs them (its parameter groups, its
gradient norm, its fp32 masters for bf16 weights). Allocation sizes are deterministic.

The foreach path is forced on CPU tensors (`foreach=True`): the code torch runs by default on
CUDA, the same list of square roots. What the formulas leave out is a few bytes of step counters
(under 2 KiB here: `torch.tensor(1.0)` per step and the single-tensor loop's scalars)."""

import pytest
import torch
from torch import nn

from benchmarks.update_temporaries import peak_bytes
from pipefold.cli.profile import _update_fields
from pipefold.job.optim import parameter_groups
from pipefold.model.zoo import gpt_layers
from pipefold.plan.estimate import gpt_parameter_numels
from pipefold.plan.update_memory import gradient_norm_bytes, update_temporaries
from pipefold.runtime.clip import GradientScope
from pipefold.runtime.master import fp32_master_weights

COUNTERS = 2048
"""Bytes the formulas do not count: step counters and scalars."""


def _model(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    # Two matrices of different sizes (decay group), norms and biases (no decay group).
    layers = (nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 96), nn.LayerNorm(96))
    return nn.Sequential(*layers).to(dtype)


def _stepped(model, *, foreach, masters):
    groups = parameter_groups([model], model.parameters(), weight_decay=0.1)
    adamw = fp32_master_weights(torch.optim.AdamW) if masters else torch.optim.AdamW
    optimizer = adamw(groups, lr=1e-3, foreach=foreach)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()  # the state exists from the first step on: the plan counts it apart
    return optimizer


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "bf16-pure"])
def test_adamw_step_allocates_what_the_plan_prices(foreach, masters):
    model = _model(torch.bfloat16 if masters else torch.float32)
    optimizer = _stepped(model, foreach=foreach, masters=masters)
    params = list(model.parameters())
    fields = update_temporaries([p.numel() for p in params], value_bytes=2 if masters else 4,
                                foreach=foreach, masters=masters)
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    per_byte, tensor = fields["update_bytes_per_parameter_byte"], fields["update_tensor_bytes"]
    priced = round(parameter_bytes * per_byte) + tensor
    # What torch allocates, exactly: the groups are separate calls whose temporaries are freed
    # at return. foreach: the larger group's list of fp32 square roots; single-tensor: a
    # parameter's sqrt and denominator beside the previous one's denominator, in its group's order.
    # The plan prices the whole rank's list and the model's two largest tensors (upper bounds).
    groups = [[p.numel() for p in group["params"]] for group in optimizer.param_groups]
    if foreach:
        step = 4 * max(sum(group) for group in groups)
    else:
        step = 4 * max(max(2 * n + (group[i - 1] if i else 0) for i, n in enumerate(group))
                       for group in groups)
    fp32_gradients = 4 * sum(p.numel() for p in params) if masters else 0
    exact = fp32_gradients + step
    measured = peak_bytes(optimizer.step, "cpu")
    assert 0 <= measured - exact < COUNTERS, (measured, exact, priced)
    assert measured <= priced + COUNTERS


def test_gradient_norm_allocates_what_the_plan_prices():
    model = _model()
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    scope = GradientScope(params=tuple(model.parameters()), not_counted=frozenset(), tp_group=None, tp_rank=0,
                          collectives=None, watchdog=None)
    measured = peak_bytes(scope.total_norm, "cpu")
    predicted = gradient_norm_bytes([p.numel() for p in model.parameters()])
    assert 0 <= measured - predicted < COUNTERS, (measured, predicted)


def test_the_estimates_tensors_are_the_built_in_gpts():
    # What `plan --hardware` prices (the FLOP estimate's shapes) and what `plan --profile` reads off
    # the model agree, tied embedding once.
    layers = gpt_layers(256, 64, 4, 2, 32)
    numels = gpt_parameter_numels(2, 64, 32, 256, 1, tied=True)
    assert _update_fields(layers, "cpu", "fp32") == update_temporaries(numels, value_bytes=4, foreach=False,
                                                                        masters=False)
    assert _update_fields(layers, "cuda", "bf16-pure")["update_bytes_per_parameter_byte"] == 4.0
