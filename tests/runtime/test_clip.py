"""Gradient clipping in one process: `Pipeline.clip_grad_norm_` equals torch's on the same model,
and bad arguments are refused by name. The multi-rank layouts are in test_training.py."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import _batch, _loss_fn, transformer

from pipefold.errors import ConfigError, NonFiniteLoss
from pipefold.model import build_reference
from pipefold.runtime import LayoutOptions, Pipeline


def _pipe() -> Pipeline:
    return Pipeline(
        transformer(), loss_fn=_loss_fn("transformer"), schedule="gpipe", num_microbatches=2,
        layout=LayoutOptions(seed=7),
    )


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_one_process_equals_torch(norm_type):
    pipe = _pipe()
    reference = build_reference(transformer(), seed=7)
    inputs, targets = _batch("transformer", 6, seed=0)
    pipe.step(inputs, targets)
    _loss_fn("transformer")(reference(inputs), targets).backward()
    norm = pipe.clip_grad_norm_(0.1, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1, norm_type)
    torch.testing.assert_close(norm, expected.item())
    params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad)


@pytest.mark.parametrize(
    ("max_norm", "norm_type", "field"),
    [(0.0, 2.0, "max_norm"), (-1, 2.0, "max_norm"), (1.0, 0.5, "norm_type"), (True, 2.0, "max_norm")],
)
def test_bad_arguments_refused(max_norm, norm_type, field):
    with pytest.raises(ConfigError, match=field):
        _pipe().clip_grad_norm_(max_norm, norm_type)


def test_nonfinite_norm():
    pipe = _pipe()
    inputs, targets = _batch("transformer", 6, seed=0)
    pipe.step(inputs, targets)
    next(pipe.parameters()).grad[0, 0] = float("nan")
    assert math.isnan(pipe.clip_grad_norm_(1.0))
    with pytest.raises(NonFiniteLoss, match="gradient norm"):
        pipe.clip_grad_norm_(1.0, error_if_nonfinite=True)
