"""Built-in data for the main job: the stdlib-source corpus, a seeded batch sampler and
batches bucketed by document length (buckets.py).

The corpus (corpus.py) imports no torch, so `pipefold train` can size its split while it checks
its configuration; the samplers (torch) load on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipefold.data.corpus import (
    VOCAB_SIZE,
    Corpus,
    corpus_split_sizes,
    decode,
    encode,
    load_corpus,
    stdlib_files,
)

if TYPE_CHECKING:
    from pipefold.data.batches import BatchSampler
    from pipefold.data.buckets import LengthBuckets, bucket_lengths

__all__ = [
    "VOCAB_SIZE", "BatchSampler", "Corpus", "LengthBuckets", "bucket_lengths", "corpus_split_sizes", "decode",
    "encode", "load_corpus", "stdlib_files",
]

_LAZY = {"BatchSampler": "batches", "LengthBuckets": "buckets", "bucket_lengths": "buckets"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipefold.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipefold.data' has no attribute {name!r}")
