"""The benchmark workloads, built identically for every library.

Each workload is a list of exactly 8 layers, so cutting it into 1, 2, 4 or 8 stages is
always an even split and both libraries get the same layers per stage.

[Note: transformer split]
The transformer has 8 pre-LN blocks plus a token embedding and an output head. Rather
than make the embedding and head stages of their own (10 layers that do not divide
evenly into 4 or 8 stages, and two near-empty stages), the embedding is fused into layer
0 and the final LayerNorm + head into layer 7. Both libraries therefore see the same 8
layers, the first stage owns the embedding and the last stage owns the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as functional
from torch import nn

from pipefold.bench.layout import NUM_LAYERS
from pipefold.errors import ConfigError

__all__ = ["WORKLOADS", "Workload", "workload"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ResidualMLP(nn.Module):
    """x + fc2(gelu(fc1(layernorm(x)))), hidden width equal to the model width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.fc2(functional.gelu(self.fc1(self.norm(x))))
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return out


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)) with a 4x hidden width."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, num_heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.fc2(functional.gelu(self.fc1(self.ln2(x))))
        return out


class EmbedThenBlock(nn.Module):
    """Layer 0 of the transformer: token + position embedding, then block 0."""

    def __init__(self, vocab: int, seq_len: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.block = TransformerBlock(width, num_heads)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(self.tokens(token_ids) + self.positions[: token_ids.shape[1]])
        return out


class BlockThenHead(nn.Module):
    """Layer 7 of the transformer: block 7, final LayerNorm, then the vocabulary head."""

    def __init__(self, vocab: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.block = TransformerBlock(width, num_heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.norm(self.block(x)))
        return out


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token of the micro-batch."""
    return functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass(frozen=True)
class Workload:
    """A model (8 layers), its seeded data and its loss, the same for every library."""

    name: str
    kind: Literal["mlp", "transformer"]
    description: str
    batch_size: int
    width: int
    seq_len: int = 0
    vocab: int = 0
    num_heads: int = 0

    def build_layers(self, seed: int = 0) -> list[nn.Module]:
        """The 8 layers, initialized from `seed` (every rank and library builds the same)."""
        torch.manual_seed(seed)
        if self.kind == "mlp":
            return [ResidualMLP(self.width) for _ in range(NUM_LAYERS)]
        first = EmbedThenBlock(self.vocab, self.seq_len, self.width, self.num_heads)
        middle = [TransformerBlock(self.width, self.num_heads) for _ in range(NUM_LAYERS - 2)]
        last = BlockThenHead(self.vocab, self.width, self.num_heads)
        return [first, *middle, last]

    def make_batch(self, seed: int = 0, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the global batch, from a private generator seeded by `seed`."""
        size = self.batch_size if batch_size is None else batch_size
        generator = torch.Generator().manual_seed(10_000 + seed)
        if self.kind == "mlp":
            inputs = torch.randn(size, self.width, generator=generator)
            targets = torch.randn(size, self.width, generator=generator)
            return inputs, targets
        tokens = torch.randint(0, self.vocab, (size, self.seq_len + 1), generator=generator)
        # Next-token prediction: the target is the input shifted by one position.
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    @property
    def loss_fn(self) -> LossFn:
        return functional.mse_loss if self.kind == "mlp" else token_cross_entropy

    def num_parameters(self) -> int:
        return sum(p.numel() for layer in self.build_layers() for p in layer.parameters())


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(
        name="mlp",
        kind="mlp",
        description="8 residual MLP blocks, d=512, MSE loss, global batch 256",
        batch_size=256,
        width=512,
    ),
    "transformer": Workload(
        name="transformer",
        kind="transformer",
        description=(
            "8 pre-LN transformer blocks, d=256, 4 heads, seq 128, vocab 1024, cross-entropy, "
            "global batch 16; embedding fused into layer 0, final LayerNorm + head into layer 7"
        ),
        batch_size=16,
        width=256,
        seq_len=128,
        vocab=1024,
        num_heads=4,
    ),
    # Tiny tensors and one sample per micro-batch: the step time is almost all per-action
    # overhead (dispatch, send/recv, bookkeeping), which is what this workload measures.
    "tiny": Workload(
        name="tiny",
        kind="mlp",
        description="8 residual MLP blocks, d=8, MSE loss, one sample per micro-batch (overhead probe)",
        batch_size=64,
        width=8,
    ),
}


def workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ConfigError(
            f"workload={name!r} is not a benchmark workload; choose one of {', '.join(WORKLOADS)}"
        ) from None
