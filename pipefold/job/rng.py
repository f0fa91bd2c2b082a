"""Random states saved with a training checkpoint, so a resumed run is identical step by step.

    states = gather_rng_states(sampler, device)        # every rank, collective; JSON data
    save_checkpoint(..., extra={"rng": states, ...})
    restore_rng_state(states, sampler, device)         # every rank, after loading the weights

Each rank's Python `random`, NumPy, torch CPU (and its CUDA device's) generators and the batch
sampler's position are captured as JSON (generator bytes in base64), gathered so every rank
passes the same `extra` to `save_checkpoint`, and restored by world rank. Dropout draws from
the torch generators, so with them restored a resumed run draws the same masks.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pipefold.data import BatchSampler, LengthBuckets

__all__ = ["capture_rng_state", "gather_rng_states", "restore_rng_state", "set_rng_state"]


def _encode(state: Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state(sampler: BatchSampler | LengthBuckets | None, device: torch.device) -> dict[str, Any]:
    """This process's random states as JSON data."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy=True: (kind, keys, position, has_gauss, cached)
    kind, keys, position, has_gauss, cached = numpy_state
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": _encode(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    if sampler is not None:
        state["sampler"] = _encode(sampler.get_state())
    return state


def set_rng_state(
    state: dict[str, Any], sampler: BatchSampler | LengthBuckets | None, device: torch.device
) -> None:
    """Put this process's generators where `capture_rng_state` found them."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(_decode(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode(state["cuda"]), device)
    if sampler is not None and "sampler" in state:
        sampler.set_state(_decode(state["sampler"]))


def gather_rng_states(
    sampler: BatchSampler | LengthBuckets | None, device: torch.device
) -> list[dict[str, Any]]:
    """Every rank's random states, indexed by world rank; collective (call on every rank)."""
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, capture_rng_state(sampler, device))
    return states


def restore_rng_state(
    states: Any, sampler: BatchSampler | LengthBuckets | None, device: torch.device
) -> bool:
    """Restore this rank's entry of `gather_rng_states`'s list; False (nothing restored) where
    `states` is not such a list for this world size (a checkpoint saved without them, or by a
    different number of processes), so the caller falls back to re-seeding."""
    if not isinstance(states, Sequence) or len(states) != dist.get_world_size():
        return False
    mine = states[dist.get_rank()]
    if not isinstance(mine, dict):
        return False
    set_rng_state(mine, sampler, device)
    return True
