import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.model.spec import TiedLayerSpec
from pipefold.model.zoo import GPT, generate, gpt_layers, gpt_loss
from pipefold.model.zoo.gpt import PositionEmbedding

TINY = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, seq_len=8)


def test_layer_list_layout():
    layers = gpt_layers(**TINY)
    assert len(layers) == TINY["num_layers"] + 4
    first, last = layers[0], layers[-1]
    assert isinstance(first, TiedLayerSpec) and isinstance(last, TiedLayerSpec)
    assert first.key == last.key == "embed"
    assert first.forward_fn is None and last.forward_fn is not None


def test_forward_shapes_and_loss():
    model = GPT.from_layers(gpt_layers(**TINY))
    ids = torch.randint(0, 32, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 32)
    loss = gpt_loss(logits, ids)
    assert loss.shape == ()
    # Small init: the untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(32.0)).item()) < 0.5


def test_head_and_embedding_share_one_weight():
    model = GPT.from_layers(gpt_layers(**TINY))
    names = [name for name, _ in model.blocks.named_parameters()]
    assert "0.weight" in names
    assert not any(name.startswith(f"{len(model.specs) - 1}.") for name in names)
    ids = torch.randint(0, 32, (2, 8))
    gpt_loss(model(ids), ids).backward()
    embedding = model.blocks["0"]
    # The head's use adds gradient to rows of tokens that never appear as inputs.
    unused = sorted(set(range(32)) - set(ids.flatten().tolist()))
    assert unused and embedding.weight.grad[unused].abs().sum() > 0


def test_causal_outputs_do_not_see_the_future():
    model = GPT.from_layers(gpt_layers(**TINY))
    ids = torch.randint(0, 32, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    torch.testing.assert_close(model(ids)[:, :-1], model(changed)[:, :-1])


def test_state_dict_round_trip_and_seeded_init():
    layers = gpt_layers(**TINY)
    source = GPT.from_layers(layers)
    again = GPT(layers)
    expected = dict(source.blocks.named_parameters())
    for name, value in again.blocks.named_parameters():
        torch.testing.assert_close(value, expected[name], msg=name)
    other = GPT(layers, seed=1)
    copy = GPT.from_layers(layers, state_dict=other.blocks.state_dict())
    ids = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(copy(ids), other(ids))


def test_position_embedding_refuses_long_inputs():
    with pytest.raises(ConfigError, match="seq_len=4"):
        PositionEmbedding(4, 2)(torch.zeros(1, 5, 2))


def test_generate_extends_and_crops_context():
    model = GPT.from_layers(gpt_layers(**TINY))
    prompt = torch.tensor([1, 2, 3])
    out = generate(model, prompt, num_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (15,)
    torch.testing.assert_close(out[:3], prompt)
    greedy = generate(model, prompt, num_tokens=4, temperature=0)
    torch.testing.assert_close(greedy, generate(model, prompt, num_tokens=4, temperature=0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"d_model": 10, "num_heads": 3}, "num_heads"), ({"num_layers": 0}, "num_layers")],
)
def test_bad_sizes_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        gpt_layers(**{**TINY, **kwargs})


def test_untied_variant_has_its_own_head():
    layers = gpt_layers(**TINY, tie_embeddings=False)
    assert not any(isinstance(layer, TiedLayerSpec) for layer in layers)
    model = GPT.from_layers(layers)
    names = {name for name, _ in model.blocks.named_parameters()}
    assert f"{len(layers) - 1}.weight" in names
    assert model(torch.randint(0, 32, (2, 8))).shape == (2, 8, 32)
