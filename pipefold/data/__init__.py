"""Built-in data for the main job: the stdlib-source corpus and a seeded batch sampler."""

from pipefold.data.batches import BatchSampler
from pipefold.data.corpus import VOCAB_SIZE, Corpus, decode, encode, load_corpus, stdlib_files

__all__ = ["VOCAB_SIZE", "BatchSampler", "Corpus", "decode", "encode", "load_corpus", "stdlib_files"]
