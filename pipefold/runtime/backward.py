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
from pipefold.runtime.backward_groups import (
    Direct,
    Frontier,
    Grads,
    Group,
    accumulate_at,
    accumulate_direct,
    collector,
    has_hooks,
    match_direct,
)

__all__ = ["GroupCache", "WeightGradState", "backward_full", "backward_input", "backward_weight"]

# autograd's engine entry point under `torch.autograd.backward` / `grad` (private; absent
# in some torch version -> the public functions). See `_run_engine`.
_engine_run_backward: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)

_PreHook = Callable[[Grads], Grads | None]


@dataclass(eq=False)
class WeightGradState:
    """What `backward_weight` needs from `backward_input` for one (stage, micro-batch).

    It holds the frontier nodes (and so the part of the stage's graph below them) and the
    gradients kept at them; `backward_weight` releases all of it. Either as `Group` objects
    (`_groups`), or, on the common path (see `_Prepared.lean`), as the shape's plans with one
    flat list of frontier nodes and one of kept gradients, which costs no object per group.
    """

    _groups: list[Group] = field(default_factory=list)
    _disjoint: bool = True
    """No node runs in two calls of `W` (see `_groups_are_disjoint`)."""
    _done: bool = False
    _plans: tuple[_GroupPlan, ...] = ()
    """The lean form's groups, in the order `W` runs them."""
    _nodes: list[Node | None] = field(default_factory=list)
    """The lean form's frontier nodes (`_GroupPlan.frontiers` positions)."""
    _kept: list[Tensor | None] = field(default_factory=list)
    """The lean form's gradients kept at the frontier nodes (`_GroupPlan.frontiers` slots)."""
    _direct: bool = True
    """The lean form: `W` may compute a group with a direct form itself."""
    _whole: tuple[list[GradientEdge], list[Tensor], Sequence[Tensor]] | None = None
    """Where `I` had nothing to compute: the output edges, their gradients and the parameters
    for `W`'s one engine call."""

    @property
    def num_groups(self) -> int:
        """How many autograd calls `backward_weight` will make."""
        return len(self._groups) + len(self._plans) + (self._whole is not None)

    @property
    def done(self) -> bool:
        """True once `backward_weight` consumed this state."""
        return self._done

    @property
    def groups(self) -> list[Group]:
        """The groups `W` will run, in its order, as `Group` objects (built anew from the lean
        form; for inspection)."""
        if not self._plans:
            return list(self._groups)
        return [
            plan.group(self._nodes, self._kept, direct=self._direct and plan.direct is not None)
            for plan in self._plans
        ]


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
    cache: GroupCache | None = None,
) -> tuple[Grads, WeightGradState]:
    """Input half (`I`) of the backward of one stage for one micro-batch.

    Returns the input gradients (as `backward_full` does) and the state that
    `backward_weight` needs to accumulate the gradients of `params` later. No parameter's
    `.grad` changes here. The stage's graph stays alive until `backward_weight` (it holds
    the activations the weight gradients need); the caller may drop `outputs`.
    `direct=False` makes `W` use autograd for every group; pass it where the stage
    recomputes activations or hooks sit on its parameters' AccumulateGrad nodes
    (docs/decisions.md, "direct weight gradients"). `cache` (one per stage, kept by the
    caller) saves rebuilding what every graph of a shape shares.
    """
    roots, root_grads = _roots(outputs, output_grads)
    wanted = _check_inputs(inputs)
    if not wanted or not roots:
        # Nothing for `I` to compute (a first stage's inputs need no gradient): `W` is the
        # whole backward, one engine call from the outputs into `params`, so no walk or plan.
        # It holds the outputs' edges, not the outputs.
        whole = (list(map(get_gradient_edge, roots)), root_grads, params) if roots and params else None
        return tuple(None for _ in inputs), WeightGradState(_whole=whole)
    wanted_inputs = [inputs[i] for i in wanted]
    key, nodes, edges = _graph_shape(
        roots, wanted_inputs, params, cache.leaves(params) if cache is not None else None
    )
    shape = _plan_shapes.get(key)
    if shape is None:
        shape = _plan_shape(key, nodes, edges, roots, root_grads, wanted_inputs, params)
    prepared = cache.get(shape, params) if cache is not None else _prepare_all(shape, params)
    result: list[Tensor | None] = [None] * len(inputs)
    if prepared.lean:
        # The common path: no object per group, the frontier nodes and their gradients in two
        # flat lists that the shape's plans index. `tuple.__new__` builds each captured edge
        # without `GradientEdge.__new__`'s Python frame.
        new = tuple.__new__
        engine_inputs: list[Tensor | GradientEdge] = list(wanted_inputs)
        engine_inputs += [
            new(GradientEdge, (nodes[i], k)) for i, k in zip(prepared.edge_nodes, prepared.edge_outputs)
        ]
        found = _run_engine(
            roots,
            root_grads,
            engine_inputs,
            retain_graph=True,
            accumulate_grad=False,
            tensors=(*roots, *wanted_inputs),
        )
        num_wanted = len(wanted)
        for i, grad in zip(wanted, found, strict=False):
            result[i] = grad
        lean = WeightGradState(
            _disjoint=shape.disjoint,
            _plans=prepared.plans,
            _nodes=list(map(nodes.__getitem__, prepared.frontier_nodes)),
            _kept=list(found[num_wanted:]),
            _direct=direct,
        )
        return tuple(result), lean
    groups = _groups_of(shape, prepared, nodes, edges, root_grads, direct=direct)
    state = WeightGradState(groups, _disjoint=shape.disjoint)
    frontiers = [frontier for group in groups for frontier in group.frontiers]
    # The engine hands back the gradients arriving at each frontier node when asked for its
    # edges as inputs (captured in C++); a Python pre-hook per node (registered, called and
    # removed per micro-batch) cost a tenth of I on a small stage. It runs no other node:
    # the frontier nodes are in the input closure, which the engine runs anyway.
    captured = shape.captured
    frontier_edges = (
        [GradientEdge(f.node, k) for f in frontiers for k in range(f.num_outputs)] if captured else []
    )
    handles: list[RemovableHandle] = []
    if not captured:
        clock = itertools.count()
        handles = [frontier.node.register_prehook(_keeper(frontier, clock)) for frontier in frontiers]
    for group in groups:
        if group.direct is not None and group.direct.kind == "compiled":
            frontier = group.frontiers[0]
            handles.append(frontier.node.register_hook(collector(frontier, group.direct.slots)))
    try:
        grads = _run_engine(
            roots,
            root_grads,
            [*wanted_inputs, *frontier_edges],
            retain_graph=True,
            accumulate_grad=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    for i, grad in zip(wanted, grads[: len(wanted)], strict=True):
        result[i] = grad
    # W takes the groups whose gradients I kept last first: those are likeliest still in
    # cache, and the activations there were the last I touched. (Captured, a frontier's
    # `order` is its node's place in the walk from the outputs, which the engine follows, so
    # the plan holds the order; with hooks it is when each hook ran.)
    if captured:
        at = len(wanted)
        for frontier in frontiers:
            frontier.grads = grads[at : at + frontier.num_outputs]
            at += frontier.num_outputs
        state._groups = [groups[i] for i in shape.weight_order]
    else:
        state._groups.sort(key=_last_kept, reverse=True)
    return tuple(result), state


def _last_kept(group: Group) -> int:
    return max((f.order for f in group.frontiers), default=-1)


def backward_weight(state: WeightGradState) -> None:
    """Weight half (`W`): accumulate the weight gradients into `param.grad`, free the state."""
    if state.done:
        raise PipelineError(
            "backward_weight was called twice with the same WeightGradState; run W exactly once after each I"
        )
    disjoint = state._disjoint
    share = disjoint and hasattr(torch.utils.checkpoint, "GraphExecGroup")
    state._done = True
    if state._plans:
        _weight_lean(state, share)
        return
    if state._whole is not None:
        (roots, grads, params), state._whole = state._whole, None
        _run_engine(roots, grads, params, retain_graph=False, accumulate_grad=True, tensors=tuple(params))
        return
    recompute_scope = torch.utils.checkpoint.GraphExecGroup() if share else contextlib.nullcontext()
    groups, state._groups = state._groups, []
    # The groups W computes itself run with grad mode off, switched as `torch.no_grad()` does
    # but without its context object (4-10 µs a use on a loaded CPU), and once for the whole
    # run rather than per group; autograd's groups get the caller's mode back.
    enabled = torch.is_grad_enabled()
    groups.reverse()  # popped from the end, in W's order
    with recompute_scope:
        torch._C._set_grad_enabled(False)
        try:
            while groups:
                # Dropping each group as it runs frees its kept gradients, and (when no other
                # call needs its nodes) autograd frees the activations saved there, so W reuses
                # that memory for the weight gradients instead of growing the heap.
                group = groups.pop()
                if group.direct is not None and accumulate_direct(group.direct, group.frontiers[0]):
                    continue
                torch._C._set_grad_enabled(enabled)
                try:
                    _run_group(group, retain_graph=not disjoint)
                finally:
                    torch._C._set_grad_enabled(False)
        finally:
            torch._C._set_grad_enabled(enabled)


def _weight_lean(state: WeightGradState, share: bool) -> None:
    """`backward_weight` on the lean form: the same groups in the same order, a group that
    falls back to autograd built as a `Group` only then."""
    plans, state._plans = state._plans, ()
    nodes, kept, direct = state._nodes, state._kept, state._direct
    retain_graph = not state._disjoint
    # Inside the scope even for the direct groups: reading a checkpointed node's saved
    # tensors recomputes its region, once per scope.
    scope = torch.utils.checkpoint.GraphExecGroup() if share else contextlib.nullcontext()
    enabled = torch.is_grad_enabled()
    with scope:
        torch._C._set_grad_enabled(False)
        try:
            for plan in plans:
                found = plan.direct
                if found is not None and direct:
                    position, at, _ = plan.frontiers[0]
                    node = nodes[position]
                    assert node is not None
                    if accumulate_at(found, node, kept[at]):
                        # Freed as it runs, as the other form drops each group (see there).
                        nodes[position] = kept[at] = None
                        continue
                group = plan.group(nodes, kept, direct=False)
                for position, at, num_outputs in plan.frontiers:
                    nodes[position] = None
                    kept[at : at + num_outputs] = [None] * num_outputs
                torch._C._set_grad_enabled(enabled)
                try:
                    _run_group(group, retain_graph=retain_graph)
                finally:
                    torch._C._set_grad_enabled(False)
                del group
        finally:
            torch._C._set_grad_enabled(enabled)
            nodes.clear()
            kept.clear()


def _run_group(group: Group, retain_graph: bool) -> None:
    """Run one group's weight gradients through autograd's engine."""
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


def _run_engine(
    roots: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor | GradientEdge],
    *,
    retain_graph: bool,
    accumulate_grad: bool,
    tensors: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor | None, ...]:
    """Run autograd from `roots` seeded with `grads`: into `.grad` (`accumulate_grad`), or
    returning the gradients of `inputs` (None where unused). `tensors`, where the caller
    knows them, are the tensors among `roots` and `inputs` (the rest are edges).

    `torch.autograd.backward` / `grad` first re-check every seed in Python (`_make_grads`:
    about 80 µs a call here, mostly symbolic-shape comparisons for GradientEdge roots), and
    `W` makes one call per parameter group, so on small stages that check was 15% of `W`.
    The seeds need no check: `_roots` compared each output gradient's shape with its
    output, and `W`'s seeds are the gradients autograd itself produced during `I`. Tensor
    subclasses (`__torch_function__`) take the public path, which dispatches them.
    """
    if tensors is None:
        tensors = tuple(t for t in (*roots, *inputs) if isinstance(t, Tensor))
    if _engine_run_backward is None or torch.overrides.has_torch_function(tensors):
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


def _keeper(frontier: Frontier, clock: Iterator[int]) -> _PreHook:
    def keep(grad_outputs: Grads) -> None:
        frontier.grads = tuple(grad_outputs)
        frontier.order = next(clock)

    return keep


def _replacer(frontier: Frontier) -> _PreHook:
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
    """`_plan_groups` and `match_direct`'s answer for one graph shape, as positions: nodes by
    their index in `_graph_shape`'s walk, parameters by their index in `params`, output seeds
    by the index of their root. It holds no node or tensor."""

    groups: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int], ...]
    """Per group: (parameter positions, frontier node indices, root indices, num_nodes)."""
    num_outputs: tuple[tuple[int, ...], ...]
    """Per group, per frontier: `Frontier.num_outputs`."""
    directs: tuple[tuple[str, int, int, int, tuple[tuple[int, int], ...]] | None, ...]
    """Per group: (kind, node index, weight position or -1, bias position or -1, slots as
    (output index, parameter position)), or None where `match_direct` found no direct form."""
    weight_order: tuple[int, ...]
    """The groups in the order `W` runs them when `I` captured the frontier gradients: the
    group whose frontier node comes last in the walk first (see `backward_input`)."""
    disjoint: bool
    """`_groups_are_disjoint` of the groups."""
    captured: bool
    """Every frontier node says how many gradients it receives, so `I` asks the engine for
    them (see `backward_input`)."""


_plan_shapes: dict[tuple[object, ...], _PlanShape] = {}
"""Graph shape (`_graph_shape`'s key) -> its plan: every micro-batch of a stage builds a new
graph of the same shape, and planning it anew (two upward walks, a union-find and the direct
matching) cost a third of `I` on a small stage."""
_MAX_PLAN_SHAPES = 256
_MAX_PREPARED = 64


class _GroupPlan:
    """One group of a `_Prepared`, for the lean form of `WeightGradState`."""

    __slots__ = ("direct", "frontiers", "num_nodes", "params")

    def __init__(
        self,
        params: list[Tensor],
        direct: Direct | None,
        frontiers: tuple[tuple[int, int, int], ...],
        num_nodes: int,
    ) -> None:
        self.params = params
        self.direct = direct
        self.frontiers = frontiers
        """Per frontier node: (its position in the state's nodes, the position of its first
        kept gradient, how many it receives)."""
        self.num_nodes = num_nodes

    def group(self, nodes: Sequence[Node | None], kept: Sequence[Tensor | None], *, direct: bool) -> Group:
        """This group as a `Group` over one micro-batch's frontier nodes and kept gradients."""
        frontiers = []
        for position, at, num_outputs in self.frontiers:
            node = nodes[position]
            assert node is not None, "the group already ran"
            frontiers.append(
                Frontier(node, grads=tuple(kept[at : at + num_outputs]), order=position, num_outputs=num_outputs)
            )
        return Group(self.params, frontiers, [], self.direct if direct else None, self.num_nodes)


class _Prepared:
    """A plan (`_PlanShape`) for one stage's parameters: each group's parameter list and direct
    form, and the lean form (`WeightGradState`) where the plan allows it."""

    __slots__ = ("edge_nodes", "edge_outputs", "frontier_nodes", "groups", "lean", "plans")

    def __init__(self, shape: _PlanShape, params: Sequence[Tensor]) -> None:
        self.groups = tuple(
            _prepare(found, positions[0], params)
            for positions, found in zip(shape.groups, shape.directs, strict=True)
        )
        # The lean form: `I` captures every frontier's gradients in the engine, and no group
        # seeds an output or needs the hooks of a compiled graph.
        self.lean = shape.captured and not any(
            root_indices or (found is not None and found[0] == "compiled")
            for (_, _, root_indices, _), found in zip(shape.groups, shape.directs, strict=True)
        )
        frontier_nodes: list[int] = []
        edge_nodes: list[int] = []
        edge_outputs: list[int] = []
        plans = []
        for index in shape.weight_order:
            _, frontier_indices, _, num_nodes = shape.groups[index]
            frontiers = []
            for node_index, num_outputs in zip(frontier_indices, shape.num_outputs[index], strict=True):
                frontiers.append((len(frontier_nodes), len(edge_nodes), num_outputs))
                frontier_nodes.append(node_index)
                edge_nodes.extend([node_index] * num_outputs)
                edge_outputs.extend(range(num_outputs))
            group_params, found = self.groups[index]
            plans.append(_GroupPlan(group_params, found, tuple(frontiers), num_nodes))
        self.plans = tuple(plans)
        self.frontier_nodes = tuple(frontier_nodes)
        """Walk indices of the frontier nodes, in the order `_GroupPlan.frontiers` numbers them."""
        self.edge_nodes = tuple(edge_nodes)
        """Walk index of the node of each edge `I` captures a gradient at, and its output."""
        self.edge_outputs = tuple(edge_outputs)


class GroupCache:
    """What `backward_input` keeps for one stage between its calls: per graph shape, each
    group's parameters and direct form (ignoring hooks, checked per call), which every graph of
    the shape shares for the stage's parameters. Owned by the caller (the executor keeps one
    per stage), so it lives and dies with the stage's parameters it holds."""

    def __init__(self) -> None:
        # id(plan) -> (plan, params, prepared): the entry holds both, so their ids stay theirs.
        self._entries: dict[int, tuple[_PlanShape, Sequence[Tensor], _Prepared]] = {}
        self._leaves: _Leaves | None = None

    def get(self, shape: _PlanShape, params: Sequence[Tensor]) -> _Prepared:
        entry = self._entries.get(id(shape))
        if entry is not None and entry[0] is shape and entry[1] is params:
            return entry[2]
        prepared = _prepare_all(shape, params)
        if len(self._entries) >= _MAX_PREPARED:
            self._entries.clear()
        self._entries[id(shape)] = (shape, params, prepared)
        return prepared

    def leaves(self, params: Sequence[Tensor]) -> _Leaves | None:
        """The parameter leaves of `params` met so far, for `_graph_shape`; None unless
        `params` is a tuple (immutable: a position names one tensor for as long as it lives)."""
        if type(params) is not tuple:
            return None
        leaves = self._leaves
        if leaves is None or leaves.params is not params:
            leaves = self._leaves = _Leaves(params)
        return leaves


class _Leaves:
    """A stage's parameters by identity, and the AccumulateGrad nodes that hold them.

    A parameter's AccumulateGrad node is one object for as long as something holds it (autograd
    keeps a weak reference on the parameter and hands the same node to every graph); holding
    them here makes every micro-batch's graph reach the same nodes, so `_graph_shape` knows
    them on sight instead of visiting each one (a third of a small stage's walk). A node holds
    one tensor for life, so knowing the node is knowing the parameter."""

    def __init__(self, params: tuple[Tensor, ...]) -> None:
        self.params = params
        self.held_by: dict[int, object] = {id(p): ("param", i) for i, p in enumerate(params)}
        self.nodes: dict[Node, object] = {}

    def learn(self, found: list[tuple[Node, object]]) -> None:
        if len(self.nodes) + len(found) > 2 * len(self.params) + 8:
            self.nodes.clear()  # nodes a parameter no longer uses: start again
        self.nodes.update(found)


_is_leaf_node: dict[type, bool] = {}
"""Node class -> whether it is AccumulateGrad (the only nodes with a `variable`)."""


def _graph_shape(
    roots: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    leaves: _Leaves | None = None,
) -> tuple[tuple[object, ...], list[Node], list[GradientEdge]]:
    """(key, nodes, root edges): one breadth-first walk from the roots. The key holds, per root,
    (walk index of its node, output number), then per node in walk order its class, and either
    the entries of its children and None, or for a leaf (AccumulateGrad, which has no children)
    which input it holds ("other" for none of them, None for no tensor). A child's entry is its
    walk index (-1 for none), or, for the leaf of a parameter, the ("param", position) it holds:
    parameter leaves are not walked. Flat, and unambiguous because a class starts each node's
    entries, children are ints or tuples and None ends them. Two graphs with equal keys are
    the same graph up to the node objects, so `_plan_groups` (a function of exactly that)
    plans them alike. `leaves` (a stage's, from its `GroupCache`) knows the parameter leaves
    met before, so they are recognised without reading the tensor each holds."""
    if leaves is None:
        held_by: dict[int, object] = {id(p): ("param", i) for i, p in enumerate(params)}
        no_nodes: dict[Node, object] = {}
        known = no_nodes.get
    else:
        held_by = leaves.held_by
        known = leaves.nodes.get
    inputs_at = {id(tensor): ("input", i) for i, tensor in enumerate(inputs)}
    edges = [get_gradient_edge(root) for root in roots]
    index: dict[Node, int] = {}
    nodes: list[Node] = []
    key: list[object] = []
    for edge in edges:
        at = index.get(edge.node)
        if at is None:
            at = index[edge.node] = len(nodes)
            nodes.append(edge.node)
        key.append((at, edge.output_nr))
    find, add_node, add_key = index.get, nodes.append, key.append
    is_leaf_node = _is_leaf_node
    learned: list[tuple[Node, object]] = []
    for node in nodes:  # grows while it is walked: breadth first
        node_type = type(node)
        add_key(node_type)
        leaf = is_leaf_node.get(node_type)
        if leaf is None:
            leaf = is_leaf_node[node_type] = node.name() == "torch::autograd::AccumulateGrad"
        if leaf:  # no children; a parameter's only where it is a root (children are not walked)
            variable = getattr(node, "variable", None)
            if variable is None:
                add_key(None)
                continue
            held = held_by.get(id(variable))
            add_key(held if held is not None else inputs_at.get(id(variable), "other"))
            continue
        for child, _ in node.next_functions:
            if child is None:
                add_key(-1)
                continue
            at = find(child)
            if at is None:
                held = known(child)
                if held is not None:
                    add_key(held)
                    continue
                child_type = type(child)
                leaf = is_leaf_node.get(child_type)
                if leaf is None:
                    leaf = is_leaf_node[child_type] = child.name() == "torch::autograd::AccumulateGrad"
                if leaf:
                    variable = getattr(child, "variable", None)
                    held = None if variable is None else held_by.get(id(variable))
                    if held is not None:  # a parameter's leaf: its position, not a walk index
                        learned.append((child, held))
                        add_key(held)
                        continue
                at = index[child] = len(nodes)
                add_node(child)
            add_key(at)
        add_key(None)
    if leaves is not None and learned:
        leaves.learn(learned)
    return tuple(key), nodes, edges


def _plan_shape(
    key: tuple[object, ...],
    nodes: Sequence[Node],
    edges: Sequence[GradientEdge],
    roots: Sequence[Tensor],
    root_grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
) -> _PlanShape:
    """Plan a graph shape not seen before (`_plan_groups`, `match_direct` on each group) and
    keep the plan under its key."""
    shape = _shape_of(_plan_groups(roots, root_grads, inputs, params), nodes, edges, params)
    if len(_plan_shapes) >= _MAX_PLAN_SHAPES:
        _plan_shapes.pop(next(iter(_plan_shapes)))
    _plan_shapes[key] = shape
    return shape


def _groups_of(
    shape: _PlanShape,
    prepared: _Prepared,
    nodes: Sequence[Node],
    edges: Sequence[GradientEdge],
    root_grads: Sequence[Tensor],
    *,
    direct: bool,
) -> list[Group]:
    """The plan's groups as `Group` objects over one graph (`_graph_shape`'s nodes and edges),
    in the plan's order; a direct form only where `direct` and no hook sits on the group."""
    groups = []
    for (_, frontier_indices, root_indices, num_nodes), num_outputs, (group_params, found) in zip(
        shape.groups, shape.num_outputs, prepared.groups, strict=True
    ):
        # With a cache the group's parameter list is shared by every graph of the shape:
        # nothing appends to it after planning.
        group = Group(
            group_params,
            [
                Frontier(nodes[i], order=i, num_outputs=n)
                for i, n in zip(frontier_indices, num_outputs, strict=True)
            ],
            [(edges[i], root_grads[i]) for i in root_indices] if root_indices else [],
            num_nodes=num_nodes,
        )
        if direct and found is not None and not any(map(has_hooks, group_params)):
            group.direct = found
        groups.append(group)
    return groups


def _prepare_all(shape: _PlanShape, params: Sequence[Tensor]) -> _Prepared:
    return _Prepared(shape, params)


def _prepare(
    found: tuple[str, int, int, int, tuple[tuple[int, int], ...]] | None,
    param_positions: tuple[int, ...],
    params: Sequence[Tensor],
) -> tuple[list[Tensor], Direct | None]:
    """A group's parameters and direct form (from `_PlanShape.directs`) for `params`."""
    group_params = [params[i] for i in param_positions]
    if found is None:
        return group_params, None
    kind, _, weight, bias, slots = found
    return group_params, Direct(
        kind,
        params[weight] if weight >= 0 else None,
        params[bias] if bias >= 0 else None,
        tuple((output, params[i]) for output, i in slots),
    )


def _shape_of(
    groups: Sequence[Group], nodes: Sequence[Node], edges: Sequence[GradientEdge], params: Sequence[Tensor]
) -> _PlanShape:
    """`groups` (planned on the graph `nodes` walks) as positions, with each one's direct form
    as `match_direct` finds it ignoring hooks (checked per call: they may come and go)."""
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
        found = match_direct(group, check_hooks=False)
        directs.append(
            None
            if found is None
            else (
                found.kind,
                node_at[group.frontiers[0].node],
                -1 if found.weight is None else param_at[id(found.weight)],
                -1 if found.bias is None else param_at[id(found.bias)],
                tuple((output, param_at[id(param)]) for output, param in found.slots),
            )
        )
    num_outputs = tuple(tuple(_num_outputs(f.node) for f in group.frontiers) for group in groups)
    # `backward_input`'s sort of the groups by their last frontier (stable, descending), on the
    # walk indices a captured `I` gives the frontiers as their order.
    last = [max(frontier_indices, default=-1) for _, frontier_indices, _, _ in shaped]
    weight_order = sorted(range(len(shaped)), key=lambda i: last[i], reverse=True)
    return _PlanShape(
        tuple(shaped),
        num_outputs,
        tuple(directs),
        weight_order=tuple(weight_order),
        disjoint=_groups_are_disjoint(groups),
        captured=all(n > 0 for per_group in num_outputs for n in per_group),
    )


def _num_outputs(node: Node) -> int:
    """How many gradients `node` receives (its forward's outputs); 0 where torch does not say."""
    metadata = getattr(node, "_input_metadata", None)
    return len(metadata) if metadata is not None else 0


def _plan_groups(
    roots: Sequence[Tensor],
    root_grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
) -> list[Group]:
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
    groups: dict[Node, Group] = {}
    for node in weight_side:
        group = groups.setdefault(components.find(node), Group([], [], []))
        group.num_nodes += 1
        if node in param_nodes:
            group.params.append(param_nodes[node])
        if node in closure:
            group.frontiers.append(Frontier(node))
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


def _groups_are_disjoint(groups: Sequence[Group]) -> bool:
    """True when no call of `W` can execute a node that another call also executes.

    A group's call executes nodes of the input closure only at its own frontier nodes,
    unless one of its frontier nodes reaches another through the closure; that happens
    only for a parameter used at several places, and then the calls may overlap.
    """
    return all(len(group.frontiers) <= 1 for group in groups)
