import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import LayerSpec, TensorMeta, meta_layers, partition, trace_boundaries
from pipefold.runtime import profile

from .models import VOCAB, WIDTH, token_ids, transformer


def test_profile_of_an_mlp():
    layers = [LayerSpec(nn.Linear, 3, 5), LayerSpec(nn.ReLU), LayerSpec(nn.Linear, 5, 2)]
    result = profile(layers, torch.zeros(4, 3), num_repeats=2)
    assert len(result) == 3
    for layer in result:
        assert layer.forward_s > 0 and layer.backward_s > 0
    assert [p.parameter_bytes for p in result] == [(3 * 5 + 5) * 4, 0, (5 * 2 + 2) * 4]
    # Linear saves its input (the weight is a parameter, not an activation); ReLU saves its output.
    assert [p.activation_bytes for p in result] == [4 * 3 * 4, 4 * 5 * 4, 4 * 5 * 4]
    assert [p.output for p in result] == trace_boundaries(layers, torch.zeros(4, 3))


def test_profile_of_a_tuple_transformer_counts_tied_bytes_at_each_occurrence():
    layers = transformer(num_blocks=1)
    ids = token_ids(batch=2)
    result = profile(layers, ids, num_repeats=1)
    meta = meta_layers(layers)
    for layer, module in zip(result, meta, strict=True):
        assert layer.parameter_bytes == sum(p.numel() * p.element_size() for p in module.parameters())
        assert layer.forward_s > 0 and layer.backward_s > 0
    assert result[0].parameter_bytes == result[-1].parameter_bytes == VOCAB * WIDTH * 4
    assert result[0].output == TensorMeta(((2, 4, WIDTH), (2, 4)), (torch.float32, torch.bool), True)


def test_layers_without_gradients_have_no_backward_time():
    class Shift(nn.Module):
        def forward(self, ids):
            return ids + 1

    result = profile([Shift(), nn.Embedding(12, 3)], token_ids(batch=2), num_repeats=1)
    assert result[0].backward_s == 0.0 and result[0].forward_s > 0
    assert result[1].backward_s > 0


def test_profile_leaves_modules_and_rng_untouched():
    plain = nn.Linear(3, 3)
    before = plain.weight.detach().clone()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    profile([plain, nn.Dropout(0.5)], torch.ones(2, 3), num_repeats=1)
    assert torch.equal(torch.rand(2), expected)
    assert plain.weight.grad is None and torch.equal(plain.weight, before)


@pytest.mark.parametrize("num_repeats", [0, -1, 1.5, True])
def test_num_repeats_must_be_a_positive_integer(num_repeats):
    with pytest.raises(ConfigError, match=f"num_repeats = {num_repeats!r}"):
        profile([nn.ReLU()], torch.zeros(1), num_repeats=num_repeats)


def test_sample_must_be_tensors():
    with pytest.raises(ConfigError, match="sample must be a tensor"):
        profile([nn.ReLU()], [1.0])


def test_profile_method_partitions_by_measured_costs():
    layers = [LayerSpec(nn.Linear, 4, 4) for _ in range(3)]
    costs = [p.total_s for p in profile(layers, torch.zeros(2, 4))]
    assert all(cost > 0 for cost in costs)
    cut = partition(layers, 3, "profile", costs=costs)
    assert str(cut) == "[0:1 | 1:2 | 2:3]"


def test_loss_saved_tensors_count_on_the_last_layer():
    # Cross-entropy keeps its log-probabilities (as large as the logits, fp32) and the targets:
    # the last stage holds them per micro-batch in flight, so the profile counts them there.
    layers = [LayerSpec(nn.Linear, 3, 5), LayerSpec(nn.Linear, 5, 7)]
    sample, target = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    plain = profile(layers, sample, num_repeats=1)
    with_loss = profile(layers, sample, num_repeats=1, loss_fn=nn.functional.cross_entropy, target=target)
    assert [p.activation_bytes for p in with_loss] == [p.activation_bytes for p in plain]
    assert plain[1].loss_bytes == with_loss[0].loss_bytes == 0
    extra = with_loss[1].loss_bytes
    assert 4 * 7 * 4 + target.nbytes <= extra <= 4 * 7 * 4 + target.nbytes + 16


def test_loss_fn_needs_a_target():
    with pytest.raises(ConfigError, match="loss_fn and target go together"):
        profile([nn.Linear(3, 3)], torch.zeros(2, 3), num_repeats=1, loss_fn=nn.functional.cross_entropy)
