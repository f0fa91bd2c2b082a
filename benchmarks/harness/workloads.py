"""The benchmark workloads, built identically for every library from pipefold's model zoo.

    work = workload("transformer")
    layers, (inputs, targets) = work.build_layers(seed=0), work.make_batch(seed=0)

Each workload is a list of exactly 8 layers, so cutting it into 1, 2, 4 or 8 stages is
always an even split and both libraries get the same layers per stage: `mlp` and `tiny`
are `pipefold.model.zoo.ResidualMLP` blocks; `transformer` is the zoo GPT's
`DecoderBlock`s with the embedding fused into layer 0 and the final LayerNorm + head into
layer 7 (docs/decisions.md, "transformer split").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as functional
from torch import nn

from benchmarks.harness.layout import NUM_LAYERS
from pipefold.errors import ConfigError
from pipefold.model.zoo import ResidualMLP, gpt_loss
from pipefold.model.zoo.gpt import DecoderBlock, LMHead, PositionEmbedding, TokenEmbedding

__all__ = ["WORKLOADS", "Workload", "workload"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _embed_then_block(vocab: int, seq_len: int, width: int, num_heads: int) -> nn.Module:
    """Layer 0 of the transformer: token + position embedding, then decoder block 0."""
    return nn.Sequential(
        OrderedDict(
            tokens=TokenEmbedding(vocab, width),
            positions=PositionEmbedding(seq_len, width),
            block=DecoderBlock(width, num_heads, NUM_LAYERS),
        )
    )


def _block_then_head(vocab: int, width: int, num_heads: int) -> nn.Module:
    """Layer 7 of the transformer: decoder block 7, final LayerNorm, then the vocabulary head."""
    return nn.Sequential(
        OrderedDict(
            block=DecoderBlock(width, num_heads, NUM_LAYERS),
            norm=nn.LayerNorm(width),
            head=LMHead(width, vocab),
        )
    )


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
        first = _embed_then_block(self.vocab, self.seq_len, self.width, self.num_heads)
        middle = [DecoderBlock(self.width, self.num_heads, NUM_LAYERS) for _ in range(NUM_LAYERS - 2)]
        last = _block_then_head(self.vocab, self.width, self.num_heads)
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
        return functional.mse_loss if self.kind == "mlp" else gpt_loss

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
