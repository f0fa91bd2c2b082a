"""A module built on the meta device, split, materialized one rank's pieces at a time.

One process plays each rank in turn: it builds the module on meta, splits it and materializes
only the pieces its stages hold (`pipefold.model.build.materialize`, as the pipeline does). The
bytes it then holds fit a budget the whole model exceeds, and every tensor equals the one a
single process materializing everything gets (initialized by the modules' own
`reset_parameters`, or from a state dict). The pipeline on such a module, on 2 ranks:
tests/runtime/test_split_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model.build import materialize
from pipefold.model.split import split

from .split_models import SEQ, VOCAB, Block, NaturalTransformer

EXAMPLE = torch.zeros(2, SEQ, dtype=torch.long)


class Deep(nn.Module):
    """Eight blocks; every tensor belongs to a torch layer with `reset_parameters`."""

    def __init__(self, num_blocks: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        mask = torch.ones(tokens.shape[1], 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def _real_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _whole_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _stages(num_layers: int, num_stages: int) -> list[list[int]]:
    return [chunk.tolist() for chunk in torch.arange(num_layers).chunk(num_stages)]


def _meta_split(points=None, **kwargs):
    with torch.device("meta"):
        model = Deep()
    return model, split(model, split_points=points, example_inputs=(EXAMPLE,), **kwargs)


@pytest.mark.parametrize("points", [None, ["blocks.2", "blocks.4", "blocks.6"]], ids=["blocks", "points"])
def test_each_rank_materializes_only_its_pieces_identically(points):
    reference, layers = _meta_split(points)
    materialize(layers, range(len(layers)), "cpu")  # one process: everything
    expected = dict(reference.state_dict())
    whole = _whole_bytes(reference)
    budget = whole // 2  # one rank's memory: the whole model does not fit
    stages = _stages(len(layers), 4)
    for rank in ([0, 3] if points else range(4)):  # (the graph route is slower to capture)
        model, layers = _meta_split(points)
        assert _real_bytes(model) == 0
        built = materialize(layers, stages[rank], "cpu")
        held = _real_bytes(model)
        assert 0 < held <= budget < whole, (rank, held, budget)
        for layer in built.values():
            for name, global_name in layer.parameter_names().items():
                torch.testing.assert_close(layer.get_parameter(name), expected[global_name], rtol=0, atol=0)
        # The pieces the rank does not run are left on meta.
        assert all(p.is_meta for i, layer in enumerate(layers) if i not in built for p in layer.parameters())


def test_weights_from_a_state_dict_read_per_rank(tmp_path):
    torch.manual_seed(0)
    source = Deep()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, mmap=True)  # a rank reads the pages of its own tensors only
    model, layers = _meta_split(init=state)
    built = materialize(layers, [len(layers) - 2, len(layers) - 1], "cpu")
    assert set(name for layer in built.values() for name in layer.parameter_names().values()) == {
        "blocks.7.norm.weight", "blocks.7.norm.bias", "blocks.7.fc.weight", "blocks.7.fc.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    }
    for layer in built.values():
        for name, global_name in layer.parameter_names().items():
            torch.testing.assert_close(
                layer.get_parameter(name), source.state_dict()[global_name], rtol=0, atol=0
            )
    with pytest.raises(ConfigError, match=r"missing from the state dict"):
        _, layers = _meta_split(init={})
        materialize(layers, [0], "cpu")


def test_a_tensor_without_an_init_is_refused_and_a_custom_init_is_used():
    with torch.device("meta"):
        model = NaturalTransformer()  # `position` is set on the top module: no reset_parameters
    layers = split(model, example_inputs=(EXAMPLE,))
    with pytest.raises(
        ConfigError, match=r"NaturalTransformer at '\(the top module\)' holds \['position'\] .*init="
    ):
        materialize(layers, [0], "cpu")

    def init(path, module):
        if path == "":
            nn.init.normal_(module.position)
        else:
            module.reset_parameters()

    firsts = []
    for _ in range(2):  # two ranks holding the prefix get the same values
        with torch.device("meta"):
            model = NaturalTransformer()
        layers = split(model, example_inputs=(EXAMPLE,), init=init, seed=3)
        materialize(layers, [0], "cpu")
        firsts.append(model.position.detach().clone())
    torch.testing.assert_close(firsts[0], firsts[1], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"weights are already real"):
        split(NaturalTransformer(), example_inputs=(EXAMPLE,), init=init)
