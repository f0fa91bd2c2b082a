"""The layer type `pipefold.split` returns: `SplitPiece`, one piece of a user's module that
registers the submodules (or tensors) it runs under their paths in that module, so its
parameter names are the module's own, and materializes its meta tensors on demand. The ways
of cutting are in `pipefold.model.split` (at blocks) and `pipefold.model.split_graph` (at named
points)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pipefold.errors import ConfigError
from pipefold.model.split_trace import meta_tree

__all__ = ["Fill", "SplitPiece", "pieces_of"]

Fill = Callable[["SplitPiece", Mapping[str, Tensor]], None]
"""`fill(piece, fresh)`: give values to the tensors `SplitPiece.materialize_` just allocated,
`fresh` mapping their names in the whole module to them (e.g. read from a checkpoint)."""


class SplitPiece(nn.Module):
    """One layer cut out of a user's module. It registers the submodules it owns under
    their paths in that module, so its parameter names are the module's own; the
    module itself is kept unregistered (its forward code runs the prefix)."""

    pipefold_keeps_names = True
    """Read by `pipefold.model.build`: parameters are named without a layer index."""

    def __init__(self, root: nn.Module, paths: Sequence[str], kind: str) -> None:
        super().__init__()
        object.__setattr__(self, "_root", root)
        self.kind = kind
        self.paths = tuple(paths)
        self.fill: Fill | None = None
        """How `materialize_` gives values to tensors it allocates (set by who built the module
        on meta, e.g. `pipefold.hf.model.load_causal_lm`); None: nothing may be on meta."""
        for path in self.paths:
            self._register_path(path, root.get_submodule(path) if path else root)

    def _register_path(self, path: str, module: nn.Module) -> None:
        parts = path.split(".")
        holder: nn.Module = self
        for part in parts[:-1]:
            child = holder._modules.get(part)
            if child is None:
                child = nn.Module()
                holder.add_module(part, child)
            holder = child
        holder.add_module(parts[-1], module)

    @property
    def root(self) -> nn.Module:
        """The module this piece was cut from (not a registered submodule of the piece)."""
        root: nn.Module = object.__getattribute__(self, "_root")
        return root

    def parameter_names(self) -> dict[str, str]:
        """This piece's parameter names -> their names in the whole module (a shared
        parameter's first name there)."""
        root = self.root
        canonical = {id(param): name for name, param in root.named_parameters(remove_duplicate=True)}
        return {
            name: canonical.get(id(param), name)
            for name, param in self.named_parameters(remove_duplicate=False)
        }

    def buffer_names(self) -> dict[str, str]:
        """This piece's buffer names -> their names in the whole module."""
        canonical = {id(buffer): name for name, buffer in self.root.named_buffers(remove_duplicate=True)}
        return {
            name: canonical.get(id(buffer), name)
            for name, buffer in self.named_buffers(remove_duplicate=False)
        }

    def is_meta(self) -> bool:
        """Whether any of this piece's parameters or buffers is still on the meta device."""
        return any(t.is_meta for t in self.parameters()) or any(t.is_meta for t in self.buffers())

    def materialize_(self, device: torch.device | str, *, fill: Fill | None = None) -> SplitPiece:
        """Give this piece's tensors that are on the meta device real storage on `device`, in place,
        then values with `fill` (default: `self.fill`). The new tensors replace the meta ones in
        the whole module, so a parameter shared with another piece stays one parameter in this
        process. Tensors already real are moved to `device`. Returns self."""
        fill = fill if fill is not None else self.fill
        parameter_names, buffer_names = self.parameter_names(), self.buffer_names()
        fresh: dict[int, Tensor] = {}
        by_name: dict[str, Tensor] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if param.is_meta and id(param) not in fresh:
                fresh[id(param)] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
                by_name[parameter_names[name]] = fresh[id(param)]
        for name, buffer in self.named_buffers(remove_duplicate=False):
            if buffer.is_meta and id(buffer) not in fresh:
                fresh[id(buffer)] = torch.empty_like(buffer, device=device)
                by_name[buffer_names[name]] = fresh[id(buffer)]
        if fresh and fill is None:
            raise ConfigError(
                f"split piece ({self.extra_repr()}): {sorted(by_name)[:3]} are on the meta device and the "
                "piece has no fill to give them values; build the module with real weights, or load it "
                "with pipefold.hf.model.load_causal_lm"
            )
        for module in [*self.root.modules(), *self.modules()]:
            for table in (module._parameters, module._buffers):
                for key, value in table.items():
                    if value is not None and id(value) in fresh:
                        table[key] = fresh[id(value)]  # type: ignore[assignment]
        if fill is not None and by_name:
            with torch.no_grad():
                fill(self, by_name)
        self.to(device)
        return self

    def trace(self, built: nn.Module, value: Any) -> Any:
        """This piece's output for an input shaped like `value` (meta tensors), on meta: `built`
        (this piece's meta copy) run on it, or, where the module's forward reads tensor values
        (a Hugging Face model checks its masks' contents), this piece itself run once on zeros of
        those shapes, in eval mode and without touching the random streams."""
        try:
            return built(value)
        except Exception:
            tensors = [*self.parameters(), *self.root.parameters(), *self.root.buffers()]
            device = tensors[0].device if tensors else torch.device("cpu")
            if device.type == "meta":
                raise
        zeros = pytree.tree_map(
            lambda leaf: torch.zeros(leaf.shape, dtype=leaf.dtype, device=device)
            if isinstance(leaf, Tensor)
            else leaf,
            value,
        )
        modes = {module: module.training for module in self.root.modules()}
        accelerators = [device.index or 0] if device.type == "cuda" else []
        try:
            self.root.eval()
            with torch.random.fork_rng(devices=accelerators), torch.no_grad(), torch.device(device):
                output = self(zeros)
        finally:
            for module, training in modes.items():
                module.training = training
        return meta_tree(output)

    def extra_repr(self) -> str:
        return f"{self.kind}: {', '.join(self.paths) or '(root)'}"


def pieces_of(layers: Sequence[Any]) -> Iterator[SplitPiece]:
    """The `SplitPiece` layers among `layers`."""
    for layer in layers:
        if isinstance(layer, SplitPiece):
            yield layer
