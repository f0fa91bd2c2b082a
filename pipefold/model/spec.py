"""Lazy layer descriptions: `LayerSpec` and `TiedLayerSpec`.

A model is a sequence of layers, each an `nn.Module` or a spec that builds one on
demand. Specs let every rank hold the *whole* description for the price of a few
Python objects, build it on the meta device to learn shapes and parameter counts,
and then materialize only the layers it owns.

Tied layers: every `TiedLayerSpec` with the same `key` denotes ONE module (typically the input
embedding and the output head). Each occurrence says how it applies the shared
module (`forward_fn`; `None` means `module(x)`), and which parameter is the
shared one (`tied_weight_attr`), so the runtime can sum that parameter's
gradients across the ranks that hold an occurrence. The module is built from
the first occurrence's arguments; later occurrences must name the same class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch
from torch import nn

from pipefold.errors import ConfigError

__all__ = ["LayerSpec", "TiedLayerSpec", "LayerLike", "ForwardFn", "layer_name"]

ForwardFn: TypeAlias = Callable[[nn.Module, Any], Any]
"""How a tied occurrence applies the shared module: `forward_fn(module, x) -> output`."""


class LayerSpec:
    """`LayerSpec(cls, *args, **kwargs)` describes `cls(*args, **kwargs)` without building it.

    `cls` is an `nn.Module` subclass or any callable returning an `nn.Module`.
    Nothing is constructed until `build` is called.
    """

    def __init__(self, cls: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> None:
        if not callable(cls):
            raise ConfigError(
                f"LayerSpec cls must be an nn.Module class or a callable returning one, "
                f"got {cls!r} of type {type(cls).__name__}; "
                f"pass the class itself, e.g. LayerSpec(nn.Linear, 4, 4)"
            )
        self.cls = cls
        self.args = args
        self.kwargs = kwargs

    @property
    def name(self) -> str:
        """The class (or factory) name, used by `partition(method="type:<regex>")` and in messages."""
        return str(getattr(self.cls, "__name__", type(self.cls).__name__))

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """Construct the module; with `device`, its tensors are created there directly.

        Building under `torch.device(device)` means a `"meta"` build allocates no
        memory at all, and a GPU build never stages the weights on the host.
        """
        module = self.construct(device)
        if device is not None:
            # Modules that create tensors with an explicit device= ignore the context above.
            module.to(device)
        return module

    def construct(self, device: torch.device | str | None = None) -> nn.Module:
        """`build` without the final move to `device`: tensors the factory was given (a parameter
        shared with another layer) stay the objects they are."""
        if device is None:
            module = self.cls(*self.args, **self.kwargs)
        else:
            with torch.device(device):
                module = self.cls(*self.args, **self.kwargs)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"LayerSpec({self.name}) built a {type(module).__name__}, not an nn.Module; "
                f"cls must construct an nn.Module"
            )
        if device is not None:
            if self._is_prebuilt(module, torch.device(device)):
                raise ConfigError(
                    f"LayerSpec({self.name}) returned an already-built {type(module).__name__} (the same "
                    "object on every call); a LayerSpec builds a new module on each call, first on the meta "
                    "device, which would move this one's weights away. Pass the built module itself as "
                    f"the layer (not wrapped in a LayerSpec), or LayerSpec({type(module).__name__}, "
                    "*its arguments) to build it lazily"
                )
        return module

    def _is_prebuilt(self, module: nn.Module, device: torch.device) -> bool:
        """Whether `cls` handed back a module built before the call: it holds tensors off `device`
        and a second call returns the very same object. (A module that makes its tensors with an
        explicit device= holds them off `device` too, but is a new object on each call.)"""
        tensors = [*module.parameters(), *module.buffers()]
        if all(t.device.type == device.type for t in tensors):
            return False
        with torch.device(device):
            again = self.cls(*self.args, **self.kwargs)
        return again is module

    def __repr__(self) -> str:
        parts = [self.name, *(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        return f"{type(self).__name__}({', '.join(parts)})"


class TiedLayerSpec(LayerSpec):
    """An occurrence of a module shared under `key`; see the module docstring.

    `TiedLayerSpec(key, cls, *args, forward_fn=None, tied_weight_attr="weight", **kwargs)`.
    `tied_weight_attr` may be dotted (`"lm.weight"`).
    """

    def __init__(
        self,
        key: str,
        cls: Callable[..., nn.Module],
        *args: Any,
        forward_fn: ForwardFn | None = None,
        tied_weight_attr: str = "weight",
        **kwargs: Any,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"TiedLayerSpec key must be a non-empty string, got {key!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise ConfigError(
                f"TiedLayerSpec({key!r}) forward_fn must be callable (module, x) -> output, "
                f"got {forward_fn!r}"
            )
        if not isinstance(tied_weight_attr, str) or not tied_weight_attr:
            raise ConfigError(
                f"TiedLayerSpec({key!r}) tied_weight_attr must be a parameter name such as 'weight', "
                f"got {tied_weight_attr!r}"
            )
        super().__init__(cls, *args, **kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = tied_weight_attr

    def tied_parameter(self, module: nn.Module) -> nn.Parameter:
        """The shared parameter of `module` (the one whose gradients are summed across owners)."""
        value: Any = module
        for part in self.tied_weight_attr.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, nn.Parameter):
            raise ConfigError(
                f"TiedLayerSpec({self.key!r}): tied_weight_attr={self.tied_weight_attr!r} is not a parameter "
                f"of {type(module).__name__}; name one of {[n for n, _ in module.named_parameters()]}"
            )
        return value

    def __repr__(self) -> str:
        return f"TiedLayerSpec(key={self.key!r}, {super().__repr__()})"


LayerLike: TypeAlias = nn.Module | LayerSpec
"""One element of a model description."""


def layer_name(layer: LayerLike) -> str:
    """The class name of a layer, built or not (specs are not built to learn it)."""
    if isinstance(layer, LayerSpec):
        return layer.name
    return type(layer).__name__
