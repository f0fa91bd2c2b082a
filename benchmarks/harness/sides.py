"""What the worker times: one library's pipeline behind a common `Side` interface.

Every side owns its own copy of the layers (built from the same seed), computes
gradients in `step` and exposes them under the names `nn.Sequential(*layers)` gives, so
one reference from a single process checks them all.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Side", "global_name"]


class Side(Protocol):
    label: str
    """"pipefold", "torch" or "deepspeed"."""

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Forward and backward of one global batch; gradients accumulate into `.grad`."""

    def gradients(self) -> dict[str, torch.Tensor]:
        """This rank's parameter gradients, by their name in nn.Sequential(*layers)."""

    def zero_grad(self) -> None: ...

    def activation_bytes_peak(self) -> int | None:
        """Activation bytes this rank held at most in the last step, if the library counts them."""

    def timeline_json(self) -> dict[str, Any] | None:
        """The library's measured timeline of the last step (all ranks), if it records one."""


def global_name(first_layer: int, local_name: str) -> str:
    """Rename '1.fc1.weight' of a stage that starts at layer 4 to '5.fc1.weight'."""
    index, _, rest = local_name.partition(".")
    return f"{first_layer + int(index)}.{rest}"
