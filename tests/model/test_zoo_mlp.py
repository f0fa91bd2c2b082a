"""The zoo's residual MLP stack."""

import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model.zoo import ResidualMLP, mlp_layers


def test_layers_build_residual_blocks_of_the_width():
    layers = [spec.build() for spec in mlp_layers(width=8, num_layers=3)]
    assert len(layers) == 3 and all(isinstance(layer, ResidualMLP) for layer in layers)
    x = torch.randn(5, 8)
    assert nn.Sequential(*layers)(x).shape == (5, 8)


def test_block_is_residual():
    block = ResidualMLP(4)
    nn.init.zeros_(block.fc2.weight)
    nn.init.zeros_(block.fc2.bias)
    x = torch.randn(2, 4)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("kwargs", [dict(width=0, num_layers=2), dict(width=4, num_layers=0)])
def test_refuses_empty_sizes(kwargs):
    with pytest.raises(ConfigError, match="must be >= 1"):
        mlp_layers(**kwargs)
