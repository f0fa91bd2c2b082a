"""What a step costs beyond its layers, measured in one process (pipefold.runtime.overheads)."""

import math

import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.runtime.overheads import action_overhead, update_seconds_per_byte


def test_action_overhead_is_a_small_non_negative_time_per_action():
    seconds = action_overhead(num_microbatches=4, num_repeats=2)
    assert math.isfinite(seconds) and 0 <= seconds < 0.1
    with pytest.raises(ConfigError, match="num_repeats"):
        action_overhead(num_repeats=0)


def test_update_is_timed_on_copies_and_per_byte():
    layer = nn.Linear(16, 16)
    before = [p.detach().clone() for p in layer.parameters()]
    seconds = update_seconds_per_byte(layer.parameters(), num_repeats=2)
    assert math.isfinite(seconds) and seconds > 0
    for original, kept in zip(layer.parameters(), before, strict=True):
        assert torch.equal(original, kept) and original.grad is None  # the caller's are untouched
    with pytest.raises(ConfigError, match="no floating-point parameters"):
        update_seconds_per_byte([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ConfigError, match="num_repeats"):
        update_seconds_per_byte(layer.parameters(), num_repeats=True)
