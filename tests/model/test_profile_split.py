"""`profile(..., split_backward=True)`: the I/W split of each layer's backward, and its use in ModelCosts."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipefold.model import LayerSpec
from pipefold.model.zoo import gpt_layers
from pipefold.plan import ModelCosts
from pipefold.runtime import profile

from .models import token_ids, transformer


@pytest.fixture(scope="module")
def tiny_gpt_profile():
    layers = gpt_layers(vocab_size=32, d_model=16, num_heads=2, num_layers=2, seq_len=8)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    return profile(layers, ids, num_repeats=3, split_backward=True)


def test_without_the_flag_no_split_is_reported():
    result = profile([nn.Linear(3, 2)], torch.zeros(4, 3), num_repeats=1)
    assert result[0].input_grad_s is None and result[0].weight_grad_s is None


def test_every_layer_of_a_gpt_gets_a_positive_split(tiny_gpt_profile):
    # Only signs: how I + W compares with B is a timing, which a loaded host moves by 40x even
    # in medians of 9 (benchmarks/, not unit tests, measure it).
    for layer in tiny_gpt_profile:
        assert layer.backward_s > 0
        assert layer.input_grad_s > 0 and layer.weight_grad_s > 0


def test_tuple_boundaries_and_a_tied_head_split_too():
    result = profile(transformer(num_blocks=1), token_ids(batch=2), num_repeats=1, split_backward=True)
    assert all(layer.weight_grad_s > 0 for layer in result)
    # Token ids need no gradient, so the embedding's I has nothing to compute; the others do.
    assert all(layer.input_grad_s > 0 for layer in result[1:])


def test_a_layer_without_backward_splits_into_zeros():
    class Shift(nn.Module):
        def forward(self, ids):
            return ids + 1

    result = profile([Shift(), nn.Embedding(12, 3)], token_ids(batch=2), num_repeats=1, split_backward=True)
    assert (result[0].input_grad_s, result[0].weight_grad_s) == (0.0, 0.0)
    assert result[1].weight_grad_s > 0


def test_split_leaves_modules_and_gradients_untouched():
    plain = nn.Linear(3, 3)
    before = plain.weight.detach().clone()
    profile([plain, LayerSpec(nn.Linear, 3, 1)], torch.ones(2, 3), num_repeats=2, split_backward=True)
    assert plain.weight.grad is None and plain.bias.grad is None
    assert torch.equal(plain.weight, before)


def test_model_costs_split_each_backward_by_the_measured_share(tiny_gpt_profile):
    costs = ModelCosts.from_profile(tiny_gpt_profile, rows=2)
    for layer, measured in zip(costs.layers, tiny_gpt_profile, strict=True):
        share = measured.weight_grad_s / (measured.input_grad_s + measured.weight_grad_s)
        assert layer.backward_s == measured.backward_s
        assert layer.weight_s == pytest.approx(measured.backward_s * share)
        assert layer.input_s + layer.weight_s == pytest.approx(measured.backward_s)
    # An explicit share still wins over the measured one.
    even = ModelCosts.from_profile(tiny_gpt_profile, rows=2, weight_grad_share=0.25)
    assert [layer.weight_s for layer in even.layers] == [p.backward_s * 0.25 for p in tiny_gpt_profile]


def _fake(input_s, weight_s, backward_s=4.0):
    output = SimpleNamespace(num_bytes=8)
    fields = {"forward_s": 1.0, "backward_s": backward_s, "activation_bytes": 16, "parameter_bytes": 32,
              "output": output}
    if input_s is not None or weight_s is not None:
        fields.update(input_grad_s=input_s, weight_grad_s=weight_s)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    ("input_s", "weight_s", "expected_w"),
    [
        (1.0, 3.0, 3.0),  # 75% of the measured I + W is W: 75% of B
        (3.0, 3.0, 2.0),  # I + W = 6 > B = 4: the share, not the sum, is kept
        (0.0, 2.0, 4.0),  # no input gradient (the first layer): all of B is W
        (None, None, 2.0),  # no split measured (an older profile): halves
        (0.0, 0.0, 2.0),  # nothing measured: halves
    ],
)
def test_from_profile_reads_a_duck_typed_split(input_s, weight_s, expected_w):
    costs = ModelCosts.from_profile([_fake(input_s, weight_s)], rows=1)
    assert costs.layers[0].weight_s == pytest.approx(expected_w)
    assert costs.layers[0].backward_s == 4.0
