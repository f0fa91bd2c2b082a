"""pipefold.split through a graph capture: cut at named points, or around a skip connection.

One process: the pieces applied in order give the module's output and every gradient (at a
batch size other than the example's), keep the module's parameter names, carry what crosses a
cut (a mask, a residual from the embedding to the head); and the refusals name the point and
the fix. Several ranks: tests/runtime/test_split_pipeline.py and test_runtime_exact.py.
"""

from __future__ import annotations

import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.model.split import split
from pipefold.model.split_graph import GraphPiece

from .split_models import (
    HF_VOCAB,
    SEQ,
    SKIP_POINTS,
    VOCAB,
    NaturalTransformer,
    SkipTransformer,
    gpt2_model,
    llama_model,
)

EXAMPLE = torch.zeros(4, SEQ, dtype=torch.long)


def _exact(module, layers):
    """The pieces chained on a batch of 3 rows (the example had 4): output and every gradient."""
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    value = x
    for layer in layers:
        value = layer(value)
    expected = module(x)
    torch.testing.assert_close(value, expected)
    value.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    expected.square().sum().backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, msg=name)


def _names(layers):
    return [sorted(set(layer.parameter_names().values())) for layer in layers]


def _boundaries(layers, x):
    shapes, value = [], x
    for layer in layers[:-1]:
        value = layer(value)
        shapes.append([tuple(t.shape) for t in (value if isinstance(value, tuple) else (value,))])
    return shapes


def test_named_points_cut_before_each_call_and_are_exact():
    torch.manual_seed(0)
    model = NaturalTransformer()
    layers = split(model, split_points=["norm", "blocks.1"], example_inputs=(EXAMPLE,))  # any order
    assert all(isinstance(layer, GraphPiece) for layer in layers)
    assert _names(layers) == [
        ["blocks.0.fc.bias", "blocks.0.fc.weight", "blocks.0.norm.bias", "blocks.0.norm.weight",
         "embed.weight", "position"],
        ["blocks.1.fc.bias", "blocks.1.fc.weight", "blocks.1.norm.bias", "blocks.1.norm.weight",
         "blocks.2.fc.bias", "blocks.2.fc.weight", "blocks.2.norm.bias", "blocks.2.norm.weight"],
        ["embed.weight", "norm.bias", "norm.weight"],  # the head's weight is the embedding's
    ]
    # The mask made in the forward crosses the first cut beside the hidden state.
    assert _boundaries(layers, EXAMPLE[:3]) == [[(SEQ, 1), (3, SEQ, 8)], [(3, SEQ, 8)]]
    _exact(model, layers)


@pytest.mark.parametrize(
    ("make", "points"),
    [
        (gpt2_model, ["transformer.h.2.mlp", "transformer.h.1"]),
        (llama_model, ["model.layers.1", "model.layers.2.self_attn", "model.norm"]),
    ],
    ids=["gpt2", "llama"],
)
def test_hugging_face_models_are_cut_at_named_points_and_give_their_logits(make, points):
    """torch.export of a Hugging Face causal LM called without a key/value cache: the last piece
    returns the logits; the pieces give the model's logits and every gradient bitwise at a batch
    size other than the example's, GPT-2's tied head and Llama's rotary tables included."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = make(3)
    layers = split(model, split_points=points, example_inputs=(torch.zeros(4, SEQ, dtype=torch.long),))
    assert len(layers) == len(points) + 1 and all(isinstance(layer, GraphPiece) for layer in layers)
    assert set().union(*_names(layers)) == {name for name, _ in model.named_parameters()}
    x = torch.randint(0, HF_VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    value = x
    for layer in layers:
        value = layer(value)
    expected = model(x, use_cache=False).logits
    assert torch.equal(value, expected)
    value.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected.square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.equal(grads[name], param.grad), name


def test_a_skip_connection_crosses_every_cut_and_a_cut_may_fall_inside_a_block():
    torch.manual_seed(0)
    model = SkipTransformer()
    layers = split(model, split_points=SKIP_POINTS, example_inputs=(EXAMPLE,))
    assert len(layers) == 4
    assert _names(layers)[:2] == [
        ["blocks.0.norm.bias", "blocks.0.norm.weight", "embed.weight", "position"],
        ["blocks.0.fc.bias", "blocks.0.fc.weight"],
    ]
    # Inside block 0: its input (also the skip), the mask and its normed input cross; before
    # block 1: the skip, the mask and block 0's output; before the norm, only `x + x0`.
    hidden, mask = (3, SEQ, 8), (SEQ, 1)
    assert _boundaries(layers, EXAMPLE[:3]) == [[hidden, mask, hidden], [hidden, mask, hidden], [hidden]]
    _exact(model, layers)
    # Together the pieces hold every entry of the module's state dict (the tied head's under
    # the embedding's name).
    keys = {name for layer in layers for name in layer.parameter_names().values()}
    assert keys == {name for name, _ in model.named_parameters()}


def test_a_skip_connection_around_the_blocks_is_cut_at_each_block_without_split_points():
    torch.manual_seed(0)
    model = SkipTransformer(num_blocks=3)
    layers = split(model, example_inputs=(EXAMPLE,))
    assert [layer.label for layer in layers] == [
        "(start) .. blocks.0", "blocks.0 .. blocks.1", "blocks.1 .. blocks.2", "blocks.2 .. blocks.2",
        "blocks.2 .. (end)",
    ]
    assert _names(layers)[4] == ["embed.weight", "norm.bias", "norm.weight"]
    _exact(model, layers)


def test_a_module_on_the_meta_device_is_captured_without_memory():
    with torch.device("meta"):
        model = SkipTransformer(num_blocks=4)
    layers = split(model, split_points=["blocks.2"], example_inputs=(EXAMPLE,))
    assert len(layers) == 2
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    out = layers[1](layers[0](torch.zeros(3, SEQ, dtype=torch.long, device="meta")))
    assert out.shape == (3, SEQ, VOCAB)


class BlockTwice(NaturalTransformer):
    def forward(self, tokens):
        x = self.embed(tokens)
        mask = torch.ones(tokens.shape[1], 1)
        for block in [*self.blocks, self.blocks[0]]:
            x = block(x, mask)
        return self.head(x)


class Branches(NaturalTransformer):
    def forward(self, tokens):
        x = self.embed(tokens)
        if x.sum() > 0:  # data-dependent control flow
            x = self.blocks[0](x, 1.0)
        return self.head(x)


def test_refusals_name_the_point_and_the_fix():
    model = NaturalTransformer()
    no_module = r"'blocks\.9' names no submodule of NaturalTransformer; did you mean"
    with pytest.raises(ConfigError, match=no_module):
        split(model, split_points=["blocks.9"], example_inputs=(EXAMPLE,))
    never_called = r"'blocks' is a submodule that .* never calls .*name one of its modules"
    with pytest.raises(ConfigError, match=never_called):
        split(model, split_points=["blocks"], example_inputs=(EXAMPLE,))
    empty = r"nothing is computed between split points 'blocks\.1' and 'blocks\.1\.norm'"
    with pytest.raises(ConfigError, match=empty):
        split(model, split_points=["blocks.1", "blocks.1.norm"], example_inputs=(EXAMPLE,))
    for point in ["blocks.0", "blocks.0.fc"]:  # the module, or a point inside it, used twice
        twice = rf"'{point}' is called 2 times in one forward .*cut at a module called once"
        with pytest.raises(ConfigError, match=twice):
            split(BlockTwice(), split_points=[point], example_inputs=(EXAMPLE,))
    branches = r"Branches.forward branches on a tensor's value .*split without split_points"
    with pytest.raises(ConfigError, match=branches):
        split(Branches(), split_points=["head"], example_inputs=(EXAMPLE,))
    with pytest.raises(ConfigError, match=r"give a non-empty list"):
        split(model, split_points="blocks.1", example_inputs=(EXAMPLE,))
    with pytest.raises(ConfigError, match=r"no repeated blocks .*give split_points="):
        split(torch.nn.Linear(2, 2), example_inputs=(torch.zeros(1, 2),))
    layers = split(model, split_points=["blocks.1"], example_inputs=(EXAMPLE,))
    shape = r"input 0 has shape \(3, 6\), but the graph was captured for \('batch', 5\)"
    with pytest.raises(ConfigError, match=shape):
        layers[0](torch.zeros(3, SEQ + 1, dtype=torch.long))
