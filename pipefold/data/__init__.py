"""Built-in data for the main job: the stdlib-source corpus, a seeded batch sampler and
batches bucketed by document length (buckets.py)."""

from pipefold.data.batches import BatchSampler
from pipefold.data.buckets import LengthBuckets, bucket_lengths
from pipefold.data.corpus import VOCAB_SIZE, Corpus, decode, encode, load_corpus, stdlib_files

__all__ = [
    "VOCAB_SIZE", "BatchSampler", "Corpus", "LengthBuckets", "bucket_lengths", "decode", "encode", "load_corpus",
    "stdlib_files",
]
