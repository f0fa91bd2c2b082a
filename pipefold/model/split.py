"""Your own `nn.Module` as pipeline layers: `split(module)`.

    layers = pipefold.split(model, example_inputs=(tokens,))
    pipe = pipefold.Pipeline(layers, loss_fn=loss, schedule="1f1b")

`split` finds the module's repeated blocks (the largest `nn.ModuleList` / `nn.Sequential`
of two or more modules of one class, such as `transformer.h` or `model.layers`) and cuts
the module into `[prefix, block 0, ..., block n-1, suffix]`, without tracing:

- the prefix layer runs the module's own `forward` up to the call of the first block
  (embeddings, position ids, masks, rotary tables: whatever the forward computes there);
- each block layer calls its block with the arguments the forward gave the first block:
  tensors travel along the pipeline with the hidden state, everything else (None, flags)
  is fixed at split time;
- the suffix layer applies the module calls that follow the last block (final norm,
  head), which must form a chain: each takes the previous one's output, and the
  module's output is the last one's (for a Hugging Face model, `.logits`).

`split` runs the forward once on `example_inputs` to learn this structure, and refuses
(`ConfigError`, naming the module) a forward it cannot cut this way. A module whose
parameters are on the meta device runs on meta inputs, or, where its forward reads tensor
values (a Hugging Face model's mask code does), a `twin` runs instead: a small real module
of the same structure (`pipefold.hf.model` makes one for Hugging Face models). Pieces of a
meta module get real weights with `SplitPiece.materialize_`, which
`pipefold.model.build.materialize` calls for the layers a rank owns.

Parameter names stay the module's own (`transformer.h.3.attn.c_attn.weight`), so the pipeline's gathered state dict is the module's, and a parameter the module shares
between two places (a tied embedding and head) is one tied parameter of the pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pipefold.errors import ConfigError

__all__ = ["split", "SplitPiece", "find_blocks", "Twin", "Fill"]

Twin = Callable[[Sequence[str] | None], nn.Module]
"""`twin(real_paths)`: a module with the structure of the one split (the same submodule paths
outside the blocks, the same block class, two or more blocks) whose tensors under
`real_paths` (None: all) are real; it runs the forward where the split module's parameters
are on the meta device. Its values do not matter, only the calls its forward makes."""

Fill = Callable[["SplitPiece", Mapping[str, Tensor]], None]
"""`fill(piece, fresh)`: give values to the tensors `SplitPiece.materialize_` just allocated,
`fresh` mapping their names in the whole module to them (e.g. read from a checkpoint)."""


class _Slot:
    """Where a tensor argument goes in a call template."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _Slot()


@dataclass(frozen=True)
class _Template:
    """A call's arguments with the tensors taken out: the pytree spec and its leaves, a
    tensor leaf replaced by `_SLOT`."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Template:
        return self  # immutable; and copying a TreeSpec warns in torch 2.13

    @property
    def num_tensors(self) -> int:
        return sum(1 for leaf in self.leaves if leaf is _SLOT)

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Template, list[Tensor]]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        template = cls(spec, tuple(_SLOT if isinstance(leaf, Tensor) else leaf for leaf in leaves))
        return template, tensors

    def fill(self, tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = iter(tensors)
        leaves = [next(values) if leaf is _SLOT else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)

    def tensors_of(self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> list[Tensor]:
        """The tensors of a call shaped like this template; refuses changed constants."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec or len(leaves) != len(self.leaves):
            raise ConfigError(
                f"{where}: the forward called the first block with other arguments than at split time "
                f"({spec} vs {self.spec}); call split() with example_inputs shaped like the training batches"
            )
        tensors = []
        for leaf, expected in zip(leaves, self.leaves, strict=True):
            if expected is _SLOT:
                if not isinstance(leaf, Tensor):
                    raise ConfigError(
                        f"{where}: a block argument that was a tensor at split time is {leaf!r}"
                    )
                tensors.append(leaf)
            elif not _same_constant(leaf, expected):
                raise ConfigError(
                    f"{where}: a non-tensor block argument changed from {expected!r} at split time to "
                    f"{leaf!r}; the blocks receive the split-time value, so pass inputs that keep it"
                )
        return tensors


def _same_constant(value: Any, expected: Any) -> bool:
    if value is expected:
        return True
    try:
        return bool(value == expected) and type(value) is type(expected)
    except Exception:  # objects whose == raises or is not a bool (arrays) count as changed
        return False


class _FirstBlockReached(Exception):
    """Raised by the prefix's hook on the first block: the prefix is done."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("first block reached")
        self.args_ = args
        self.kwargs_ = kwargs


def _hidden_of(output: Any) -> Any:
    """A block's hidden state: its output, or the first element of a tuple it returns."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def _model_output(output: Any) -> Any:
    """The tensor a module's forward gives as its result (`.logits` of a Hugging Face output)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


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
            name: canonical.get(id(buffer), name) for name, buffer in self.named_buffers(remove_duplicate=False)
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
        return _meta_tree(output)

    def extra_repr(self) -> str:
        return f"{self.kind}: {', '.join(self.paths) or '(root)'}"


class _Prefix(SplitPiece):
    def __init__(
        self,
        root: nn.Module,
        paths: Sequence[str],
        first_block: str,
        template: _Template,
        call_kwargs: dict[str, Any],
        root_tensors: Sequence[str],
        twin: Twin | None = None,
    ) -> None:
        super().__init__(root, paths, "prefix")
        self._first_block = first_block
        self._template = template
        self._call_kwargs = dict(call_kwargs)
        self._twin = twin
        # Parameters and buffers set directly on the root (not in a submodule) are the prefix's.
        for name in root_tensors:
            value = getattr(root, name)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                # Kept out of the state dict where the module keeps it out (rotary tables, say).
                self.register_buffer(name, value, persistent=name not in root._non_persistent_buffers_set)

    def forward(self, inputs: Any) -> Any:
        if self._twin is not None and any(
            isinstance(leaf, Tensor) and leaf.is_meta for leaf in pytree.tree_leaves(inputs)
        ):
            # Shapes only (pipefold.model.build.trace_boundaries): the module's forward may read
            # tensor values, which meta tensors have not, so its twin runs on zeros of the shapes.
            # On the CPU even inside trace_boundaries' meta device context: the twin must hold values.
            with torch.device("cpu"), torch.no_grad():
                twin = self._twin(self.paths)
                zeros = pytree.tree_map(
                    lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, Tensor) else t, inputs
                )
                out = self._run(twin, zeros)
            return pytree.tree_map(
                lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, Tensor) else t,
                out,
            )
        return self._run(self.root, inputs)

    def _run(self, root: nn.Module, inputs: Any) -> Any:
        block = root.get_submodule(self._first_block)

        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _FirstBlockReached(args, kwargs)

        handle = block.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            root(*args, **self._call_kwargs)
        except _FirstBlockReached as reached:
            hidden, rest = reached.args_[0], reached.args_[1:]
            tensors = self._template.tensors_of(rest, reached.kwargs_, "split prefix")
            return (hidden, *tensors) if tensors else hidden
        finally:
            handle.remove()
        raise ConfigError(
            f"split prefix: {type(root).__name__}.forward returned without calling {self._first_block}; "
            "the blocks must be called on every forward"
        )


def _carry(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    # A tensor passed on unchanged gets a view of its own, so the next stage's gradient
    # reaches it through a node of this stage's graph rather than as the received leaf.
    return tuple(t.view_as(t) if t.requires_grad else t for t in tensors)


class _Block(SplitPiece):
    def __init__(self, root: nn.Module, path: str, template: _Template) -> None:
        super().__init__(root, [path], "block")
        self._path = path
        self._template = template

    def forward(self, value: Any) -> Any:
        num_carried = self._template.num_tensors
        if num_carried:
            hidden, carried = value[0], value[1:]
        else:
            hidden, carried = value, ()
        args, kwargs = self._template.fill(carried)
        block = self.get_submodule(self._path)
        hidden = _hidden_of(block(hidden, *args, **kwargs))
        return (hidden, *_carry(carried)) if num_carried else hidden


class _Suffix(SplitPiece):
    def __init__(
        self, root: nn.Module, calls: Sequence[tuple[str, _Template, int]], num_carried: int
    ) -> None:
        super().__init__(root, [path for path, _, _ in calls], "suffix")
        self._calls = tuple(calls)
        self._num_carried = num_carried

    def forward(self, value: Any) -> Any:
        hidden = value[0] if self._num_carried else value
        for path, template, position in self._calls:
            args, kwargs = template.fill([])
            args = (*args[:position], hidden, *args[position:])
            hidden = self.get_submodule(path)(*args, **kwargs)
        return hidden


# -- finding the structure ----------------------------------------------------------------------


def find_blocks(module: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The module's repeated blocks: the `ModuleList`/`Sequential` of >= 2 modules of one
    class holding the most parameters; None if there is none."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, child in module.named_modules():
        if not name or not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) < 2:
            continue
        members = list(child.children())
        if len({type(block) for block in members}) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if best is None or size > best[0]:
            best = (size, name, members)
    return None if best is None else (best[1], best[2])


@dataclass
class _Call:
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


def _meta_tree(value: Any) -> Any:
    return pytree.tree_map(
        lambda leaf: torch.empty_like(leaf, device="meta") if isinstance(leaf, Tensor) else leaf, value
    )


def _is_same_or_whole_view(value: Any, of: Tensor) -> bool:
    if value is of:
        return True
    return (
        isinstance(value, Tensor)
        and value._base is not None
        and (value._base is of or value._base is of._base)
        and value.shape == of.shape
        and value.stride() == of.stride()
        and value.storage_offset() == of.storage_offset()
    )


def _default_call_kwargs(module: nn.Module) -> dict[str, Any]:
    # A Hugging Face model builds a key/value cache unless told not to; training needs none.
    config = getattr(module, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def _default_example(module: nn.Module) -> tuple[Any, ...]:
    config = getattr(module, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        length = min(8, int(getattr(config, "max_position_embeddings", 8) or 8))
        return (torch.zeros(1, length, dtype=torch.long),)
    raise ConfigError(
        f"split({type(module).__name__}): give example_inputs=(a batch shaped like the training inputs,) "
        "so split can run the forward once (on the meta device) and find where to cut"
    )


def split(
    module: nn.Module,
    *,
    split_points: Sequence[str] | None = None,
    example_inputs: Any = None,
    twin: Twin | None = None,
) -> list[nn.Module]:
    """Cut `module` into pipeline layers `[prefix, *blocks, suffix]` (see the module docstring).

    `example_inputs`: what `module(*example_inputs)` takes (a tensor or a tuple); only
    shapes and dtypes are used (it runs on the meta device). Optional for a Hugging Face
    causal LM (token ids are made up from its config).
    `split_points`: not supported yet (cutting at arbitrary named points needs a graph
    capture); the layers are cut at block boundaries and the partitioner groups them.
    `twin`: see `Twin`; made automatically for a Hugging Face model of a family
    `pipefold.hf.model` supports.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"split: module must be an nn.Module, got {type(module).__name__}")
    if split_points is not None:
        raise ConfigError(
            f"split(split_points={list(split_points)!r}): cutting at named points is not supported yet; "
            "split cuts at every block boundary and Pipeline(layout=LayoutOptions(partition=...)) groups "
            "the blocks into stages"
        )
    found = find_blocks(module)
    if found is None:
        raise ConfigError(
            f"split: {type(module).__name__} has no repeated blocks (an nn.ModuleList or nn.Sequential of "
            "two or more modules of one class) to cut between; describe it as a list of layers instead"
        )
    blocks_path, blocks = found
    if example_inputs is None:
        example_inputs = _default_example(module)
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    call_kwargs = _default_call_kwargs(module)
    if twin is None:
        twin = default_twin(module)
    traced, num_traced = module, len(blocks)
    if twin is not None and _on_meta(module):
        traced = twin(None)
        found_in_twin = find_blocks(traced)
        if found_in_twin is None or found_in_twin[0] != blocks_path:
            raise ConfigError(
                f"split: the twin of {type(module).__name__} has no blocks at {blocks_path!r}; a twin must "
                "have the module's structure"
            )
        num_traced = len(found_in_twin[1])
    prefix_template, chain = _trace(traced, blocks_path, num_traced, example, call_kwargs)
    block_paths = [f"{blocks_path}.{index}" for index in range(len(blocks))]
    prefix_paths, root_tensors = _prefix_paths(module, blocks_path, [path for path, _, _ in chain])
    prefix = _Prefix(module, prefix_paths, block_paths[0], prefix_template, call_kwargs, root_tensors, twin)
    layers: list[nn.Module] = [prefix]
    layers += [_Block(module, path, prefix_template) for path in block_paths]
    layers.append(_Suffix(module, chain, prefix_template.num_tensors))
    return layers


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or not any(True for _ in module.parameters())


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


def _trace(
    module: nn.Module,
    blocks_path: str,
    num_blocks: int,
    example: tuple[Any, ...],
    call_kwargs: dict[str, Any],
) -> tuple[_Template, list[tuple[str, _Template, int]]]:
    """Run the forward once and read the prefix's call of the first block and the chain of
    module calls after the last one. A module with real weights runs itself (no_grad, a
    batch shaped like `example`); a module on the meta device runs on meta inputs."""
    on_meta = _on_meta(module)
    meta = module
    blocks = list(meta.get_submodule(blocks_path).children())
    block_calls: list[_Call] = []
    after: list[_Call] = []
    active: list[str] = []
    done = [False]
    handles = []

    def enter_block(index: int) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            block_calls.append(_Call(f"{blocks_path}.{index}", args, kwargs))
        return hook

    def leave_block(index: int) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            block_calls[-1].output = output
            done[0] = index == num_blocks - 1
        return hook

    def enter(path: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if done[0]:
                if not active:
                    after.append(_Call(path, args, kwargs))
                active.append(path)
        return hook

    def leave(path: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if active and active[-1] == path:
                active.pop()
                if not active and after and after[-1].path == path:
                    after[-1].output = output
        return hook

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter_block(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave_block(index), with_kwargs=True))
    inside_blocks = f"{blocks_path}."
    for path, sub in meta.named_modules():
        if not path or path == blocks_path or path.startswith(inside_blocks):
            continue
        if blocks_path.startswith(path + "."):
            continue  # an ancestor of the blocks: entered before them, left after them
        handles.append(sub.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(sub.register_forward_hook(leave(path), with_kwargs=True))
    try:
        if on_meta:
            # Tensors the forward creates (masks, position ids) are made on meta too.
            with torch.no_grad(), torch.device("meta"):
                output = meta(*_meta_tree(example), **call_kwargs)
        else:
            with torch.no_grad():
                output = meta(*example, **call_kwargs)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"split: {type(module).__name__}.forward failed on example_inputs"
            f"{' (on the meta device)' if on_meta else ''} "
            f"({type(error).__name__}: {error}); pass example_inputs shaped like one training batch"
            + ("; a module on the meta device must run on meta tensors (no .item() or data-dependent "
               "shapes): build it with real weights instead" if on_meta else "")
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    name = type(module).__name__
    order = [call.path for call in block_calls]
    expected = [f"{blocks_path}.{index}" for index in range(num_blocks)]
    if order != expected:
        raise ConfigError(
            f"split: {name}.forward called its blocks as {order}, not once each in order {expected[:3]}...; "
            "a module used at two depths, or blocks skipped by data-dependent control flow, cannot be cut "
            "at block boundaries"
        )
    first = block_calls[0]
    if not first.args or not isinstance(first.args[0], Tensor):
        raise ConfigError(
            f"split: {name} calls {first.path} without a hidden-state tensor as its first argument"
        )
    template, tensors = _Template.of(first.args[1:], first.kwargs)
    for previous, call in zip(block_calls, block_calls[1:], strict=False):
        hidden = _hidden_of(previous.output)
        rest_template, rest = _Template.of(call.args[1:], call.kwargs)
        same = (
            call.args
            and call.args[0] is hidden
            and rest_template.spec == template.spec
            and len(rest) == len(tensors)
            and all(a is b for a, b in zip(rest, tensors, strict=True))
            and all(
                _same_constant(a, b) for a, b in zip(rest_template.leaves, template.leaves, strict=True)
            )
        )
        if not same:
            raise ConfigError(
                f"split: {name} calls {call.path} with other inputs than {previous.path}'s output and the "
                "first block's other arguments; the data passed between its blocks cannot be carried "
                "at block boundaries"
            )
    value = _hidden_of(block_calls[-1].output)
    chain: list[tuple[str, _Template, int]] = []
    for call in after:
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        tensor_leaves = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        positions = [i for i, arg in enumerate(call.args) if isinstance(arg, Tensor)]
        if len(tensor_leaves) != 1 or len(positions) != 1 or not _is_same_or_whole_view(
            call.args[positions[0]], value
        ):
            raise ConfigError(
                f"split: after its blocks, {name} calls {call.path} on something other than the previous "
                "module's output alone; the code after the last block must be a chain of module calls "
                "(final norm, head)"
            )
        position = positions[0]
        others = call.args[:position] + call.args[position + 1 :]
        call_template, _ = _Template.of(others, call.kwargs)
        chain.append((call.path, call_template, position))
        value = call.output
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"split: {name}'s {call.path} after the blocks returns a {type(value).__name__}"
            )
    result = _model_output(output)
    if not isinstance(result, Tensor) or not _is_same_or_whole_view(result, value):
        raise ConfigError(
            f"split: {name}.forward's result is not the output of its last module call after the blocks "
            f"({chain[-1][0] if chain else 'the last block'}); computations after the blocks outside "
            "modules cannot be cut at block boundaries"
        )
    return template, chain


def _prefix_paths(
    module: nn.Module, blocks_path: str, suffix_paths: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The submodules the prefix owns: every child not holding the blocks or a suffix module,
    recursing into the ancestors of those; and the tensors set on such ancestors directly."""
    owned: list[str] = []
    root_tensors: list[str] = []
    taken = [blocks_path, *suffix_paths]

    def visit(prefix: str, current: nn.Module) -> None:
        own = list(current.named_parameters(recurse=False)) + list(current.named_buffers(recurse=False))
        for name, _ in own:
            if prefix:
                owned.append(f"{prefix}{name}")  # a tensor on an ancestor: registered by path below
            else:
                root_tensors.append(name)
        for name, child in current.named_children():
            path = f"{prefix}{name}"
            if any(t == path for t in taken):
                continue
            if any(t.startswith(path + ".") for t in taken):
                visit(path + ".", child)
            else:
                owned.append(path)

    visit("", module)
    tensors_on_ancestors = [path for path in owned if not isinstance(_lookup(module, path), nn.Module)]
    if tensors_on_ancestors:
        raise ConfigError(
            f"split: {type(module).__name__} holds {tensors_on_ancestors} directly on a module that also "
            "holds the blocks; move them into a submodule (or onto the top module)"
        )
    return owned, root_tensors


def _lookup(module: nn.Module, path: str) -> Any:
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def pieces_of(layers: Sequence[Any]) -> Iterator[SplitPiece]:
    """The `SplitPiece` layers among `layers`."""
    for layer in layers:
        if isinstance(layer, SplitPiece):
            yield layer
