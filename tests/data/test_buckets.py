"""`LengthBuckets`: documents cut into windows of bucket lengths, batched by a token budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipefold.data import LengthBuckets, bucket_lengths
from pipefold.errors import ConfigError


def _stream(lengths: list[int]) -> np.ndarray:
    """Document d (1-based) is `lengths[d-1]` copies of id d, each followed by separator 0."""
    return np.concatenate([np.append(np.full(n, d, dtype=np.uint8), 0) for d, n in enumerate(lengths, 1)])


LENGTHS = [int(n) for n in np.random.default_rng(0).integers(1, 300, size=200)]


def test_bucket_lengths():
    assert bucket_lengths(8, 100) == (8, 16, 32, 64, 100)
    assert bucket_lengths(8, 8) == (8,)
    with pytest.raises(ConfigError, match="min_len"):
        bucket_lengths(16, 8)


def test_windows_stay_inside_one_document_and_fit_the_budget():
    batches = LengthBuckets(
        _stream(LENGTHS), separator=0, token_budget=512, max_len=64, row_multiple=2, seed=3
    )
    seen = set()
    for _ in range(batches.batches_per_epoch):
        inputs, targets = batches.next_batch()
        rows, length = inputs.shape
        assert length in (8, 16, 32, 64) and rows * length <= 512 and rows % 2 == 0
        assert rows == 512 // length // 2 * 2
        assert inputs.dtype == targets.dtype == torch.int64 and targets.shape == inputs.shape
        torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])  # targets: inputs shifted by one
        for row, target in zip(inputs, targets, strict=True):
            assert (row == row[0]).all() and row[0] != 0  # one document, never its separator
            assert target[-1] in (row[0], 0)
        seen.add(length)
    assert seen == {8, 16, 32, 64}


def test_every_token_but_a_short_tail_is_in_a_window():
    batches = LengthBuckets(_stream(LENGTHS), separator=0, token_budget=256, max_len=64, min_len=8)
    # A document of n ids and its separator has n predictions; all but n % 8 are covered.
    assert sum(length * count for length, count in batches.num_windows.items()) == sum(
        n - n % 8 for n in LENGTHS
    )


def test_seeded_order_and_resume():
    def make(seed: int) -> LengthBuckets:
        return LengthBuckets(_stream(LENGTHS), separator=0, token_budget=256, max_len=64, seed=seed)

    first, again, other = make(1), make(1), make(2)
    shapes = []
    for _ in range(first.batches_per_epoch + 3):  # into the second epoch
        a, b = first.next_batch(), again.next_batch()
        torch.testing.assert_close(a, b)
        shapes.append(tuple(a[0].shape))
    assert any(not torch.equal(make(1).next_batch()[0], other.next_batch()[0]) for _ in range(3))
    state = first.get_state()
    expected = [first.next_batch() for _ in range(4)]
    resumed = make(1)
    resumed.set_state(state.clone())
    for batch in expected:
        torch.testing.assert_close(resumed.peek(), batch)
        torch.testing.assert_close(resumed.next_batch(), batch)
    assert len(set(shapes)) > 1


def test_refusals():
    with pytest.raises(ConfigError, match="token_budget"):
        LengthBuckets(_stream(LENGTHS), separator=0, token_budget=100, max_len=64, row_multiple=2)
    with pytest.raises(ConfigError, match="no bucket"):
        LengthBuckets(_stream([3, 4, 5]), separator=0, token_budget=256, max_len=64)
