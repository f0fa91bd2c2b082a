"""`pipefold.hf.files` without torch: what a config.json says, with transformers' defaults per family."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipefold.hf.files import ModelFiles


@pytest.mark.parametrize(
    ("config", "tied"),
    [
        ({"model_type": "gpt2"}, True),  # GPT2Config ties by default
        ({"model_type": "llama"}, False),  # LlamaConfig, MistralConfig and Qwen2Config do not
        ({"model_type": "mistral", "tie_word_embeddings": None}, False),
        ({"model_type": "qwen2"}, False),
        ({"model_type": "gpt2", "tie_word_embeddings": False}, False),
        ({"model_type": "llama", "tie_word_embeddings": True}, True),
    ],
)
def test_tied_head_follows_the_config_and_the_family_default(config, tied):
    files = ModelFiles(config_path=Path("config.json"), config=config, directory=None)
    assert files.tie_word_embeddings is tied
