"""pipefold.split: a module cut at its blocks runs, piece by piece, exactly as the module.

One process: the pieces applied in order give the module's output and every gradient,
for a transformer written the natural way (tied head, a parameter on the top module, a
mask made in the forward), Hugging Face GPT-2 and Llama; and the refusals name the module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model.build import meta_layers, named_parameters, shared_parameters
from pipefold.model.split import SplitPiece, find_blocks, split

from .split_models import DIM, SEQ, VOCAB, NaturalTransformer, gpt2_model, llama_model


def _run(layers, x):
    value = x
    for layer in layers:
        value = layer(value)
    return value


def _assert_exact(module, x, reference_forward=None):
    layers = split(module, example_inputs=(x,))
    out = _run(layers, x)
    expected = (reference_forward or module)(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    piece_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    (reference_forward or module)(x).square().sum().backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(piece_grads[name], param.grad, msg=name)
    return layers


def _names(layers):
    names = {}
    for layer in layers:
        names.update({global_name: layer.kind for global_name in layer.parameter_names().values()})
    return names


def test_natural_transformer_is_exact_and_keeps_its_names():
    torch.manual_seed(0)
    model = NaturalTransformer()
    x = torch.randint(0, VOCAB, (2, SEQ))
    layers = _assert_exact(model, x)
    assert [layer.kind for layer in layers] == ["prefix", "block", "block", "block", "suffix"]
    assert all(isinstance(layer, SplitPiece) for layer in layers)
    assert set(_names(layers)) == {name for name, _ in model.named_parameters()}
    # The head's weight is the embedding's: one parameter, named as the module names it.
    assert layers[-1].parameter_names()["head.weight"] == "embed.weight"
    assert layers[0].parameter_names()["position"] == "position"


def test_shared_parameters_are_found_across_layers():
    """A parameter held by two layers (a tied embedding and head) must be tied by the
    pipeline or it trains two diverging copies: found for split pieces and plain lists."""
    model = NaturalTransformer()
    layers = split(model, example_inputs=(torch.zeros(2, SEQ, dtype=torch.long),))
    assert shared_parameters(layers, meta_layers(layers)) == {"embed.weight": (0, 4)}
    # Every holder names it the same, whichever pieces a rank holds.
    assert sorted(name for name, _ in named_parameters(layers, {4: layers[4]})) == [
        "embed.weight", "norm.bias", "norm.weight"
    ]
    embed, head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False)
    head.weight = embed.weight
    plain = [embed, nn.Linear(DIM, DIM), head]
    assert shared_parameters(plain, meta_layers(plain)) == {"0.weight": (0, 2)}
    assert shared_parameters(plain[:2], meta_layers(plain[:2])) == {}
    # Two LayerSpecs given one parameter hold it as one, found the same way.
    from pipefold.model import LayerSpec

    weight = nn.Parameter(torch.randn(DIM, DIM))
    specs = [LayerSpec(Scale, weight), LayerSpec(nn.Tanh), LayerSpec(Scale, weight)]
    assert shared_parameters(specs, meta_layers(specs)) == {"0.weight": (0, 2)}
    assert weight.device.type == "cpu"


class Scale(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight


def test_blocks_are_the_largest_repeated_list():
    model = NaturalTransformer()
    path, blocks = find_blocks(model)
    assert path == "blocks" and len(blocks) == 3
    assert find_blocks(nn.Linear(2, 2)) is None


class BlockTwice(NaturalTransformer):
    def forward(self, tokens):
        x = self.embed(tokens)
        mask = torch.ones(tokens.shape[1], 1)
        for block in [*self.blocks, self.blocks[0]]:
            x = block(x, mask)
        return self.head(x)


def test_refusals_name_the_module_and_the_reason():
    x = torch.randint(0, VOCAB, (2, SEQ))
    with pytest.raises(ConfigError, match=r"BlockTwice.forward called its blocks as .*two depths"):
        split(BlockTwice(), example_inputs=(x,))
    with pytest.raises(ConfigError, match=r"Linear has no repeated blocks"):
        split(nn.Linear(2, 2), example_inputs=(torch.zeros(1, 2),))
    with pytest.raises(ConfigError, match=r"give example_inputs"):
        split(NaturalTransformer())


def test_a_changed_constant_is_refused_at_run_time():
    class Scaled(NaturalTransformer):
        def forward(self, tokens):
            x = self.embed(tokens)
            mask = torch.ones(tokens.shape[1], 1)
            for block in self.blocks:
                x = block(x, mask, scale=float(tokens.shape[0]))
            return self.head(self.norm(x))

    model = Scaled()
    layers = split(model, example_inputs=(torch.zeros(2, SEQ, dtype=torch.long),))
    with pytest.raises(ConfigError, match=r"changed from 2.0 at split time to 3.0"):
        layers[0](torch.zeros(3, SEQ, dtype=torch.long))


def test_a_module_on_the_meta_device_splits_without_memory():
    with torch.device("meta"):
        model = NaturalTransformer(num_blocks=4)
    layers = split(model, example_inputs=(torch.zeros(2, SEQ, dtype=torch.long),))
    assert len(layers) == 6
    assert all(p.is_meta for layer in layers for p in layer.parameters())


hf = pytest.importorskip("transformers")


def _quiet():
    warnings.filterwarnings("ignore")
    hf.logging.set_verbosity_error()


def test_hugging_face_gpt2_is_exact_with_its_tied_head():
    _quiet()
    torch.manual_seed(0)
    model = gpt2_model()
    x = torch.randint(0, 50, (2, 7))
    layers = _assert_exact(model, x, lambda t: model(t, use_cache=False).logits)
    assert [layer.paths for layer in layers][0] == ("transformer.wte", "transformer.wpe", "transformer.drop")
    assert layers[-1].parameter_names()["lm_head.weight"] == "transformer.wte.weight"
    assert set(_names(layers)) == {name for name, _ in model.named_parameters()}


def test_hugging_face_llama_is_exact_with_rotary_tables_carried():
    _quiet()
    torch.manual_seed(0)
    model = llama_model()
    x = torch.randint(0, 50, (2, 7))
    layers = _assert_exact(model, x, lambda t: model(t, use_cache=False).logits)
    boundary = layers[0](x)
    # hidden state, position ids and the rotary cos/sin tables cross each block boundary
    assert isinstance(boundary, tuple) and boundary[0].shape == (2, 7, 16) and len(boundary) >= 3
    assert set(_names(layers)) == {name for name, _ in model.named_parameters()}


def test_a_layer_spec_returning_a_built_module_is_refused_saying_what_to_pass():
    from pipefold.model import LayerSpec

    built = nn.Linear(DIM, DIM)
    with pytest.raises(ConfigError, match=r"returned an already-built Linear .*Pass the built module itself"):
        meta_layers([LayerSpec(lambda: built), LayerSpec(nn.Linear, DIM, DIM)])
    assert built.weight.device.type == "cpu"  # left where it was
    # A factory that builds a new module on each call is fine, even one that ignores the device.
    assert len(meta_layers([LayerSpec(lambda: nn.Linear(DIM, DIM, device="cpu"))])) == 1


def test_split_is_exported_at_the_top():
    import pipefold
    import pipefold.model

    assert pipefold.split is split and pipefold.model.split is split
