"""Cut any `nn.Module` at named points through a graph capture: `split(module, split_points=[...])`.

    layers = pipefold.split(model, split_points=["layers.4"], example_inputs=(tokens,))

The module's forward is captured once with `torch.export` (non-strict, the batch dimension of
every input dynamic) into one graph of ATen operations, in the order the forward runs them. A
split point names a submodule; the cut falls just before the first operation of its call (the
call's inputs cross the cut). Each piece runs its part of the graph as generated Python code
on the module's own parameters, registered under their names in the module; the tensors that
cross a cut (hidden states, masks, position ids, a residual from several pieces back) become
the boundary tuple, passed on by every piece in between. Sizes derived from the batch are
recomputed from the tensors a piece receives; every other constant (sequence length, the
training flag of dropout) is fixed at split time, and the first piece refuses inputs of other
shapes than the example's (batch dimension aside).

`torch.export` rather than `torch.fx.symbolic_trace`: fx cannot trace the commonest line of a
transformer's forward (`torch.arange(tokens.shape[1])`, `torch.ones(seq, 1)`: factory calls on
traced sizes), and export keeps each operation's module path (`nn_module_stack`), which places
the cuts and tells a module called twice from one called once. It also runs on a module whose
parameters are on the meta device, so a large module is captured without memory.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from pipefold.errors import ConfigError
from pipefold.model.split_piece import SplitPiece
from pipefold.model.split_trace import on_meta_device

__all__ = ["GraphPiece", "graph_split"]


@dataclass(frozen=True)
class _Code:
    """A piece's generated forward and how to read its result (immutable; shared by copies)."""

    fn: Any
    out_spec: pytree.TreeSpec | None
    """The module's output structure, for the last piece; None for the others."""
    passthrough: tuple[int, ...]
    """Outputs that are inputs passed on unchanged (given a view of their own)."""
    input_shapes: tuple[tuple[int | None, ...], ...] | None
    """For the first piece: each input's shape, None where the size is free (the batch)."""
    select: str | None = None
    """For the last piece: the field of the module's output to return (a Hugging Face model's
    "logits"); None: the output as the module returns it."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Code:
        return self


class GraphPiece(SplitPiece):
    """One piece of a module cut by `graph_split`: runs its part of the captured graph on the
    module's own tensors, which it registers under their paths in the module."""

    def __init__(self, root: nn.Module, index: int, label: str, tensors: Sequence[str], code: _Code) -> None:
        super().__init__(root, (), "graph")
        self.index = index
        self.label = label
        self.paths = tuple(tensors)
        self._code = code
        for path in tensors:
            self._register_tensor(root, path)

    def _register_tensor(self, root: nn.Module, path: str) -> None:
        owner_path, _, name = path.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        holder: nn.Module = self
        for part in owner_path.split(".") if owner_path else []:
            child = holder._modules.get(part)
            if child is None:
                child = nn.Module()
                holder.add_module(part, child)
            holder = child
        value = getattr(owner, name)
        if isinstance(value, nn.Parameter):
            holder.register_parameter(name, value)
        else:
            holder.register_buffer(name, value, persistent=name not in owner._non_persistent_buffers_set)

    def forward(self, value: Any) -> Any:
        code = self._code
        args = value if isinstance(value, tuple) else (value,)
        if code.input_shapes is not None:
            _check_inputs(args, code.input_shapes)
        outputs = code.fn(self, *args)
        if code.out_spec is not None:
            result = pytree.tree_unflatten(list(outputs), code.out_spec)
            return result if code.select is None else result[code.select]
        outputs = list(outputs)
        for position in code.passthrough:
            # A tensor passed on unchanged gets a view of its own, so the next stage's gradient
            # reaches it through a node of this stage's graph rather than as the received leaf.
            if outputs[position].requires_grad:
                outputs[position] = outputs[position].view_as(outputs[position])
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def extra_repr(self) -> str:
        return f"graph piece {self.index}: {self.label}"


def _check_inputs(args: tuple[Any, ...], shapes: tuple[tuple[int | None, ...], ...]) -> None:
    if len(args) != len(shapes):
        raise ConfigError(
            f"split piece 0: got {len(args)} inputs, the module was split for {len(shapes)}; pass the "
            "inputs as at split time (example_inputs)"
        )
    for position, (arg, shape) in enumerate(zip(args, shapes, strict=True)):
        if not isinstance(arg, Tensor) or arg.dim() != len(shape) or any(
            size is not None and size != actual for size, actual in zip(shape, arg.shape, strict=True)
        ):
            got = tuple(arg.shape) if isinstance(arg, Tensor) else type(arg).__name__
            raise ConfigError(
                f"split piece 0: input {position} has shape {got}, but the graph was captured for "
                f"{tuple('batch' if s is None else s for s in shape)}; torch.export fixed every size but the "
                "batch, so split with example_inputs shaped like the training micro-batches"
            )


# -- capture ------------------------------------------------------------------------------------


def _capture(
    module: nn.Module, example: tuple[Any, ...], where: str, call_kwargs: Mapping[str, Any]
) -> torch.export.ExportedProgram:
    for position, arg in enumerate(example):
        if not isinstance(arg, Tensor):
            raise ConfigError(
                f"{where}: example_inputs[{position}] is a {type(arg).__name__}; the graph route takes "
                "tensor inputs only: bind the others (functools.partial, or a wrapper module) "
                "before splitting"
            )
    on_meta = on_meta_device(module)
    if on_meta:
        example = tuple(torch.empty_like(t, device="meta") for t in example)
    if all(t.dim() >= 1 and t.shape[0] == 1 for t in example):
        # torch.export specializes a size of 1; two rows keep the batch dimension free.
        example = tuple(t.expand(2, *t.shape[1:]).clone() for t in example)
    dynamic: Any = tuple({0: torch.export.Dim.AUTO} if t.dim() >= 1 else None for t in example)
    kwargs = dict(call_kwargs)
    if kwargs:
        # With keyword arguments, export matches dynamic shapes to the forward's parameters by name.
        bound = inspect.signature(module.forward).bind(*example)
        dynamic = {name: shape for name, shape in zip(bound.arguments, dynamic, strict=True)}
        dynamic.update(dict.fromkeys(kwargs))
    try:
        if on_meta:
            # Tensors the forward creates (masks, position ids) are made on meta too.
            with torch.device("meta"):
                return torch.export.export(module, example, kwargs, dynamic_shapes=dynamic, strict=False)
        return torch.export.export(module, example, kwargs, dynamic_shapes=dynamic, strict=False)
    except ConfigError:
        raise
    except Exception as error:
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if "DataDependent" in type(error).__name__ or "data-dependent" in str(error):
            raise ConfigError(
                f"{where}: {type(module).__name__}.forward branches on a tensor's value ({text}), which "
                "torch.export cannot capture, so the module cannot be cut at named points; move the branch "
                "into a block and split without split_points (the blocks run eagerly), or make it "
                "data-independent (torch.where, torch.cond)"
            ) from error
        raise ConfigError(
            f"{where}: torch.export could not capture {type(module).__name__}.forward on example_inputs "
            f"({text}); pass example_inputs shaped like one training batch"
        ) from error


def _suggest(module: nn.Module, point: str) -> str:
    names = [name for name, _ in module.named_modules() if name]
    close = difflib.get_close_matches(point, names, n=3)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"submodules: {names[:6]}..."


def _val(node: fx.Node) -> Any:
    return node.meta.get("val")


def _size_expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def graph_split(
    module: nn.Module,
    points: Sequence[str],
    example: tuple[Any, ...],
    *,
    after_last: str | None = None,
    where: str = "split",
    call_kwargs: Mapping[str, Any] | None = None,
    select: str | None = None,
) -> list[nn.Module]:
    """Cut `module` before the call of each submodule named in `points` (and after the call
    of `after_last`, if given); see the module docstring. Raises ConfigError for a point that
    names no module, one the forward never calls or calls twice, and a forward torch.export
    cannot capture. `call_kwargs`: non-tensor keyword arguments of every call, fixed at capture
    (`use_cache=False`); `select`: the field of the module's output the last piece returns."""
    for point in points:
        if not isinstance(point, str) or not point:
            raise ConfigError(
                f"{where}: split point {point!r} must be a submodule's name, such as 'layers.4'"
            )
        try:
            module.get_submodule(point)
        except AttributeError:
            raise ConfigError(
                f"{where}: split point {point!r} names no submodule of {type(module).__name__}; "
                f"{_suggest(module, point)}"
            ) from None
    if len(set(points)) != len(points):
        raise ConfigError(f"{where}: split points {list(points)} name a module twice; name each cut once")
    program = _capture(module, example, where, call_kwargs or {})
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        mutated = [*signature.buffers_to_mutate.values(), *signature.user_inputs_to_mutate.values()]
        raise ConfigError(
            f"{where}: {type(module).__name__}.forward updates {mutated} in place (running statistics, "
            "say); the graph route runs pure computations only: use a module without them, or split "
            "without split_points"
        )
    graph = program.graph
    nodes = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    kinds = {spec.arg.name: spec for spec in signature.input_specs if hasattr(spec.arg, "name")}
    user_inputs = [
        node
        for node in graph.nodes
        if node.op == "placeholder" and kinds[node.name].kind.name == "USER_INPUT"
    ]
    # Keyword arguments (call_kwargs) are inputs of the graph too; their values are fixed at capture.
    fixed = [node for node in user_inputs if not isinstance(_val(node), Tensor)]
    for node in fixed:
        if node.users:
            raise ConfigError(
                f"{where}: the forward's computation reads the argument {node.name}={_val(node)!r}; "
                "the graph route takes it fixed only where the capture folded it in"
            )
    user_inputs = [node for node in user_inputs if node not in fixed]
    for node in graph.nodes:
        if node.op == "placeholder" and kinds[node.name].kind.name not in (
            "USER_INPUT", "PARAMETER", "BUFFER", "CONSTANT_TENSOR"
        ):
            raise ConfigError(
                f"{where}: the captured graph takes a {kinds[node.name].kind.name} input, not supported"
            )

    # -- where the cuts fall
    position_of = {node: index for index, node in enumerate(nodes)}
    cuts: list[tuple[int, str]] = []
    wanted = [(point, "before") for point in points] + ([(after_last, "after")] if after_last else [])
    for point, side in wanted:
        calls: dict[str, list[int]] = {}
        for index, node in enumerate(nodes):
            for key, entry in node.meta.get("nn_module_stack", {}).items():
                if entry[0] == point:
                    calls.setdefault(key, []).append(index)
        if not calls:
            raise ConfigError(
                f"{where}: split point {point!r} is a submodule that {type(module).__name__}.forward never "
                "calls (a container such as a ModuleList is not called: name one of its modules, 'layers.4')"
            )
        if len(calls) > 1:
            raise ConfigError(
                f"{where}: split point {point!r} is called {len(calls)} times in one forward (it, or a "
                "module holding it, is used twice), so 'before its call' names no single place; "
                "cut at a module called once, before the first use"
            )
        indices = next(iter(calls.values()))
        cuts.append((indices[0] if side == "before" else indices[-1] + 1, point))
    cuts.sort()
    bounds = [0, *[index for index, _ in cuts], len(nodes)]
    labels = ["(start)", *[point for _, point in cuts]]
    for k in range(len(bounds) - 1):
        body = nodes[bounds[k] : bounds[k + 1]]
        if not any(_is_compute(node) for node in body):
            previous = labels[k]
            following = labels[k + 1] if k + 1 < len(labels) else "(end)"
            raise ConfigError(
                f"{where}: nothing is computed between split points {previous!r} and {following!r}; "
                "drop one of them"
            )
    num_pieces = len(bounds) - 1

    def piece_of(node: fx.Node) -> int:
        if node.op == "placeholder":
            return 0
        if node.op == "output":
            return num_pieces - 1
        index = position_of[node]
        return next(k for k in range(num_pieces) if bounds[k] <= index < bounds[k + 1])

    tensor_paths = _tensor_paths(module, program, kinds)
    crossing: list[list[fx.Node]] = [[] for _ in range(num_pieces - 1)]
    for node in [*user_inputs, *nodes]:
        if not node.users:
            continue
        first, last = piece_of(node), max(piece_of(user) for user in node.users)
        if last == first:
            continue
        value = _val(node)
        if isinstance(value, torch.SymInt) or isinstance(value, int):
            continue  # recomputed from the tensors the later piece receives
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"{where}: a {type(value).__name__} value ({node.name}) crosses the cut at "
                f"{labels[first + 1]!r}; only tensors and sizes can cross: move the cut"
            )
        for k in range(first, last):
            crossing[k].append(node)

    pieces: list[nn.Module] = []
    for k in range(num_pieces):
        inputs = user_inputs if k == 0 else crossing[k - 1]
        body = nodes[bounds[k] : bounds[k + 1]]
        outputs = crossing[k] if k < num_pieces - 1 else None
        code, used = _generate(
            graph, inputs, body, outputs, kinds, tensor_paths, program, where, labels[k]
        )
        if k == 0:
            shapes = tuple(
                tuple(None if isinstance(size, torch.SymInt) else int(size) for size in _val(node).shape)
                for node in user_inputs
            )
            code = _Code(code.fn, code.out_spec, code.passthrough, shapes)
        if k == num_pieces - 1 and select is not None:
            code = _Code(code.fn, code.out_spec, code.passthrough, code.input_shapes, select)
        label = f"{labels[k]} .. {labels[k + 1] if k + 1 < len(labels) else '(end)'}"
        piece = GraphPiece(module, k, label, [tensor_paths[name] for name in used], code)
        for name, constant in _constants(program, kinds, used).items():
            piece.register_buffer(name, constant, persistent=False)
        pieces.append(piece)
    return pieces


def _is_compute(node: fx.Node) -> bool:
    return node.op == "call_function" and not isinstance(_val(node), (torch.SymInt, int))


def _tensor_paths(
    module: nn.Module, program: torch.export.ExportedProgram, kinds: dict[str, Any]
) -> dict[str, str]:
    """Placeholder name -> the tensor's path in the module (its first name, for a shared one), or
    a buffer name of the piece for a constant the forward made."""
    canonical = {id(p): name for name, p in module.named_parameters(remove_duplicate=True)}
    canonical.update({id(b): name for name, b in module.named_buffers(remove_duplicate=True)})
    paths = {}
    for name, spec in kinds.items():
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            target = spec.target
            owner_path, _, attr = target.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            paths[name] = canonical.get(id(getattr(owner, attr)), target)
        elif kind == "CONSTANT_TENSOR":
            paths[name] = "pipefold_constant_" + spec.target.replace(".", "_")
    return paths


def _on_meta(device: Any) -> bool:
    return isinstance(device, torch.device) and device.type == "meta"


def _to_device(value: Any, device: fx.Node) -> Any:
    """`value` (a node's args or kwargs) with every meta device replaced by `device`."""
    return fx.node.map_aggregate(value, lambda leaf: device if _on_meta(leaf) else leaf)


def _device_of(tensor: Tensor) -> torch.device:
    """The device of a piece's first input: where the tensors its forward creates go."""
    return tensor.device


def _constants(
    program: torch.export.ExportedProgram, kinds: dict[str, Any], used: Sequence[str]
) -> dict[str, Tensor]:
    result = {}
    for name in used:
        spec = kinds[name]
        if spec.kind.name == "CONSTANT_TENSOR":
            value = program.constants[spec.target]
            if isinstance(value, Tensor):
                result["pipefold_constant_" + spec.target.replace(".", "_")] = value
    return result


def _generate(
    graph: fx.Graph,
    inputs: Sequence[fx.Node],
    body: Sequence[fx.Node],
    outputs: Sequence[fx.Node] | None,
    kinds: dict[str, Any],
    tensor_paths: dict[str, str],
    program: torch.export.ExportedProgram,
    where: str,
    label: str,
) -> tuple[_Code, list[str]]:
    """The piece's code: `inputs` as arguments, `body` copied, `outputs` returned (None: the
    module's output). Returns it and the placeholders of the module's tensors it reads."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
    used: list[str] = []
    attrs: dict[str, fx.Node] = {}
    incoming = list(inputs)

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.name in tensor_paths:
            if node.name not in attrs:
                used.append(node.name)
                attrs[node.name] = new.get_attr(tensor_paths[node.name])
            return attrs[node.name]
        value = _val(node)
        if isinstance(value, torch.SymInt):
            env[node] = size_of(node, value)
            return env[node]
        raise ConfigError(f"{where}: the piece from {label!r} needs {node.name}, which it does not receive")

    def size_of(node: fx.Node, value: torch.SymInt) -> fx.Node:
        # A size (the batch, or one derived from it) from an earlier piece: read it off a tensor
        # this piece receives, or recompute it from sizes that can be.
        expr = _size_expr(value)
        for tensor in incoming:
            for dim, size in enumerate(_val(tensor).shape):
                if _size_expr(size) == expr:
                    return new.call_function(torch.ops.aten.sym_size.int, (env[tensor], dim))
        if node.op == "call_function" and all(
            not isinstance(arg, fx.Node) or isinstance(_val(arg), (torch.SymInt, int))
            for arg in pytree.tree_leaves((node.args, node.kwargs))
        ):
            return new.node_copy(node, lookup)
        raise ConfigError(
            f"{where}: the size {expr} ({node.name}) is needed after the cut at {label!r}, but no tensor "
            "crossing it has that size; move the cut"
        )

    device: fx.Node | None = None
    for node in body:
        copied = env[node] = new.node_copy(node, lookup)
        if any(_on_meta(leaf) for leaf in pytree.tree_leaves((copied.args, copied.kwargs))):
            # Captured on the meta device (a module built there): a tensor the forward creates or
            # moves goes where the piece's input is at run time, not to meta.
            if device is None:
                with new.inserting_before(copied):
                    device = new.call_function(_device_of, (env[inputs[0]],))
            copied.args = _to_device(copied.args, device)
            copied.kwargs = _to_device(copied.kwargs, device)
    if outputs is None:
        output_node = next(node for node in graph.nodes if node.op == "output")
        flat = [fx.map_arg(arg, lookup) for arg in output_node.args[0]]
        new.output(tuple(flat))
        out_spec = program.call_spec.out_spec
        passthrough: tuple[int, ...] = ()
    else:
        new.output(tuple(lookup(node) for node in outputs))
        out_spec = None
        passthrough = tuple(i for i, node in enumerate(outputs) if node in inputs)
    new.lint()
    python = new.python_code(root_module="self")
    namespace = dict(python.globals)
    exec(compile(python.src, f"<pipefold split piece {label}>", "exec"), namespace)  # noqa: S102
    return _Code(namespace["forward"], out_spec, passthrough, None), used
