"""Batches of documents of similar length, each batch about one token budget, none padded.

    batches = LengthBuckets(corpus.train, separator=ord("\\n"), token_budget=4096, max_len=256,
                            row_multiple=num_microbatches)
    inputs, targets = batches.next_batch()     # (rows, length): rows * length <= token_budget
    loss = pipe.step(inputs, targets)          # every step its own length, no re-spawn

A document is a span of the token stream ending with (and including) `separator` (a line of
the byte corpus with `ord("\\n")`, a document of a nanoGPT token file with its end-of-text
id). Bucket lengths are `min_len`, `2 * min_len`, `4 * min_len`, ... and `max_len`. Each
document is cut into windows of bucket lengths, the longest that fits first (a 100-token
line at min_len 8 gives windows of 64, 32 and the 3 tokens left over are dropped), so no
window is padded and no token is lost but a tail shorter than `min_len` (a window of length
L reads L + 1 tokens: its targets are its inputs shifted by one). A bucket of length L
makes batches of `token_budget // L` rows, rounded down to a multiple of `row_multiple` (at
least `row_multiple`). Each epoch shuffles every bucket's windows, cuts them into batches
(a bucket's last, incomplete batch waits for a later epoch's shuffle) and shuffles the
batches, from (`seed`, epoch): every rank that builds it from the same tokens gets the same
batches, as with `BatchSampler`. No torch-free promise: batches are torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipefold.errors import ConfigError

__all__ = ["LengthBuckets", "bucket_lengths"]


def bucket_lengths(min_len: int, max_len: int) -> tuple[int, ...]:
    """`min_len` doubled until `max_len`, and `max_len` itself."""
    if min_len < 1 or max_len < min_len:
        raise ConfigError(
            f"bucket lengths need 1 <= min_len <= max_len; got min_len={min_len}, max_len={max_len}"
        )
    lengths = []
    length = min_len
    while length < max_len:
        lengths.append(length)
        length *= 2
    lengths.append(max_len)
    return tuple(lengths)


@dataclass(frozen=True)
class _Bucket:
    length: int
    rows: int
    starts: np.ndarray
    """Where each window of this length begins in the token stream."""


class LengthBuckets:
    """Batches of windows of one bucket length each (see the module docstring)."""

    def __init__(
        self,
        tokens: bytes | np.ndarray | Tensor,
        *,
        separator: int,
        token_budget: int,
        max_len: int,
        min_len: int = 8,
        row_multiple: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value in (("token_budget", token_budget), ("row_multiple", row_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LengthBuckets: {name} must be an integer >= 1; got {value!r}")
        self.lengths = bucket_lengths(min_len, max_len)
        if token_budget < max_len * row_multiple:
            raise ConfigError(
                f"LengthBuckets: token_budget={token_budget} holds fewer than row_multiple={row_multiple} "
                f"rows of max_len={max_len}; raise it to at least {max_len * row_multiple}"
            )
        data = np.frombuffer(tokens, dtype=np.uint8) if isinstance(tokens, (bytes, bytearray)) else (
            tokens.numpy() if isinstance(tokens, Tensor) else tokens
        )
        if data.ndim != 1:
            raise ConfigError(f"LengthBuckets: tokens must be a 1-D stream; got shape {data.shape}")
        self.tokens = data
        self.token_budget = token_budget
        self.seed = seed
        starts: dict[int, list[int]] = {length: [] for length in self.lengths}
        ends = np.flatnonzero(data == separator) + 1  # a document includes its separator
        if len(ends) == 0 or ends[-1] != len(data):
            ends = np.append(ends, len(data))
        begin = 0
        descending = sorted(self.lengths, reverse=True)
        for end in ends.tolist():
            position = begin
            while end - position - 1 >= min_len:
                length = next(n for n in descending if n <= end - position - 1)
                starts[length].append(position)
                position += length
            begin = end
        self._buckets = [
            _Bucket(length, max(row_multiple, token_budget // length // row_multiple * row_multiple),
                    np.asarray(starts[length], dtype=np.int64))
            for length in self.lengths
        ]
        self.num_windows = {b.length: len(b.starts) for b in self._buckets}
        """Windows per bucket length."""
        if all(len(b.starts) < b.rows for b in self._buckets):
            raise ConfigError(
                f"LengthBuckets: no bucket has enough windows for one batch ({self.num_windows} windows "
                f"per length, batches of {[b.rows for b in self._buckets]} rows); use more data, a "
                "smaller token_budget or a smaller min_len"
            )
        self._epoch = 0
        self._index = 0
        self._order = self._plan(0)

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches: (bucket index, window starts)."""
        generator = np.random.default_rng([self.seed, epoch])
        batches = []
        for index, bucket in enumerate(self._buckets):
            shuffled = generator.permutation(bucket.starts)
            for first in range(0, len(shuffled) - bucket.rows + 1, bucket.rows):
                batches.append((index, shuffled[first : first + bucket.rows]))
        order = generator.permutation(len(batches))
        return [batches[i] for i in order.tolist()]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(rows, length) of every bucket's batches, shortest length first."""
        return [(bucket.rows, bucket.length) for bucket in self._buckets]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def __iter__(self) -> LengthBuckets:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next (inputs, targets), int64 of shape (rows, length) of one bucket."""
        batch = self.peek()
        self._index += 1
        if self._index == len(self._order):
            self._epoch += 1
            self._index = 0
            self._order = self._plan(self._epoch)
        return batch

    def peek(self) -> tuple[Tensor, Tensor]:
        """The batch `next_batch` would return, without advancing."""
        bucket_index, starts = self._order[self._index]
        length = self._buckets[bucket_index].length
        windows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(length + 1)].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def get_state(self) -> Tensor:
        """The position in the batch order (epoch, batch), as bytes, for a checkpoint."""
        return torch.tensor([self._epoch, self._index], dtype=torch.int64).view(torch.uint8).clone()

    def set_state(self, state: Tensor) -> None:
        """Continue the batch order from a `get_state` value."""
        epoch, index = state.view(torch.int64).tolist()
        self._epoch, self._order = epoch, self._plan(epoch)
        if not 0 <= index < len(self._order):
            raise ConfigError(
                f"LengthBuckets.set_state: batch {index} of epoch {epoch} does not exist ({len(self._order)} "
                "batches per epoch); the state comes from other data or other bucket settings"
            )
        self._index = index
