"""A tiny Hugging Face decoder split as `pipefold train --model` splits it, and its per-layer
profile: what the HF estimate's tests measure it against (`pipefold.plan.hf_estimate`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipefold.runtime import profile


def gpt2_config(*, width: int, seq_len: int, vocab: int) -> dict[str, Any]:
    """A two-block GPT-2 config.json of `width` with four heads."""
    return {"model_type": "gpt2", "n_layer": 2, "n_embd": width, "n_head": 4, "vocab_size": vocab,
            "n_positions": seq_len}


def llama_config(*, width: int, seq_len: int, vocab: int, **extra: Any) -> dict[str, Any]:
    """A two-block Llama config.json of `width` (MLP twice as wide), four query and two key/value
    heads, an untied head; `extra` fields added."""
    return {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": width,
            "intermediate_size": 2 * width, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": vocab, "max_position_embeddings": seq_len, "tie_word_embeddings": False, **extra}


def profiled_tiny(config: Mapping[str, Any], *, seq_len: int, rows: int, vocab: int,
                  precision: str) -> list[Any]:
    """`profile` of the model `config` (a config.json's fields) built from a random initialization,
    on `rows` samples of `seq_len` random token ids."""
    import transformers

    from pipefold.hf.model import load_causal_lm

    made = transformers.CONFIG_MAPPING[config["model_type"]](**{k: v for k, v in config.items()
                                                                 if k != "model_type"})
    lm = load_causal_lm(made, seq_len=seq_len)
    for layer in lm.layers:
        layer.materialize_("cpu")
    ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    return list(profile(lm.layers, ids, num_repeats=1, precision=precision))
