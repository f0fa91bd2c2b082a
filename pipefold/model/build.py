"""From a model description to modules: meta build, shape tracing, materialization.

Every rank holds the whole description (`as_layers`), builds it on the meta device
(`meta_layers`, no memory) to learn the tensors that cross each layer boundary
(`trace_boundaries`), and builds for real only the layers it owns (`materialize`).
`build_reference` builds the same model on one process with the same weights,
for exactness tests.

Calling convention: a layer receives exactly what the previous layer returned, as ONE argument: a
layer returning `(hidden, mask)` is followed by a layer whose forward takes that
tuple. This is `nn.Sequential`'s convention, and it is what lets a boundary carry
a tuple of tensors without any per-model plumbing. `apply_layer` is the one place
that calls a layer, so tied occurrences apply their `forward_fn` everywhere alike.

Initialization: a `LayerSpec` at index i is built right after `torch.manual_seed(seed + i)` (a tied
key: seed + the index of its first occurrence), on the CPU by default, then moved.
So a layer's initial weights depend neither on which other layers a rank builds
(the partition) nor on the device that holds it. The global RNG state is restored
afterwards, so building never perturbs the caller's random stream.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.model.spec import ForwardFn, LayerLike, LayerSpec, TiedLayerSpec, layer_name

__all__ = [
    "TensorMeta",
    "ReferenceModel",
    "as_layers",
    "meta_layers",
    "trace_boundaries",
    "materialize",
    "build_reference",
    "apply_layer",
    "tied_groups",
    "owner_indices",
    "named_parameters",
    "name_prefix",
    "parameter_names",
    "shared_names",
    "shared_parameter_uses",
    "shared_parameters",
]

Device = torch.device | str


@dataclass(frozen=True)
class TensorMeta:
    """Shapes and dtypes of what crosses a boundary: one tensor, or a tuple of tensors."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    is_tuple: bool

    def __post_init__(self) -> None:
        if len(self.shapes) != len(self.dtypes):
            raise ConfigError(
                f"TensorMeta has {len(self.shapes)} shapes but {len(self.dtypes)} dtypes; "
                f"give one dtype per shape"
            )
        if not self.is_tuple and len(self.shapes) != 1:
            raise ConfigError(
                f"TensorMeta with is_tuple=False must describe exactly 1 tensor, got {len(self.shapes)}"
            )

    @classmethod
    def of(
        cls,
        value: Any,
        *,
        what: str = "value",
        fix: str = "return only tensors from layers (encode flags as tensors, drop None entries)",
    ) -> TensorMeta:
        """Describe a tensor or a tuple/list of tensors; anything else is a ConfigError naming `what`."""
        if isinstance(value, Tensor):
            return cls(shapes=(tuple(value.shape),), dtypes=(value.dtype,), is_tuple=False)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
            return cls(
                shapes=tuple(tuple(v.shape) for v in value),
                dtypes=tuple(v.dtype for v in value),
                is_tuple=True,
            )
        is_sequence = isinstance(value, (tuple, list))
        kinds = [type(v).__name__ for v in value] if is_sequence else type(value).__name__
        raise ConfigError(
            f"{what} must be a tensor or a non-empty tuple of tensors to cross a stage boundary, "
            f"got {kinds}; {fix}"
        )

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @functools.cached_property
    def differentiable(self) -> tuple[bool, ...]:
        """Per tensor: whether a gradient flows back through it (floating or complex dtypes).
        Cached: every received message asks (its buffers are allocated from this description)."""
        return tuple(d.is_floating_point or d.is_complex for d in self.dtypes)

    @property
    def byte_sizes(self) -> tuple[int, ...]:
        """Bytes of each tensor described."""
        return tuple(
            math.prod(shape) * dtype.itemsize
            for shape, dtype in zip(self.shapes, self.dtypes, strict=True)
        )

    @property
    def num_bytes(self) -> int:
        total = 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            numel = 1
            for size in shape:
                numel *= size
            total += numel * dtype.itemsize
        return total

    def empty(self, device: Device, *, requires_grad: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Uninitialized tensors of this description on `device` (e.g. receive buffers).

        `requires_grad` applies only to the differentiable entries.
        """
        tensors = tuple(
            torch.empty(shape, dtype=dtype, device=device, requires_grad=requires_grad and grad)
            for shape, dtype, grad in zip(self.shapes, self.dtypes, self.differentiable, strict=True)
        )
        return tensors if self.is_tuple else tensors[0]

    def mismatch(self, value: Any) -> str | None:
        """None if `value` matches this description, else a sentence saying what differs."""
        try:
            other = TensorMeta.of(value)
        except ConfigError as error:
            return str(error)
        if other == self:
            return None
        return f"expected {self}, got {other}"

    def __str__(self) -> str:
        parts = [
            f"{str(dtype).removeprefix('torch.')}[{', '.join(str(s) for s in shape)}]"
            for shape, dtype in zip(self.shapes, self.dtypes, strict=True)
        ]
        if self.is_tuple:
            return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"
        return parts[0]


class ReferenceModel(nn.Sequential):
    """`nn.Sequential` that applies tied occurrences through their `forward_fn`.

    Parameter names are exactly those of `nn.Sequential(*modules)`: a tied module
    appears under several indices and is named after the first.
    """

    def __init__(self, modules: Sequence[nn.Module], forward_fns: Sequence[ForwardFn | None]) -> None:
        if len(modules) != len(forward_fns):
            raise ConfigError(f"ReferenceModel got {len(modules)} modules but {len(forward_fns)} forward_fns")
        super().__init__(*modules)
        self._forward_fns = tuple(forward_fns)

    def forward(self, input: Any) -> Any:
        value = input
        for module, forward_fn in zip(self, self._forward_fns, strict=True):
            value = module(value) if forward_fn is None else forward_fn(module, value)
        return value


def as_layers(layers: nn.Sequential | Sequence[LayerLike]) -> list[LayerLike]:
    """Normalize a model description to a list of layers, refusing what cannot be pipelined."""
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        result: list[LayerLike] = list(layers)
    elif isinstance(layers, nn.Module):
        raise ConfigError(
            f"layers must be an nn.Sequential or a list of modules/LayerSpecs, "
            f"got a single {type(layers).__name__}; "
            f"split it into a sequence of layers, e.g. nn.Sequential(embedding, *blocks, head)"
        )
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
        result = list(layers)
    else:
        raise ConfigError(
            f"layers must be an nn.Sequential or a list of modules/LayerSpecs, got {type(layers).__name__}"
        )
    if not result:
        raise ConfigError("layers is empty; a pipeline needs at least one layer per stage")
    seen: dict[int, int] = {}
    tied_cls: dict[str, tuple[int, Any]] = {}
    for index, layer in enumerate(result):
        if isinstance(layer, TiedLayerSpec):
            first = tied_cls.setdefault(layer.key, (index, layer.cls))
            if first[1] is not layer.cls:
                raise ConfigError(
                    f"layer {index}: TiedLayerSpec key {layer.key!r} builds {layer.name}, "
                    f"but its first occurrence (layer {first[0]}) builds "
                    f"{getattr(first[1], '__name__', first[1])}; one key is one module, "
                    f"so use the same class (and a forward_fn for a different use)"
                )
        elif isinstance(layer, nn.Module):
            # A stateful module object at two indices would be silently duplicated across stages,
            # its gradients never summed; TiedLayerSpec is the supported way to share. A stateless
            # one (a reused nn.ReLU()) is harmless to duplicate, so it is allowed.
            has_state = any(True for _ in layer.parameters()) or any(True for _ in layer.buffers())
            if id(layer) in seen and has_state:
                raise ConfigError(
                    f"layer {index} is the same {type(layer).__name__} object as layer {seen[id(layer)]}; "
                    f"to share a module between positions use TiedLayerSpec(key, cls, ...)"
                )
            seen[id(layer)] = index
        elif not isinstance(layer, LayerSpec):
            raise ConfigError(
                f"layer {index} is a {type(layer).__name__}, not an nn.Module or LayerSpec; "
                f"wrap callables in a module or describe them with LayerSpec(cls, *args)"
            )
    return result


def tied_groups(layers: Sequence[LayerLike]) -> dict[str, tuple[int, ...]]:
    """Tied key -> the indices of its occurrences, in model order."""
    groups: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            groups.setdefault(layer.key, []).append(index)
    return {key: tuple(indices) for key, indices in groups.items()}


def owner_indices(layers: Sequence[LayerLike]) -> list[int]:
    """Per layer, the index its parameters are named under: its own, or its tied key's first occurrence."""
    first: dict[str, int] = {}
    result = []
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            result.append(first.setdefault(layer.key, index))
        else:
            result.append(index)
    return result


def parameter_names(layer_index: int, owner: int, module: nn.Module) -> dict[str, str]:
    """A built layer's parameter names -> the names the pipeline gives them: the
    layer's own names under its (owner's) index, `"<owner>.<name>"`, or for a layer cut out
    of a user's module by `pipefold.split` the names that module gives them."""
    if getattr(module, "pipefold_keeps_names", False):
        names: dict[str, str] = module.parameter_names()  # type: ignore[operator]
        return names
    return {name: f"{owner}.{name}" for name, _ in module.named_parameters(remove_duplicate=False)}


def shared_names(
    index: int, owner: int, module: nn.Module, shared: Mapping[str, Sequence[tuple[int, str]]] | None
) -> dict[str, str]:
    """`parameter_names` of layer `index`, where each use of a parameter in `shared` (as
    `shared_parameter_uses` gives it) takes the parameter's first name: every rank then names a
    weight shared across layers alike, whichever of its holders it builds."""
    names = parameter_names(index, owner, module)
    prefix = name_prefix(owner, module)
    for name, uses in (shared or {}).items():
        for holder, use in uses:
            if holder == index:
                names[use.removeprefix(prefix)] = name
    return names


def name_prefix(owner: int, module: nn.Module) -> str:
    """What the pipeline puts before a layer's own state-dict keys ("" for split pieces)."""
    return "" if getattr(module, "pipefold_keeps_names", False) else f"{owner}."


def named_parameters(
    layers: Sequence[LayerLike],
    modules: Mapping[int, nn.Module],
    shared: Mapping[str, Sequence[tuple[int, str]]] | None = None,
) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of the built `modules` (index -> module, as `materialize` returns them),
    under the names `nn.Sequential(*layers)` would give: `"<layer index>.<param name>"`
    (for `pipefold.split` pieces, the split module's own names).

    A tied module is listed once, named after its FIRST occurrence even on a rank that
    holds only a later one, so every holder agrees on the name of the shared weight; so is a
    parameter of `shared` (`shared_parameter_uses(layers, meta_layers(layers))`).
    """
    owners = owner_indices(layers)
    seen: set[int] = set()
    for index in sorted(modules):
        names = shared_names(index, owners[index], modules[index], shared)
        for name, parameter in modules[index].named_parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                yield names[name], parameter


def shared_parameters(
    layers: Sequence[LayerLike], meta: Sequence[nn.Module]
) -> dict[str, tuple[int, ...]]:
    """Parameters held by several layers that are not one `TiedLayerSpec` key: a tensor
    object shared between modules (`head.weight = embed.weight`, a module reused inside two
    layers, a split module's tied embedding and head). Name (as `named_parameters` gives it,
    after the first holder) -> the indices of the layers that hold it, in model order.

    `meta` is `meta_layers(layers)`, which keeps such sharing (one copy per tensor)."""
    return {
        name: tuple(index for index, _ in uses) for name, uses in shared_parameter_uses(layers, meta).items()
    }


def shared_parameter_uses(
    layers: Sequence[LayerLike], meta: Sequence[nn.Module]
) -> dict[str, tuple[tuple[int, str], ...]]:
    """`shared_parameters` with each use named: name -> ((layer index, the name under which
    that layer holds it: "2.weight" in a plain list, "lm_head.weight" in a split piece), ...)."""
    owners = owner_indices(layers)
    uses: dict[int, list[tuple[int, str]]] = {}
    first_name: dict[int, str] = {}
    for index, module in enumerate(meta):
        names = parameter_names(index, owners[index], module)
        prefix = name_prefix(owners[index], module)
        for name, param in module.named_parameters(remove_duplicate=False):
            found = uses.setdefault(id(param), [])
            if owners[index] not in (owners[i] for i, _ in found):
                found.append((index, prefix + name))
            first_name.setdefault(id(param), names[name])
    return {first_name[key]: tuple(found) for key, found in uses.items() if len(found) > 1}


def apply_layer(layer: LayerLike, module: nn.Module, x: Any) -> Any:
    """Run one layer (the calling convention is in the module docstring)."""
    if isinstance(layer, TiedLayerSpec) and layer.forward_fn is not None:
        return layer.forward_fn(module, x)
    return module(x)


def _meta_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # Pre-seeding deepcopy's memo with meta stand-ins means the real data is never copied,
    # and sharing between modules (one memo for the whole model) is preserved. A split
    # piece keeps the whole module it was cut from (its prefix runs that module's forward),
    # whose every tensor gets a stand-in too.
    sources = [module]
    root = getattr(module, "root", None) if getattr(module, "pipefold_keeps_names", False) else None
    if isinstance(root, nn.Module):
        sources.append(root)
    for source in sources:
        for _, param in source.named_parameters(remove_duplicate=False):
            if id(param) not in memo:
                stand_in = torch.empty_like(param, device="meta")
                memo[id(param)] = nn.Parameter(stand_in, requires_grad=param.requires_grad)
        for buffer in source.buffers():
            if id(buffer) not in memo:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(module, memo)


def meta_layers(layers: nn.Sequential | Sequence[LayerLike]) -> list[nn.Module]:
    """The whole model on the meta device: no memory, real shapes and parameter counts.

    Tied occurrences are the same object; plain modules are copied to meta (the
    originals are left untouched).
    """
    description = as_layers(layers)
    memo: dict[int, Any] = {}
    tied: dict[str, nn.Module] = {}
    result: list[nn.Module] = []
    for layer in description:
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in tied:
                tied[layer.key] = layer.build("meta")
            result.append(tied[layer.key])
        elif isinstance(layer, LayerSpec):
            # Through the memo too: a parameter two specs were given stays one (shared_parameters).
            result.append(_meta_copy(layer.construct("meta"), memo))
        else:
            result.append(_meta_copy(layer, memo))
    return result


def _to_meta(sample: Any) -> Tensor | tuple[Tensor, ...]:
    if isinstance(sample, TensorMeta):
        return sample.empty("meta")
    TensorMeta.of(sample, what="sample", fix="pass a batch tensor, or a tuple of them, as the sample")
    if isinstance(sample, Tensor):
        return torch.empty_like(sample, device="meta")
    return tuple(torch.empty_like(t, device="meta") for t in sample)


def trace_boundaries(
    layers: nn.Sequential | Sequence[LayerLike],
    sample: Tensor | tuple[Tensor, ...] | TensorMeta,
    *,
    meta: Sequence[nn.Module] | None = None,
) -> list[TensorMeta]:
    """Element i describes the output of layer i, for an input shaped like `sample`.

    Runs on the meta device, so it costs no memory and no FLOPs and can be called
    for every micro-batch shape. Pass `meta=meta_layers(layers)` to reuse one meta
    build across calls; `layers` still supplies the tied occurrences' `forward_fn`.
    Only `sample`'s shapes and dtypes are used, never its values, so a `TensorMeta`
    works as the sample too.

    The tied occurrences' `forward_fn` lives on the specs, not on the (shared) meta
    module, so pass the description as `layers`, never only `meta_layers(layers)`.
    """
    description = as_layers(layers)
    modules = meta_layers(description) if meta is None else list(meta)
    if len(modules) != len(description):
        raise ConfigError(
            f"meta has {len(modules)} modules but layers has {len(description)}; "
            f"pass meta=meta_layers(layers)"
        )
    value: Any = _to_meta(sample)
    result: list[TensorMeta] = []
    # Tensors a layer creates in its forward (a mask, position ids) are made on meta too.
    with torch.no_grad(), torch.device("meta"):
        for index, (layer, module) in enumerate(zip(description, modules, strict=True)):
            try:
                # A split piece knows how to trace a forward that cannot run on meta (split.py).
                keeps_names = getattr(layer, "pipefold_keeps_names", False)
                trace = getattr(layer, "trace", None) if keeps_names else None
                value = trace(module, value) if trace is not None else apply_layer(layer, module, value)
            except Exception as error:
                # Turned into a ConfigError because a failure here is a description problem
                # (shapes that do not chain, or a layer that reads tensor values), found before any rank runs.
                raise ConfigError(
                    f"layer {index} ({layer_name(layer)}) failed on the meta device with input "
                    f"{TensorMeta.of(value, what='its input')}: {type(error).__name__}: {error}; "
                    f"check that the previous layer's output fits this layer, and that the layer "
                    f"does not read tensor values (.item(), data-dependent shapes)"
                ) from error
            result.append(TensorMeta.of(value, what=f"the output of layer {index} ({layer_name(layer)})"))
    return result


def _check_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    result = []
    for index in indices:
        if not isinstance(index, int) or not 0 <= index < num_layers:
            raise ConfigError(
                f"layer index {index!r} is out of range; the model has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )
        result.append(index)
    return sorted(set(result))


def _seeded_build(spec: LayerSpec, seed: int, device: Device, init_device: Device | None) -> nn.Module:
    where = torch.device(device if init_device is None else init_device)
    # fork_rng restores the caller's RNG state afterwards (CPU, plus the init device if it is a GPU).
    accel = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=accel):
        torch.manual_seed(seed)
        module = spec.build(where)
    return module.to(device)


def materialize(
    layers: nn.Sequential | Sequence[LayerLike],
    indices: Sequence[int],
    device: Device,
    *,
    seed: int = 0,
    init_device: Device | None = "cpu",
) -> dict[int, nn.Module]:
    """Build only the layers at `indices`, on `device`; see the module docstring (initialization).

    Tied occurrences among `indices` share one module. Plain `nn.Module` layers are
    used as given, moved to `device` (in place); a layer with a `materialize_` method (a
    `pipefold.split` piece of a module built on meta) whose tensors are on the meta device
    gets them that way, in place (e.g. read from a checkpoint). `init_device=None` initializes
    directly on `device` (faster for large GPU models, but then weights depend on
    that device's RNG).
    """
    description = as_layers(layers)
    wanted = _check_indices(indices, len(description))
    first_of: dict[str, tuple[int, TiedLayerSpec]] = {}
    for index, layer in enumerate(description):
        if isinstance(layer, TiedLayerSpec):
            first_of.setdefault(layer.key, (index, layer))
    tied: dict[str, nn.Module] = {}
    result: dict[int, nn.Module] = {}
    for index in wanted:
        layer = description[index]
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in tied:
                first, first_spec = first_of[layer.key]
                tied[layer.key] = _seeded_build(first_spec, seed + first, device, init_device)
            result[index] = tied[layer.key]
        elif isinstance(layer, LayerSpec):
            result[index] = _seeded_build(layer, seed + index, device, init_device)
        elif _needs_materialize(layer):
            result[index] = layer.materialize_(device)  # type: ignore[operator]
        else:
            result[index] = layer.to(device)
    return result


def _needs_materialize(layer: nn.Module) -> bool:
    if not callable(getattr(layer, "materialize_", None)):
        return False
    return any(t.is_meta for t in layer.parameters()) or any(t.is_meta for t in layer.buffers())


def build_reference(
    layers: nn.Sequential | Sequence[LayerLike],
    device: Device = "cpu",
    *,
    seed: int = 0,
    init_device: Device | None = "cpu",
) -> ReferenceModel:
    """The whole model on one process, with the weights `materialize` gives every layer.

    Plain modules are deep-copied so the reference never aliases the pipeline's
    modules (both live in one process in exactness tests).
    """
    description = as_layers(layers)
    copies: list[LayerLike] = [
        copy.deepcopy(layer) if isinstance(layer, nn.Module) else layer for layer in description
    ]
    built = materialize(copies, range(len(copies)), device, seed=seed, init_device=init_device)
    forward_fns = [layer.forward_fn if isinstance(layer, TiedLayerSpec) else None for layer in description]
    return ReferenceModel([built[i] for i in range(len(copies))], forward_fns)
