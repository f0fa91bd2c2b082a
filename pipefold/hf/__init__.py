"""Hugging Face decoder-only models: `pipefold.hf.files` checks a model directory without torch
(family, shards, tokenizer), `pipefold.hf.model` loads, splits and saves the model (torch and
transformers, imported there). Nothing here is imported by the core; `pip install 'pipefold[hf]'`."""
