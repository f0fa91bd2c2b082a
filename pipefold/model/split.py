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
of the same structure (`pipefold.model.twin` makes one for Hugging Face models). Pieces of a
meta module get real weights with `SplitPiece.materialize_`, which
`pipefold.model.build.materialize` calls for the layers a rank owns.

Parameter names stay the module's own (`transformer.h.3.attn.c_attn.weight`), so the
pipeline's gathered state dict is the module's, and a parameter the module shares between two
places (a tied embedding and head) is one tied parameter of the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pipefold.errors import ConfigError
from pipefold.model.split_graph import graph_split
from pipefold.model.split_init import Init, init_fill, state_dict_fill
from pipefold.model.split_piece import Fill, SplitPiece, pieces_of
from pipefold.model.split_trace import NotAChain, Template, hidden_of, on_meta_device, trace_calls
from pipefold.model.twin import Twin, default_twin

__all__ = ["split", "SplitPiece", "find_blocks", "Fill", "pieces_of"]

class _FirstBlockReached(Exception):
    """Raised by the prefix's hook on the first block: the prefix is done."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("first block reached")
        self.args_ = args
        self.kwargs_ = kwargs


class _Prefix(SplitPiece):
    def __init__(
        self,
        root: nn.Module,
        paths: Sequence[str],
        first_block: str,
        template: Template,
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
    def __init__(self, root: nn.Module, path: str, template: Template) -> None:
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
        hidden = hidden_of(block(hidden, *args, **kwargs))
        return (hidden, *_carry(carried)) if num_carried else hidden


class _Suffix(SplitPiece):
    def __init__(
        self, root: nn.Module, calls: Sequence[tuple[str, Template, int]], num_carried: int
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
    init: Init | Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> list[nn.Module]:
    """Cut `module` into pipeline layers `[prefix, *blocks, suffix]` (see the module docstring).

    `example_inputs`: what `module(*example_inputs)` takes (a tensor or a tuple); only
    shapes and dtypes are used (it runs on the meta device). Optional for a Hugging Face
    causal LM (token ids are made up from its config).
    `split_points`: submodule names (`"layers.4"`); the module is cut just before each one's call
    through a graph capture (`pipefold.model.split_graph`), one layer per piece, instead of at
    its blocks.
    `twin`: see `pipefold.model.twin.Twin`; made automatically for a Hugging Face model of a family
    `pipefold.hf.model` supports.
    `init`, `seed`: for a module built on the meta device, how each rank gives values to the
    pieces it materializes (`pipefold.model.split_init`): a state dict of the module's names, or
    `init(path, module)` per module that owns a new tensor (default: its `reset_parameters()`),
    run under a seed drawn from `seed` and the module's path.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"split: module must be an nn.Module, got {type(module).__name__}")
    layers = _split(module, split_points, example_inputs, twin)
    meta = _has_meta_tensors(module)
    if init is not None and not meta:
        raise ConfigError(
            "split(init=...): the module's weights are already real (init gives values to a module "
            "built on the meta device); build it under `with torch.device('meta'):`, or drop init"
        )
    if meta and twin is None and default_twin(module) is None:
        fill = state_dict_fill(init) if isinstance(init, Mapping) else init_fill(seed, init)
        for piece in pieces_of(layers):
            piece.fill = fill
    elif init is not None:
        raise ConfigError(
            "split(init=...): a Hugging Face model on the meta device gets its weights from "
            "pipefold.hf.model.load_causal_lm (a model directory, or its own _init_weights)"
        )
    return layers


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _split(
    module: nn.Module, split_points: Sequence[str] | None, example_inputs: Any, twin: Twin | None
) -> list[nn.Module]:
    if split_points is not None:
        if isinstance(split_points, str) or not split_points:
            raise ConfigError(
                f"split(split_points={split_points!r}): give a non-empty list of submodule names, "
                "such as ['layers.4']"
            )
        if example_inputs is None:
            example_inputs = _default_example(module)
        example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        # A Hugging Face causal LM: called without a key/value cache, its pipeline's output the logits.
        hf = default_twin(module) is not None
        return graph_split(
            module, list(split_points), example, where=f"split(split_points={list(split_points)!r})",
            call_kwargs=_default_call_kwargs(module), select="logits" if hf else None,
        )
    found = find_blocks(module)
    if found is None:
        raise ConfigError(
            f"split: {type(module).__name__} has no repeated blocks (an nn.ModuleList or nn.Sequential of "
            "two or more modules of one class) to cut between, and no split_points; give "
            "split_points=['<submodule>', ...], or describe it as a list of layers"
        )
    blocks_path, blocks = found
    if example_inputs is None:
        example_inputs = _default_example(module)
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    call_kwargs = _default_call_kwargs(module)
    if twin is None:
        twin = default_twin(module)
    traced, num_traced = module, len(blocks)
    if twin is not None and on_meta_device(module):
        traced = twin(None)
        found_in_twin = find_blocks(traced)
        if found_in_twin is None or found_in_twin[0] != blocks_path:
            raise ConfigError(
                f"split: the twin of {type(module).__name__} has no blocks at {blocks_path!r}; a twin must "
                "have the module's structure"
            )
        num_traced = len(found_in_twin[1])
    block_paths = [f"{blocks_path}.{index}" for index in range(len(blocks))]
    try:
        prefix_template, chain = trace_calls(traced, blocks_path, num_traced, example, call_kwargs)
    except NotAChain as refused:
        if twin is not None or call_kwargs:
            raise
        # A skip connection around the blocks (`head(x + x0)`): the graph route cuts at the same
        # places and carries what crosses.
        try:
            return graph_split(module, block_paths, example, after_last=block_paths[-1])
        except ConfigError as graph_refused:
            raise ConfigError(f"{refused}; and through a graph capture: {graph_refused}") from refused
    prefix_paths, root_tensors = _prefix_paths(module, blocks_path, [path for path, _, _ in chain])
    prefix = _Prefix(module, prefix_paths, block_paths[0], prefix_template, call_kwargs, root_tensors, twin)
    layers: list[nn.Module] = [prefix]
    layers += [_Block(module, path, prefix_template) for path in block_paths]
    layers.append(_Suffix(module, chain, prefix_template.num_tensors))
    return layers


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
