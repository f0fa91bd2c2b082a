"""Weights for a module `pipefold.split` cut while it was on the meta device.

    with torch.device("meta"):
        model = MyTransformer()                  # no memory
    layers = pipefold.split(model, example_inputs=(tokens,))        # init: reset_parameters
    layers = pipefold.split(model, example_inputs=(tokens,), init=torch.load("w.pt", mmap=True))

Each rank materializes only the pieces it runs (`SplitPiece.materialize_`, called by the
pipeline) and gives their tensors values here: from a state dict (the module's own names), or
by the module's own initialization, each module that owns a new tensor under a seed drawn from
its path, so a tensor gets the same values on whichever rank materializes it, whatever else
that rank holds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError

if TYPE_CHECKING:
    from pipefold.model.split_piece import Fill, SplitPiece

__all__ = ["Init", "init_fill", "reset_parameters", "seed_of", "state_dict_fill"]

Init = Callable[[str, nn.Module], None]
"""`init(path, module)`: give values to the tensors `module` (at `path` in the split module, ""
for the top module) holds directly; called under that path's seed."""


def seed_of(seed: int, path: str) -> int:
    """The seed a module's initialization runs under: the same on every rank."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def reset_parameters(path: str, module: nn.Module) -> None:
    """The default `Init`: the module's own `reset_parameters()` (as torch's layers define it)."""
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        names = [name for name, _ in own]
        raise ConfigError(
            f"split: {type(module).__name__} at {path or '(the top module)'!r} holds {names} and has no "
            "reset_parameters() to initialize them after materializing on the meta device; pass "
            "split(..., init=lambda path, module: ...) to initialize them, or init=<a state dict>"
        )
    reset()


def init_fill(seed: int = 0, init: Init | None = None) -> Fill:
    """Fill new tensors by calling `init` (default: `reset_parameters`) on each module that owns
    one, under `seed_of(seed, its path)`. The module's other tensors already real keep their
    values (an init touches a whole module; only the new tensors take its values)."""
    initialize = init if init is not None else reset_parameters

    def fill(piece: SplitPiece, fresh: Mapping[str, Tensor]) -> None:
        root = piece.root
        fresh_ids = {id(t) for t in fresh.values()}
        devices = {t.device for t in fresh.values()}
        accelerators = [d.index or 0 for d in devices if d.type == "cuda"]
        for owner in sorted({name.rpartition(".")[0] for name in fresh}):
            module = root.get_submodule(owner) if owner else root
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            kept = {name: t.detach().clone() for name, t in own if id(t) not in fresh_ids and not t.is_meta}
            with torch.random.fork_rng(devices=accelerators):
                torch.manual_seed(seed_of(seed, owner))
                initialize(owner, module)
            for name, value in kept.items():
                getattr(module, name).copy_(value)

    return fill


def state_dict_fill(state: Mapping[str, Tensor]) -> Fill:
    """Fill new tensors from `state` (names of the split module's `state_dict()`). Opened with
    `torch.load(path, mmap=True)`, a rank reads only the tensors of the pieces it runs."""

    def fill(piece: SplitPiece, fresh: Mapping[str, Tensor]) -> None:
        missing = [name for name in fresh if name not in state]
        if missing:
            raise ConfigError(
                f"split(init=<state dict>): {missing[:4]} are missing from the state dict given to "
                f"initialize the pieces ({len(state)} entries); pass the module's full state_dict()"
            )
        for name, tensor in fresh.items():
            value = state[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ConfigError(
                    f"split(init=<state dict>): {name!r} has shape {tuple(value.shape)} in the state dict, "
                    f"the module's is {tuple(tensor.shape)}"
                )
            tensor.copy_(value)

    return fill
