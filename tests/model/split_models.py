"""Modules for `pipefold.split`, shared by the one-process tests (tests/model/test_split.py) and
the pipelines that run them on several ranks (tests/runtime/test_split_pipeline.py).

A transformer written the natural way (an embedding, a parameter on the top module, a mask made
in the forward, a ModuleList of blocks, a final norm and a head tied to the embedding), one with
a skip connection around its blocks (cut through a graph capture), and tiny
Hugging Face GPT-2 (tied head) and Llama (rotary tables) built from configs, no downloads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB, DIM, SEQ = 13, 8, 5


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, mask=None, scale=1.0):
        return x + self.fc(self.norm(x)) * mask * scale


class NaturalTransformer(nn.Module):
    """An embedding, a ModuleList of blocks, a final norm and a head tied to the embedding."""

    def __init__(self, num_blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(torch.randn(16, DIM))
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = torch.ones(tokens.shape[1], 1)
        for block in self.blocks:
            x = block(x, mask, scale=0.5)
        return self.head(self.norm(x))


class SkipTransformer(nn.Module):
    """A skip connection around all the blocks (`head(norm(x + x0))`): the embedding's output
    crosses every cut between them. Not a chain of module calls after the blocks, so `split`
    cuts it through a graph capture; the head is tied to the embedding."""

    def __init__(self, num_blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(torch.randn(16, DIM))
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x0 = x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = torch.ones(tokens.shape[1], 1)
        for block in self.blocks:
            x = block(x, mask, scale=0.5)
        return self.head(self.norm(x + x0))


SKIP_POINTS = ["blocks.0.fc", "blocks.1", "norm"]
"""Four pieces of a SkipTransformer: one cut inside a block, the skip crossing all three."""


HF_VOCAB = 50
"""Token ids of the Hugging Face models are below this."""


def _transformers() -> Any:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2_model(num_layers: int = 3) -> nn.Module:
    """A GPT2LMHeadModel whose `lm_head.weight` is `transformer.wte.weight` (no dropout)."""
    hf = _transformers()
    config = hf.GPT2Config(
        vocab_size=HF_VOCAB, n_positions=16, n_embd=16, n_layer=num_layers, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return hf.GPT2LMHeadModel(config)


def llama_model(num_layers: int = 3, num_heads: int = 2, num_kv_heads: int = 1) -> nn.Module:
    """A LlamaForCausalLM (grouped-query attention, rotary tables carried between blocks)."""
    hf = _transformers()
    config = hf.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=16,
    )
    return hf.LlamaForCausalLM(config)
