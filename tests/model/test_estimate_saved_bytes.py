"""`GptEstimate` on a CPU hardware file against what `pipefold profile` measures of the same
built-in GPT under bf16 autocast over fp32 weights: each layer's saved bytes on the model's chain
and from a 16-bit stage input (`activation_bytes_from_boundary`), equal but for what the estimate
leaves out by design (docs/plan.md, "What the estimate prices"): the layer norms' per-token mean and
1/std (fp32, 8 bytes a token each norm) and the fused core's log-sum-exp (fp32, 4 bytes a token a
head)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipefold.model.zoo.gpt import gpt_layers, gpt_loss
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware
from pipefold.runtime import profile
from pipefold.simulate import Link


@pytest.mark.parametrize(("d_model", "heads", "seq_len", "rows"), [(32, 4, 16, 2), (64, 8, 8, 3)])
def test_the_cpu_estimate_saves_what_a_bf16_profile_measures(d_model, heads, seq_len, rows):
    ids = torch.randint(0, 64, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    measured = profile(gpt_layers(64, d_model, heads, 1, seq_len), ids, num_repeats=1, loss_fn=gpt_loss,
                       target=ids, precision="bf16")
    cpu = load_hardware("cpu")
    hardware = replace(cpu, peak_flops={**cpu.peak_flops, "bf16": cpu.peak("fp32")})
    estimate = GptEstimate(num_layers=1, d_model=d_model, num_heads=heads, seq_len=seq_len, vocab_size=64,
                           hardware=hardware, dtype="bf16", parameter_bytes=4)
    priced = estimate.at(rows, 1, Link(), False).layers
    tokens = seq_len * rows
    left_out = {2: (2 * 8 + 4 * heads) * tokens, 3: 8 * tokens, 4: 0}  # block, final norm, head
    for index, extra in left_out.items():
        ours, theirs = priced[index], measured[index]
        assert ours.activation_bytes + extra == theirs.activation_bytes, index
        assert ours.activations_from_boundary + extra == theirs.activation_bytes_from_boundary, index
