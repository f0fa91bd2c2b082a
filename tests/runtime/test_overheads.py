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


def test_the_update_is_timed_as_each_precision_runs_it():
    layer = nn.Linear(16, 16)
    for precision in ("bf16", "fp16", "bf16-pure"):
        seconds = update_seconds_per_byte(layer.parameters(), num_repeats=1, precision=precision)
        assert math.isfinite(seconds) and seconds > 0
    assert all(p.dtype == torch.float32 and p.grad is None for p in layer.parameters())
    with pytest.raises(ConfigError, match="precision = 'fp8'"):
        update_seconds_per_byte(layer.parameters(), precision="fp8")


def test_pure_bf16_updates_bf16_weights_through_fp32_masters(monkeypatch):
    import pipefold.runtime.overheads as overheads

    made: list[set[torch.dtype]] = []
    real = overheads.fp32_master_weights

    def spy(optimizer_class):
        class Spied(real(optimizer_class)):
            def __init__(self, params, **options):
                params = list(params)
                made.append({p.dtype for p in params})
                super().__init__(params, **options)

        return Spied

    monkeypatch.setattr(overheads, "fp32_master_weights", spy)
    layer = nn.Linear(16, 16)
    fp32 = update_seconds_per_byte(layer.parameters(), num_repeats=1)
    assert made == [] and fp32 > 0  # fp32 (and bf16, fp16): AdamW on the fp32 weights
    update_seconds_per_byte(layer.parameters(), num_repeats=1, precision="bf16-pure")
    assert made == [{torch.bfloat16}]  # bf16 weights, stepped through their fp32 masters
