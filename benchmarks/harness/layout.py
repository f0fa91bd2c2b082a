"""How the 8 benchmark layers are cut into stages, the same for every library. No torch import."""

from __future__ import annotations

from pipefold.errors import ConfigError

__all__ = ["NUM_LAYERS", "stage_bounds"]

NUM_LAYERS = 8
"""Every workload has this many layers (docs/decisions.md, "transformer split")."""


def stage_bounds(num_stages: int) -> list[tuple[int, int]]:
    """[start, stop) layer indices of each stage: an even split of the 8 layers."""
    if num_stages < 1 or NUM_LAYERS % num_stages:
        raise ConfigError(
            f"num_stages={num_stages} does not divide the {NUM_LAYERS} benchmark layers; "
            "use 1, 2, 4 or 8 stages (ranks x virtual stages)"
        )
    per_stage = NUM_LAYERS // num_stages
    return [(stage * per_stage, (stage + 1) * per_stage) for stage in range(num_stages)]
