"""The backward of one stage: whole (`B`), or split into input (`I`) and weight (`W`) halves.

Zero-bubble schedules run `I` as soon as the next stage's gradient arrives, because the
previous stage waits for it, and defer `W` into what would otherwise be a bubble. The
split must not cost more than `B`: `W` may not re-run the stage's backward from its
outputs.

Design notes: docs/decisions.md, "split backward" and "direct weight gradients".
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from pipefold.errors import BoundaryMismatch, PipelineError

__all__ = ["WeightGradState", "backward_full", "backward_input", "backward_weight"]

# autograd's engine entry point under `torch.autograd.backward` / `grad` (private; absent
# in some torch version -> the public functions). See `_run_engine`.
_engine_run_backward: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)

Grads = tuple[Tensor | None, ...]
_PreHook = Callable[[Grads], Grads | None]


@dataclass(eq=False)
class _Frontier:
    """A node of the input closure with an edge into a weight subgraph."""

    node: Node
    grads: Grads | None = None
    """The gradients that arrived at `node` during `I` (one per output of its forward)."""
    order: int = -1
    """When `node` ran during `I` (0 first); -1 if it did not run."""
    computed: Grads | None = None
    """The weight gradients a compiled node computed during `I` (its outputs at the group's
    parameter edges, see `_Direct.slots`); None until it ran."""
    num_outputs: int = 0
    """Outputs of `node`'s forward (gradients it receives); 0 where torch does not say, and
    `I` then keeps its gradients with a Python hook instead of asking the engine for them."""


@dataclass(eq=False)
class _Group:
    """Parameters whose weight gradients come from the same frontier nodes and outputs."""

    params: list[Tensor]
    frontiers: list[_Frontier]
    output_seeds: list[tuple[GradientEdge, Tensor]]
    """Outputs that reach this group's parameters but no input, with their gradients."""
    direct: _Direct | None = None
    """Set when `W` may compute this group's gradients itself (docs/decisions.md, "direct weight
    gradients")."""
    num_nodes: int = 0
    """Nodes of the weight side in this group (frontiers, parameter leaves and those between)."""

    def seeds(self) -> tuple[list[GradientEdge], list[Tensor]]:
        edges = [edge for edge, _ in self.output_seeds]
        grads = [grad for _, grad in self.output_seeds]
        for frontier in self.frontiers:
            for output_nr, grad in enumerate(frontier.grads or ()):
                if grad is not None:
                    edges.append(GradientEdge(frontier.node, output_nr))
                    grads.append(grad)
        return edges, grads


@dataclass(eq=False)
class WeightGradState:
    """What `backward_weight` needs from `backward_input` for one (stage, micro-batch).

    It holds the frontier nodes (and so the part of the stage's graph below them) and the
    gradients kept at them; `backward_weight` releases all of it.
    """

    _groups: list[_Group] = field(default_factory=list)
    _disjoint: bool = True
    """No node runs in two calls of `W` (see `_groups_are_disjoint`)."""
    _done: bool = False

    @property
    def num_groups(self) -> int:
        """How many autograd calls `backward_weight` will make."""
        return len(self._groups)

    @property
    def done(self) -> bool:
        """True once `backward_weight` consumed this state."""
        return self._done


def backward_full(
    outputs: Sequence[Tensor],
    output_grads: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
) -> Grads:
    """Full backward (`B`) of one stage for one micro-batch.

    Returns the gradient of each input (None where the input needs no gradient or does
    not affect the outputs) and accumulates the weight gradients into `param.grad` (for
    every leaf of the stage's graph, as `loss.backward()` would). The inputs' own `.grad`
    is left as it was. For the last stage pass `outputs=(loss,)`, `output_grads=(None,)`.
    """
    roots, root_grads = _roots(outputs, output_grads)
    wanted = _check_inputs(inputs)
    if not roots:
        return tuple(None for _ in inputs)
    # Inputs are leaves, so autograd accumulates their gradient into `.grad`; lend it an
    # empty `.grad` and hand back what it had, so the caller's tensors are unchanged.
    previous = [inputs[i].grad for i in wanted]
    for i in wanted:
        inputs[i].grad = None
    try:
        _run_engine(roots, root_grads, (), retain_graph=False, accumulate_grad=True)
        result: list[Tensor | None] = [None] * len(inputs)
        for i in wanted:
            result[i] = inputs[i].grad
    finally:
        for i, grad in zip(wanted, previous, strict=True):
            inputs[i].grad = grad
    return tuple(result)


def backward_input(
    outputs: Sequence[Tensor],
    output_grads: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    direct: bool = True,
) -> tuple[Grads, WeightGradState]:
    """Input half (`I`) of the backward of one stage for one micro-batch.

    Returns the input gradients (as `backward_full` does) and the state that
    `backward_weight` needs to accumulate the gradients of `params` later. No parameter's
    `.grad` changes here. The stage's graph stays alive until `backward_weight` (it holds
    the activations the weight gradients need); the caller may drop `outputs`.
    `direct=False` makes `W` use autograd for every group; pass it where the stage
    recomputes activations or hooks sit on its parameters' AccumulateGrad nodes
    (docs/decisions.md, "direct weight gradients").
    """
    roots, root_grads = _roots(outputs, output_grads)
    wanted = _check_inputs(inputs)
    groups = _planned_groups(roots, root_grads, [inputs[i] for i in wanted], params, direct=direct)
    state = WeightGradState(groups, _disjoint=_groups_are_disjoint(groups))
    result: list[Tensor | None] = [None] * len(inputs)
    if not wanted or not roots:
        return tuple(result), state
    frontiers = [frontier for group in groups for frontier in group.frontiers]
    # The engine hands back the gradients arriving at each frontier node when asked for its
    # edges as inputs (captured in C++); a Python pre-hook per node (registered, called and
    # removed per micro-batch) cost a tenth of I on a small stage. It runs no other node:
    # the frontier nodes are in the input closure, which the engine runs anyway.
    captured = all(frontier.num_outputs > 0 for frontier in frontiers)
    edges = (
        [GradientEdge(f.node, k) for f in frontiers for k in range(f.num_outputs)] if captured else []
    )
    handles: list[RemovableHandle] = []
    if not captured:
        clock = itertools.count()
        handles = [frontier.node.register_prehook(_keeper(frontier, clock)) for frontier in frontiers]
    for group in groups:
        if group.direct is not None and group.direct.kind == "compiled":
            frontier = group.frontiers[0]
            handles.append(frontier.node.register_hook(_collector(frontier, group.direct.slots)))
    try:
        grads = _run_engine(
            roots, root_grads, [*(inputs[i] for i in wanted), *edges], retain_graph=True, accumulate_grad=False
        )
    finally:
        for handle in handles:
            handle.remove()
    for i, grad in zip(wanted, grads[: len(wanted)], strict=True):
        result[i] = grad
    if captured:
        at = len(wanted)
        for frontier in frontiers:
            frontier.grads = tuple(grads[at : at + frontier.num_outputs])
            at += frontier.num_outputs
    # W takes the groups whose gradients I kept last first: those are likeliest still in
    # cache, and the activations there were the last I touched. (Captured, a frontier's
    # `order` is its node's place in the walk from the outputs, which the engine follows.)
    state._groups.sort(key=lambda group: max((f.order for f in group.frontiers), default=-1), reverse=True)
    return tuple(result), state


def backward_weight(state: WeightGradState) -> None:
    """Weight half (`W`): accumulate the weight gradients into `param.grad`, free the state."""
    if state.done:
        raise PipelineError(
            "backward_weight was called twice with the same WeightGradState; run W exactly once after each I"
        )
    disjoint = state._disjoint
    share = disjoint and hasattr(torch.utils.checkpoint, "GraphExecGroup")
    recompute_scope = torch.utils.checkpoint.GraphExecGroup() if share else contextlib.nullcontext()
    groups, state._groups = state._groups, []
    state._done = True
    with recompute_scope:
        while groups:
            # Dropping each group as it runs frees its kept gradients, and (when no other
            # call needs its nodes) autograd frees the activations saved there, so W reuses
            # that memory for the weight gradients instead of growing the heap.
            _run_group(groups.pop(0), retain_graph=not disjoint)


def _run_group(group: _Group, retain_graph: bool) -> None:
    if group.direct is not None:
        # What `torch.no_grad()` switches, without its context object: that costs 4-10 µs a
        # use on a loaded CPU, and W makes one per group.
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            done = _accumulate_direct(group.direct, group.frontiers[0])
        finally:
            torch._C._set_grad_enabled(enabled)
        if done:
            return
    edges, grads = group.seeds()
    if not edges:
        return
    handles: list[RemovableHandle] = []
    if len(group.frontiers) > 1:
        handles = [frontier.node.register_prehook(_replacer(frontier)) for frontier in group.frontiers]
    try:
        _run_engine(edges, grads, group.params, retain_graph=retain_graph, accumulate_grad=True)
    finally:
        for handle in handles:
            handle.remove()


@dataclass(eq=False)  # not frozen: `I` builds one per group per call, and a frozen init costs 3x
class _Direct:
    """A group `W` computes itself: one linear (`kind` "addmm" / "mm") or layer norm, or a
    compiled graph whose weight gradients `I` already computed (`kind` "compiled")."""

    kind: str
    node: Node
    weight: Tensor | None
    bias: Tensor | None
    slots: tuple[tuple[int, Tensor], ...] = ()
    """"compiled": (output index of `node`, the parameter whose gradient it is), per edge."""


def _leaf_param(node: Node | None, params: dict[int, Tensor]) -> Tensor | None:
    """The group parameter whose AccumulateGrad `node` is, else None."""
    variable = getattr(node, "variable", None) if node is not None else None
    if isinstance(variable, Tensor) and id(variable) in params:
        return params[id(variable)]
    return None


def _transposed_param(node: Node | None, params: dict[int, Tensor]) -> Tensor | None:
    """The group parameter reached through exactly one `TBackward0` (a linear weight)."""
    if node is None or node.name() != "TBackward0" or len(node.next_functions) != 1:
        return None
    return _leaf_param(node.next_functions[0][0], params)


_DIRECT_NODES = {"AddmmBackward0", "MmBackward0", "NativeLayerNormBackward0", "CompiledFunctionBackward"}
_node_names: dict[type, str | None] = {}
"""Node class -> its name when it is one `_match_direct` knows (name() builds a string per call)."""


def _match_direct(group: _Group, *, check_hooks: bool = True) -> _Direct | None:
    """The direct form of `group`, when its structure is one plain linear or layer norm (and,
    with `check_hooks`, no hook sits on its parameters' gradient accumulation)."""
    if len(group.frontiers) != 1 or group.output_seeds:
        return None
    node = group.frontiers[0].node
    node_type = type(node)
    if node_type not in _node_names:
        _node_names[node_type] = node.name() if node.name() in _DIRECT_NODES else None
    name = _node_names[node_type]
    if name is None:
        return None
    params = {id(p): p for p in group.params}
    edges = node.next_functions
    if name == "CompiledFunctionBackward":
        return _match_compiled(group, node, params, check_hooks=check_hooks)
    weight: Tensor | None
    bias: Tensor | None = None
    if name == "AddmmBackward0" and len(edges) == 3:  # addmm(self=bias, mat1=input, mat2=weight.t())
        kind, weight = "addmm", _transposed_param(edges[2][0], params)
        if edges[0][0] is not None:
            bias = _leaf_param(edges[0][0], params)
            if bias is None:
                return None
    elif name == "MmBackward0" and len(edges) == 2:  # mm(self=input, mat2=weight.t())
        kind, weight = "mm", _transposed_param(edges[1][0], params)
    elif name == "NativeLayerNormBackward0" and len(edges) == 3:  # (input, weight, bias)
        kind, weight = "layer_norm", _leaf_param(edges[1][0], params)
        if edges[2][0] is not None:
            bias = _leaf_param(edges[2][0], params)
            if bias is None:
                return None
        if weight is None and edges[1][0] is not None:
            return None
    else:
        return None
    found = [p for p in (weight, bias) if p is not None]
    if not found or len(found) != len(group.params) or {id(p) for p in found} != set(params):
        return None
    if check_hooks and any(_has_hooks(param) for param in found):
        return None
    return _Direct(kind, node, weight, bias)


def _match_compiled(
    group: _Group, node: Node, params: dict[int, Tensor], *, check_hooks: bool = True
) -> _Direct | None:
    """A torch.compile graph (one autograd node, AOTAutograd's `CompiledFunctionBackward`)
    whose edges lead straight to the group's parameters.

    Its backward is one compiled function that returns the input and the weight gradients
    together, so `I` cannot run it without computing the weight gradients too; `W` re-running
    it would compute everything a second time. Instead `I` keeps the weight gradients it
    returns (a post-hook on the node) and `W` only accumulates them (docs/decisions.md,
    "compiled layers and the split backward").
    """
    if group.num_nodes != 1 + len(group.params):
        return None  # something between the node and a parameter: autograd must run it
    slots = []
    for index, (child, _) in enumerate(node.next_functions):
        param = _leaf_param(child, params)
        if param is not None:
            slots.append((index, param))
    if {id(param) for _, param in slots} != set(params):
        return None
    if check_hooks and any(_has_hooks(param) for param in group.params):
        return None
    return _Direct("compiled", node, None, None, tuple(slots))


def _accumulate_computed(direct: _Direct, frontier: _Frontier) -> bool:
    """Accumulate what the compiled node returned for its parameters during `I`; False
    (nothing done) where it returned no gradient for one of them."""
    computed = frontier.computed
    if computed is None or any(grad is None for grad in computed):
        return False
    for (_, param), grad in zip(direct.slots, computed, strict=True):
        assert grad is not None
        if not (_plain(param, grad.dtype) and _grad_slot_ok(param)) or grad.shape != param.shape:
            return False
    for (_, param), grad in zip(direct.slots, computed, strict=True):
        assert grad is not None
        _accumulate(param, grad)
    frontier.computed = None
    return True


def _collector(frontier: _Frontier, slots: tuple[tuple[int, Tensor], ...]) -> Callable[[Grads, Grads], None]:
    def collect(grad_inputs: Grads, grad_outputs: Grads) -> None:
        frontier.computed = tuple(grad_inputs[index] for index, _ in slots)

    return collect


def _plain(tensor: Tensor, dtype: torch.dtype) -> bool:
    return (
        type(tensor) in (Tensor, torch.nn.Parameter)
        and tensor.dtype == dtype
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
    )


def _grad_slot_ok(param: Tensor) -> bool:
    """`param.grad` can take an in-place accumulation exactly as AccumulateGrad would."""
    if getattr(param, "grad_dtype", param.dtype) != param.dtype:
        return False  # autograd would cast to the declared gradient dtype
    grad = param.grad
    return grad is None or (
        _plain(grad, param.dtype) and not grad.requires_grad and grad.shape == param.shape
    )


def _accumulate_direct(direct: _Direct, frontier: _Frontier) -> bool:
    """Accumulate the group's weight gradients without autograd (called with grad mode off);
    False (nothing done) when a runtime condition fails and the autograd path must run instead."""
    if direct.kind == "compiled":
        return _accumulate_computed(direct, frontier)
    grads = frontier.grads
    if not grads or grads[0] is None:
        return False
    grad = grads[0]
    node = direct.node
    params = [p for p in (direct.weight, direct.bias) if p is not None]
    dtype = grad.dtype
    if not all(_plain(p, dtype) and _grad_slot_ok(p) for p in params):
        return False
    if direct.kind == "layer_norm":
        return _layer_norm_direct(direct, node, grad)
    if direct.kind == "addmm" and (node._saved_alpha != 1 or node._saved_beta != 1):  # type: ignore[attr-defined]
        return False
    saved_input: Tensor = node._saved_mat1 if direct.kind == "addmm" else node._saved_self  # type: ignore[attr-defined]
    weight, bias = direct.weight, direct.bias
    if (
        grad.dim() != 2
        or type(grad) is not Tensor
        or type(saved_input) is not Tensor
        or saved_input.dtype != dtype
        or saved_input.dim() != 2
        or (weight is not None and tuple(weight.shape) != (grad.shape[1], saved_input.shape[1]))
        or (bias is not None and tuple(bias.shape) != (grad.shape[1],))
    ):
        return False
    if weight is not None:
        # The product autograd forms for a linear weight (mm_mat2_backward on W.t(),
        # transposed back), accumulated inside the GEMM.
        if weight.grad is None:
            weight.grad = torch.mm(grad.t(), saved_input)
        else:
            weight.grad.addmm_(grad.t(), saved_input)
    if bias is not None:
        _accumulate(bias, grad.sum(0))
    return True


def _layer_norm_direct(direct: _Direct, node: Node, grad: Tensor) -> bool:
    saved_input: Tensor = node._saved_input  # type: ignore[attr-defined]
    if type(grad) is not Tensor or type(saved_input) is not Tensor or saved_input.dtype != grad.dtype:
        return False
    _, weight_grad, bias_grad = torch.ops.aten.native_layer_norm_backward(
        grad,
        saved_input,
        list(node._saved_normalized_shape),  # type: ignore[attr-defined]
        node._saved_result1,  # type: ignore[attr-defined]
        node._saved_result2,  # type: ignore[attr-defined]
        node._saved_weight,  # type: ignore[attr-defined]
        node._saved_bias,  # type: ignore[attr-defined]
        [False, direct.weight is not None, direct.bias is not None],
    )
    if direct.weight is not None:
        _accumulate(direct.weight, weight_grad)
    if direct.bias is not None:
        _accumulate(direct.bias, bias_grad)
    return True


def _accumulate(param: Tensor, grad: Tensor) -> None:
    """AccumulateGrad's rule for a plain dense parameter outside autograd."""
    if param.grad is None:
        param.grad = grad if grad.is_contiguous() else grad.contiguous()
    else:
        param.grad.add_(grad)


def _run_engine(
    roots: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor | GradientEdge],
    *,
    retain_graph: bool,
    accumulate_grad: bool,
) -> tuple[Tensor | None, ...]:
    """Run autograd from `roots` seeded with `grads`: into `.grad` (`accumulate_grad`), or
    returning the gradients of `inputs` (None where unused).

    `torch.autograd.backward` / `grad` first re-check every seed in Python (`_make_grads`:
    about 80 µs a call here, mostly symbolic-shape comparisons for GradientEdge roots), and
    `W` makes one call per parameter group, so on small stages that check was 15% of `W`.
    The seeds need no check: `_roots` compared each output gradient's shape with its
    output, and `W`'s seeds are the gradients autograd itself produced during `I`. Tensor
    subclasses (`__torch_function__`) take the public path, which dispatches them.
    """
    if _engine_run_backward is None or torch.overrides.has_torch_function(
        tuple(t for t in (*roots, *inputs) if isinstance(t, Tensor))
    ):
        # Mixes of tensors and edges, which both functions accept.
        public_roots: Any = list(roots)
        public_inputs: Any = list(inputs)
        if accumulate_grad:
            torch.autograd.backward(
                public_roots, list(grads), retain_graph=retain_graph, inputs=public_inputs or None
            )
            return ()
        return tuple(
            torch.autograd.grad(
                public_roots, public_inputs, list(grads), retain_graph=retain_graph, allow_unused=True
            )
        )
    return _engine_run_backward(
        tuple(roots),
        tuple(grads),
        retain_graph,
        False,  # create_graph
        tuple(inputs),
        allow_unreachable=True,
        accumulate_grad=accumulate_grad,
    )


def _keeper(frontier: _Frontier, clock: Iterator[int]) -> _PreHook:
    def keep(grad_outputs: Grads) -> None:
        frontier.grads = tuple(grad_outputs)
        frontier.order = next(clock)

    return keep


def _replacer(frontier: _Frontier) -> _PreHook:
    def replace(grad_outputs: Grads) -> Grads | None:
        return frontier.grads

    return replace


def _roots(
    outputs: Sequence[Tensor], output_grads: Sequence[Tensor | None]
) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs that carry a gradient, paired with it.

    A None gradient means "d(output) = 1" for a one-element output (the loss) and "no
    gradient" for any other output (the next stage did not use it).
    """
    if len(outputs) != len(output_grads):
        raise PipelineError(
            f"got {len(outputs)} outputs but {len(output_grads)} output gradients; "
            "pass one gradient (or None) per output"
        )
    roots: list[Tensor] = []
    grads: list[Tensor] = []
    for index, (output, grad) in enumerate(zip(outputs, output_grads, strict=True)):
        if not output.requires_grad:
            continue
        if grad is None:
            if output.numel() != 1:
                continue
            grad = torch.ones_like(output)
        elif grad.shape != output.shape:
            raise BoundaryMismatch(
                f"output_grads[{index}] has shape {tuple(grad.shape)} but output {index} has shape "
                f"{tuple(output.shape)}; the gradient must match its output"
            )
        roots.append(output)
        grads.append(grad)
    return roots, grads


def _check_inputs(inputs: Sequence[Tensor]) -> list[int]:
    """Indices of the inputs that need a gradient; each must be a leaf."""
    wanted = []
    for index, tensor in enumerate(inputs):
        if not tensor.requires_grad:
            continue
        if tensor.grad_fn is not None:
            raise PipelineError(
                f"inputs[{index}] is not a leaf (grad_fn={type(tensor.grad_fn).__name__}); "
                "pass stage inputs as `tensor.detach().requires_grad_()` so the backward stops there"
            )
        wanted.append(index)
    return wanted


@dataclass(frozen=True)
class _PlanShape:
    """`_plan_groups` and `_match_direct`'s answer for one graph shape, as positions: nodes by
    their index in `_graph_shape`'s walk, parameters by their index in `params`, output seeds
    by the index of their root. It holds no node or tensor."""

    groups: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int], ...]
    """Per group: (parameter positions, frontier node indices, root indices, num_nodes)."""
    num_outputs: tuple[tuple[int, ...], ...]
    """Per group, per frontier: `_Frontier.num_outputs`."""
    directs: tuple[tuple[str, int, int, int, tuple[tuple[int, int], ...]] | None, ...]
    """Per group: (kind, node index, weight position or -1, bias position or -1, slots as
    (output index, parameter position)), or None where `_match_direct` found no direct form."""


_plan_shapes: dict[tuple[object, ...], _PlanShape] = {}
"""Graph shape (`_graph_shape`'s key) -> its plan: every micro-batch of a stage builds a new
graph of the same shape, and planning it anew (two upward walks, a union-find and the direct
matching) cost a third of `I` on a small stage."""
_MAX_PLAN_SHAPES = 256
_is_leaf_node: dict[type, bool] = {}
"""Node class -> whether it is AccumulateGrad (the only nodes with a `variable`)."""


def _graph_shape(
    roots: Sequence[Tensor], inputs: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[tuple[object, ...], list[Node], list[GradientEdge]]:
    """(key, nodes, root edges): one breadth-first walk from the roots. The key holds, per node
    in walk order, its class, the walk indices of its children and, for a leaf, which input or
    parameter it holds; two graphs with equal keys are the same graph up to the node objects,
    so `_plan_groups` (a function of exactly that) plans them alike."""
    param_at = {id(p): i for i, p in enumerate(params)}
    input_at = {id(t): i for i, t in enumerate(inputs)}
    edges = [get_gradient_edge(root) for root in roots]
    index: dict[Node, int] = {}
    nodes: list[Node] = []
    key: list[object] = []
    for edge in edges:
        if edge.node not in index:
            index[edge.node] = len(nodes)
            nodes.append(edge.node)
        key.append((index[edge.node], edge.output_nr))
    position = 0
    while position < len(nodes):
        node = nodes[position]
        position += 1
        children: list[int] = []
        for child, _ in node.next_functions:
            if child is None:
                children.append(-1)
                continue
            at = index.get(child)
            if at is None:
                at = index[child] = len(nodes)
                nodes.append(child)
            children.append(at)
        node_type = type(node)
        leaf = _is_leaf_node.get(node_type)
        if leaf is None:
            leaf = _is_leaf_node[node_type] = node.name() == "torch::autograd::AccumulateGrad"
        held: object = None
        if leaf:
            variable = getattr(node, "variable", None)
            if variable is not None:
                held = ("param", param_at[id(variable)]) if id(variable) in param_at else (
                    ("input", input_at[id(variable)]) if id(variable) in input_at else "other"
                )
        key.append((node_type, tuple(children), held))
    return tuple(key), nodes, edges


def _planned_groups(
    roots: Sequence[Tensor],
    root_grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    direct: bool,
) -> list[_Group]:
    """`_plan_groups` (with `_match_direct` on each group when `direct`), planned once per
    graph shape and rebuilt from positions for every later graph of that shape."""
    key, nodes, edges = _graph_shape(roots, inputs, params)
    shape = _plan_shapes.get(key)
    if shape is None:
        groups = _plan_groups(roots, root_grads, inputs, params)
        shape = _shape_of(groups, nodes, edges, params)
        if len(_plan_shapes) >= _MAX_PLAN_SHAPES:
            _plan_shapes.pop(next(iter(_plan_shapes)))
        _plan_shapes[key] = shape
    groups = []
    for (param_positions, frontier_indices, root_indices, num_nodes), found, num_outputs in zip(
        shape.groups, shape.directs, shape.num_outputs, strict=True
    ):
        group = _Group(
            [params[i] for i in param_positions],
            [
                _Frontier(nodes[i], order=i, num_outputs=n)
                for i, n in zip(frontier_indices, num_outputs, strict=True)
            ],
            [(edges[i], root_grads[i]) for i in root_indices],
            num_nodes=num_nodes,
        )
        if direct and found is not None and not any(_has_hooks(p) for p in group.params):
            kind, node_index, weight, bias, slots = found
            group.direct = _Direct(
                kind,
                nodes[node_index],
                params[weight] if weight >= 0 else None,
                params[bias] if bias >= 0 else None,
                tuple((output, params[i]) for output, i in slots),
            )
        groups.append(group)
    return groups


def _shape_of(
    groups: Sequence[_Group], nodes: Sequence[Node], edges: Sequence[GradientEdge], params: Sequence[Tensor]
) -> _PlanShape:
    """`groups` (planned on the graph `nodes` walks) as positions, with each one's direct form
    as `_match_direct` finds it ignoring hooks (checked per call: they may come and go)."""
    node_at = {node: i for i, node in enumerate(nodes)}
    param_at = {id(p): i for i, p in enumerate(params)}
    shaped = []
    directs: list[tuple[str, int, int, int, tuple[tuple[int, int], ...]] | None] = []
    for group in groups:
        # A group's output seeds are every root whose node is in the group.
        seed_nodes = {edge.node for edge, _ in group.output_seeds}
        shaped.append(
            (
                tuple(param_at[id(p)] for p in group.params),
                tuple(node_at[f.node] for f in group.frontiers),
                tuple(i for i, edge in enumerate(edges) if edge.node in seed_nodes),
                group.num_nodes,
            )
        )
        found = _match_direct(group, check_hooks=False)
        directs.append(
            None
            if found is None
            else (
                found.kind,
                node_at[found.node],
                -1 if found.weight is None else param_at[id(found.weight)],
                -1 if found.bias is None else param_at[id(found.bias)],
                tuple((output, param_at[id(param)]) for output, param in found.slots),
            )
        )
    num_outputs = tuple(tuple(_num_outputs(f.node) for f in group.frontiers) for group in groups)
    return _PlanShape(tuple(shaped), num_outputs, tuple(directs))


def _num_outputs(node: Node) -> int:
    """How many gradients `node` receives (its forward's outputs); 0 where torch does not say."""
    metadata = getattr(node, "_input_metadata", None)
    return len(metadata) if metadata is not None else 0


def _has_hooks(param: Tensor) -> bool:
    """Hooks on `param`'s gradient accumulation, which only autograd's path runs."""
    return bool(param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None))


def _plan_groups(
    roots: Sequence[Tensor],
    root_grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
) -> list[_Group]:
    """Find the frontier nodes and output seeds of each group of parameters."""
    output_edges: dict[Node, list[tuple[GradientEdge, Tensor]]] = {}
    for root, grad in zip(roots, root_grads, strict=True):
        edge = get_gradient_edge(root)
        output_edges.setdefault(edge.node, []).append((edge, grad))
    parents = _parents(output_edges)
    # A leaf's node is the AccumulateGrad that holds it; finding them in the walk is
    # cheaper than asking for each leaf's gradient edge (a view per tensor).
    leaf_node: dict[int, Node] = {}
    for node in parents:
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaf_node[id(variable)] = node
    input_nodes = {leaf_node[id(t)] for t in inputs if id(t) in leaf_node}
    closure = _upward(input_nodes, parents, stop=frozenset())
    param_nodes: dict[Node, Tensor] = {}
    for param in params:
        param_node = leaf_node.get(id(param))
        # A parameter the outputs do not depend on is not in the walk; its gradient stays.
        if param_node is not None and param_node not in closure:
            param_nodes[param_node] = param

    # The weight subgraphs and their anchors (frontier nodes, output roots); parameters
    # whose subgraphs touch, directly or through a shared anchor, form one group.
    weight_side = _upward(param_nodes, parents, stop=closure)
    components = _Components(weight_side)
    for node in weight_side - closure:
        for parent in parents[node]:
            components.join(node, parent)
    groups: dict[Node, _Group] = {}
    for node in weight_side:
        group = groups.setdefault(components.find(node), _Group([], [], []))
        group.num_nodes += 1
        if node in param_nodes:
            group.params.append(param_nodes[node])
        if node in closure:
            group.frontiers.append(_Frontier(node))
        elif node in output_edges:
            group.output_seeds.extend(output_edges[node])
    return list(groups.values())


def _parents(root_nodes: Iterable[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from the roots, with the nodes that feed it a gradient."""
    parents: dict[Node, list[Node]] = {}
    queue: deque[Node] = deque()
    for node in root_nodes:
        if node not in parents:
            parents[node] = []
            queue.append(node)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in parents:
                parents[child] = []
                queue.append(child)
            parents[child].append(node)
    return parents


def _upward(
    start: Iterable[Node], parents: dict[Node, list[Node]], stop: frozenset[Node] | set[Node]
) -> set[Node]:
    """The start nodes and every node above them (towards the outputs).

    A node in `stop` is included but not walked through.
    """
    seen = set(start)
    queue = deque(seen)
    while queue:
        node = queue.popleft()
        if node in stop:
            continue
        for parent in parents[node]:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


class _Components:
    """Union-find over graph nodes."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self._parent = {node: node for node in nodes}

    def find(self, node: Node) -> Node:
        while self._parent[node] is not node:
            self._parent[node] = self._parent[self._parent[node]]
            node = self._parent[node]
        return node

    def join(self, a: Node, b: Node) -> None:
        self._parent[self.find(a)] = self.find(b)


def _groups_are_disjoint(groups: Sequence[_Group]) -> bool:
    """True when no call of `W` can execute a node that another call also executes.

    A group's call executes nodes of the input closure only at its own frontier nodes,
    unless one of its frontier nodes reaches another through the closure; that happens
    only for a parameter used at several places, and then the calls may overlap.
    """
    return all(len(group.frontiers) <= 1 for group in groups)
