"""Selective recomputation (Korthikanti et al. 2022): `LayoutOptions(recompute="selective")`
recomputes only the attention core of each transformer block (QK^T, softmax, attention over V)
in the backward and keeps every other activation.

A layer takes part through a submodule with a boolean `recompute_core` attribute, which this
module sets (the zoo's `CausalSelfAttention` checkpoints its core when it is set). A model
with none is refused before anything is built, since "selective" would then recompute nothing.

    check_selective(meta_layers)               # every rank, on the meta build
    num = recompute_attention_cores(modules)   # this rank's materialized layers
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from pipefold.errors import ConfigError

__all__ = ["check_selective", "recompute_attention_cores"]


def _cores(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [
        sub
        for module in modules
        for sub in module.modules()
        if isinstance(getattr(sub, "recompute_core", None), bool)
    ]


def check_selective(meta: Iterable[nn.Module]) -> None:
    """Refuse "selective" for a model none of whose layers has an attention core to recompute."""
    if not _cores(meta):
        raise ConfigError(
            "recompute='selective' is not allowed: no layer of the model has an attention core it can "
            "recompute (a submodule with a recompute_core flag, as the built-in GPT's "
            "CausalSelfAttention); use recompute='full' or a list of layer indices"
        )


def recompute_attention_cores(modules: Iterable[nn.Module]) -> int:
    """Set every attention core of `modules` to be recomputed; returns how many."""
    cores = _cores(modules)
    for core in cores:
        setattr(core, "recompute_core", True)  # noqa: B010 (an attribute nn.Module does not declare)
    return len(cores)
