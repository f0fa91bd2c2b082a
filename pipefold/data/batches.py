"""Seeded random windows of a token stream, as (inputs, targets) for next-token training."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipefold.errors import ConfigError

__all__ = ["BatchSampler"]


class BatchSampler:
    """Draws `batch_size` windows of `seq_len + 1` tokens at seeded random offsets.

    `inputs[b] = tokens[o : o + seq_len]`, `targets[b] = tokens[o + 1 : o + seq_len + 1]`.
    The same (tokens, seed) gives the same batches on every rank and every run, so ranks
    that each build their own sampler agree on the batch without communicating.
    """

    def __init__(
        self, tokens: bytes | Tensor | np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1; got {seq_len}")
        # A NumPy array (a token file's memmap) is read window by window, never copied whole.
        data: Tensor | np.ndarray = (
            torch.frombuffer(bytearray(tokens), dtype=torch.uint8)
            if isinstance(tokens, (bytes, bytearray))
            else tokens
        )
        length = int(data.shape[0]) if data.ndim == 1 else -1
        if length < seq_len + 1:
            raise ConfigError(
                f"the token stream has {length if length >= 0 else 'not 1-D'} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
            )
        self.num_tokens = length
        self.tokens: Tensor | np.ndarray = data if isinstance(data, np.ndarray) else data.to(torch.long)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self._generator = torch.Generator().manual_seed(seed)
        # Window offsets of one batch as a (batch, seq_len + 1) index grid: one gather, no loop.
        self._span = torch.arange(seq_len + 1)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def peek(self) -> tuple[Tensor, Tensor]:
        """The batch `next_batch` would return, without advancing the sampler."""
        state = self._generator.get_state()
        batch = self.next_batch()
        self._generator.set_state(state)
        return batch

    def get_state(self) -> Tensor:
        """The position in the batch order (the generator's state), for a checkpoint."""
        return self._generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Continue the batch order from a `get_state` value."""
        self._generator.set_state(state)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next (inputs, targets), both int64 of shape (batch_size, seq_len)."""
        num_starts = self.num_tokens - self.seq_len
        starts = torch.randint(num_starts, (self.batch_size, 1), generator=self._generator)
        if isinstance(self.tokens, np.ndarray):
            windows = torch.from_numpy(self.tokens[(starts + self._span).numpy()].astype(np.int64))
        else:
            windows = self.tokens[starts + self._span]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
