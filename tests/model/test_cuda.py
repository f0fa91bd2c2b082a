"""The model helpers on a GPU: weights independent of the device, timings that wait for the kernels."""

import pytest
import torch
from torch import nn

from pipefold.model import LayerSpec, build_reference, materialize, trace_boundaries
from pipefold.runtime import profile

from .models import token_ids, transformer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_materialize_on_gpu_matches_the_cpu_reference():
    layers = transformer(num_blocks=2)
    reference = build_reference(layers, "cpu", seed=3)
    built = materialize(layers, [0, 2, 4], "cuda", seed=3)
    assert built[0] is built[4]
    for index, module in built.items():
        assert all(p.is_cuda for p in module.parameters())
        for (name, a), (_, b) in zip(
            module.state_dict().items(), reference[index].state_dict().items(), strict=True
        ):
            assert torch.equal(a.cpu(), b), (index, name)


def test_init_on_gpu_leaves_the_gpu_rng_alone():
    torch.cuda.manual_seed(9)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(9)
    a = materialize([LayerSpec(nn.Linear, 4, 4)], [0], "cuda", init_device=None)[0]
    b = materialize([LayerSpec(nn.Linear, 4, 4)], [0], "cuda", init_device=None)[0]
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    assert a.weight.is_cuda and torch.equal(a.weight, b.weight)


def test_reference_on_gpu_runs_and_matches_the_trace():
    layers = transformer(num_blocks=1)
    model = build_reference(layers, "cuda")
    ids = token_ids(batch=3).cuda()
    logits = model(ids)
    assert trace_boundaries(layers, ids)[-1].mismatch(logits) is None
    assert logits.is_cuda


def test_profile_on_gpu():
    layers = [LayerSpec(nn.Linear, 64, 64), LayerSpec(nn.ReLU), LayerSpec(nn.Linear, 64, 8)]
    result = profile(layers, torch.zeros(16, 64), device="cuda", num_repeats=3)
    assert all(p.forward_s > 0 and p.backward_s > 0 for p in result)
    assert [p.parameter_bytes for p in result] == [(64 * 64 + 64) * 4, 0, (64 * 8 + 8) * 4]
    assert [p.activation_bytes for p in result] == [16 * 64 * 4, 16 * 64 * 4, 16 * 64 * 4]
