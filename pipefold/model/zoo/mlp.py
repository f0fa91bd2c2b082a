"""A stack of residual MLP blocks described as a list of layers.

    layers = mlp_layers(width=512, num_layers=8)     # pipefold.Pipeline(layers, loss_fn=F.mse_loss, ...)

Each block is x + fc2(gelu(fc1(layernorm(x)))) with the hidden width equal to the model
width, so every layer costs the same and any even cut balances: the simplest model to
pipeline, and the benchmark's MLP workload.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.model.spec import LayerSpec

__all__ = ["ResidualMLP", "mlp_layers"]


class ResidualMLP(nn.Module):
    """x + fc2(gelu(fc1(layernorm(x)))), hidden width equal to the model width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return out


def mlp_layers(width: int, num_layers: int) -> list[LayerSpec]:
    """`num_layers` lazily built `ResidualMLP(width)` blocks; inputs and outputs are (B, width)."""
    for name, value in (("width", width), ("num_layers", num_layers)):
        if value < 1:
            raise ConfigError(f"mlp_layers: {name} must be >= 1; got {value}")
    return [LayerSpec(ResidualMLP, width) for _ in range(num_layers)]
