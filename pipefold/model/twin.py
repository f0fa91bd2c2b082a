"""A module's twin for `pipefold.model.split`: a small real module of the same structure whose
forward runs where the split module's parameters are on the meta device (a Hugging Face
forward reads tensor values, which meta tensors have not); made here for Hugging Face models."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Twin", "default_twin", "twin_config"]

Twin = Callable[[Sequence[str] | None], nn.Module]
"""`twin(real_paths)`: a module with the structure of the one split (the same submodule paths
outside the blocks, the same block class, two or more blocks) whose tensors under
`real_paths` (None: all) are real; it runs the forward where the split module's parameters
are on the meta device. Its values do not matter, only the calls its forward makes."""

_TWIN_LAYERS = 2


def twin_config(config: Any) -> Any:
    """A Hugging Face config shrunk for a twin: two blocks, a tiny vocabulary and MLP (only the
    calls its forward makes matter, not its values)."""
    twin = copy.deepcopy(config)
    twin.num_hidden_layers = _TWIN_LAYERS
    layer_types = getattr(twin, "layer_types", None)
    if isinstance(layer_types, list):
        twin.layer_types = layer_types[:_TWIN_LAYERS]
    twin.vocab_size = 8
    twin.pad_token_id = None
    if hasattr(twin, "intermediate_size"):
        twin.intermediate_size = 8
    if getattr(twin, "model_type", None) == "gpt2":
        twin.n_inner = 8
    return twin


def default_twin(module: nn.Module) -> Twin | None:
    """The twin of a Hugging Face model (None for any other module): its own class built from
    `twin_config(module.config)`, zero weights. A Hugging Face forward reads tensor values (its
    mask code), so it cannot run on the meta device, where shapes are traced."""
    config = getattr(module, "config", None)
    if not type(module).__module__.startswith("transformers.") or config is None:
        return None
    if not hasattr(config, "num_hidden_layers"):
        return None
    shrunk = twin_config(config)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    cls = type(module)

    def make(real_paths: Sequence[str] | None) -> nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            twin: nn.Module = cls(shrunk)
        finally:
            torch.set_default_dtype(previous)
        twin.eval()  # no dropout: its values are never used
        with torch.no_grad():
            for param in twin.parameters():
                param.zero_()
                param.requires_grad_(False)
        return twin

    return make
