"""Tiny model descriptions shared by the model tests (a few hundred parameters each)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipefold.model import LayerSpec, TiedLayerSpec

VOCAB = 11
WIDTH = 6


class Embed(nn.Module):
    """Token ids -> (hidden, attention_mask): the mask marks non-padding tokens (id 0 is padding)."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, width))

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.weight[ids], ids != 0


class Block(nn.Module):
    """Masked single-head self-attention + MLP; takes and returns (hidden, mask)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp = nn.Linear(width, width)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        hidden, mask = inputs
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, :], float("-inf"))
        hidden = hidden + scores.softmax(-1) @ v
        return hidden + self.mlp(hidden).relu(), mask


class Final(nn.Module):
    """(hidden, mask) -> hidden with padding zeroed."""

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        hidden, mask = inputs
        return hidden * mask[..., None]


def tied_head(embed: nn.Module, hidden: Any) -> Tensor:
    weight = embed.weight
    assert isinstance(weight, Tensor)
    return hidden @ weight.T


def transformer(num_blocks: int = 2) -> list[LayerSpec]:
    return [
        TiedLayerSpec("embed", Embed, VOCAB, WIDTH),
        *[LayerSpec(Block, WIDTH) for _ in range(num_blocks)],
        LayerSpec(Final),
        TiedLayerSpec("embed", Embed, VOCAB, WIDTH, forward_fn=tied_head),
    ]


def mlp(num_hidden: int = 3, width: int = 5) -> list[LayerSpec]:
    layers: list[LayerSpec] = [LayerSpec(nn.Linear, 3, width)]
    for _ in range(num_hidden):
        layers += [LayerSpec(nn.ReLU), LayerSpec(nn.Linear, width, width)]
    return layers


def token_ids(batch: int, seq: int = 4, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    ids[:, -1] = 0  # one padding position, so the mask is not all-true
    return ids
