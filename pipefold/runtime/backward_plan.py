"""The split backward's cached plans: per graph shape of a stage's backward, which parameter
groups `W` runs and how (`GroupCache`, one per stage). `pipefold.runtime.backward` walks the graph
once per micro-batch to key the plan (`graph_shape`) and reads the plan it finds; where the C++
walk is built (`pipefold.runtime.native`), a graph of the last planned shape is recognised by it
instead (`GroupCache.walked`) and the Python walk runs only for a new shape.

Design notes: docs/decisions.md, "split backward" and "direct weight gradients".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from pipefold.runtime import native
from pipefold.runtime.backward_groups import (
    Direct,
    Frontier,
    Group,
    direct_from_planned,
    has_hooks,
    match_direct,
)

__all__ = ["GroupCache", "GroupPlan", "PlanShape", "Prepared", "Walked", "graph_shape", "groups_are_disjoint",
           "groups_of", "known_shape", "plan_shape", "prepare_all"]


@dataclass(frozen=True)
class PlanShape:
    """`_plan_groups` and `match_direct`'s answer for one graph shape, as positions: nodes by
    their index in `graph_shape`'s walk, parameters by their index in `params`, output seeds
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
    rerun_order: tuple[int, ...]
    """The groups in the order `W` runs them where the stage recomputes (`direct=False`): by
    the autograd sequence number of their anchor nodes (frontier nodes, output seeds), the
    last created first, so the groups of one checkpointed layer run together and the last
    layer's first (see `_rerun_order`)."""
    disjoint: bool
    """`groups_are_disjoint` of the groups."""
    captured: bool
    """Every frontier node says how many gradients it receives, so `I` asks the engine for
    them (see `backward_input`)."""


_plan_shapes: dict[tuple[object, ...], PlanShape] = {}
"""Graph shape (`graph_shape`'s key) -> its plan: every micro-batch of a stage builds a new
graph of the same shape, and planning it anew (two upward walks, a union-find and the direct
matching) cost a third of `I` on a small stage."""
_MAX_PLAN_SHAPES = 256
_MAX_PREPARED = 64


class GroupPlan:
    """One group of a `Prepared`, for the lean form of `WeightGradState`."""

    __slots__ = ("direct", "first", "frontiers", "num_nodes", "params")

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
        self.first = frontiers[0][:2] if frontiers else (-1, -1)
        """The first frontier's (position, first kept gradient): a direct group's only one."""
        self.num_nodes = num_nodes

    def group(self, nodes: Sequence[Node | None], kept: Sequence[Tensor | None], *, direct: bool) -> Group:
        """This group as a `Group` over one micro-batch's frontier nodes and kept gradients."""
        frontiers = []
        for position, at, num_outputs in self.frontiers:
            node = nodes[position]
            assert node is not None, "the group already ran"
            frontiers.append(
                Frontier(
                    node, grads=tuple(kept[at : at + num_outputs]), order=position, num_outputs=num_outputs
                )
            )
        return Group(self.params, frontiers, [], self.direct if direct else None, self.num_nodes)


class Prepared:
    """A plan (`PlanShape`) for one stage's parameters: each group's parameter list and direct
    form, and the lean form (`WeightGradState`) where the plan allows it."""

    __slots__ = (
        "_edge_frontiers_of", "_edge_nodes_of", "_frontiers_of", "edge_nodes", "edge_outputs",
        "frontier_nodes", "groups", "lean", "_one_edge_each", "plans", "rerun_plans",
    )

    def __init__(self, shape: PlanShape, params: Sequence[Tensor]) -> None:
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
        edge_frontiers: list[int] = []
        plans = []
        plan_of: dict[int, GroupPlan] = {}
        for index in shape.weight_order:
            _, frontier_indices, _, num_nodes = shape.groups[index]
            frontiers = []
            for node_index, num_outputs in zip(frontier_indices, shape.num_outputs[index], strict=True):
                frontiers.append((len(frontier_nodes), len(edge_nodes), num_outputs))
                edge_frontiers.extend([len(frontier_nodes)] * num_outputs)
                frontier_nodes.append(node_index)
                edge_nodes.extend([node_index] * num_outputs)
                edge_outputs.extend(range(num_outputs))
            group_params, found = self.groups[index]
            plan_of[index] = GroupPlan(group_params, found, tuple(frontiers), num_nodes)
            plans.append(plan_of[index])
        self.plans = tuple(plans)
        """The groups in `PlanShape.weight_order`."""
        self.rerun_plans = tuple(plan_of[index] for index in shape.rerun_order)
        """The same groups in `PlanShape.rerun_order` (they index the same frontier lists)."""
        self.frontier_nodes = tuple(frontier_nodes)
        """Walk indices of the frontier nodes, in the order `GroupPlan.frontiers` numbers them."""
        self.edge_nodes = tuple(edge_nodes)
        """Walk index of the node of each edge `I` captures a gradient at, and its output."""
        self.edge_outputs = tuple(edge_outputs)
        self._frontiers_of = _getter(self.frontier_nodes)
        self._edge_nodes_of = _getter(self.edge_nodes)
        self._edge_frontiers_of = _getter(tuple(edge_frontiers))
        """Each captured edge's node as its position among the frontier nodes."""
        self._one_edge_each = self.edge_nodes == self.frontier_nodes
        """Every frontier node receives one gradient (a layer's one output): its edges are at
        the frontier nodes, so `capture` indexes the walk once."""

    def frontiers(self, nodes: Sequence[Node]) -> list[Node | None]:
        """The frontier nodes among one walk's `nodes`, in `frontier_nodes`' order."""
        return list(self._frontiers_of(nodes))

    def capture(self, nodes: Sequence[Node]) -> tuple[list[Node | None], Iterator[GradientEdge]]:
        """(`frontiers(nodes)`, `captured_edges(nodes)`), indexing `nodes` once where every
        frontier node receives one gradient."""
        if not self._one_edge_each:
            return self.frontiers(nodes), self.captured_edges(nodes)
        frontier = self._frontiers_of(nodes)
        pairs = zip(frontier, self.edge_outputs, strict=True)
        return list(frontier), map(tuple.__new__, repeat(GradientEdge), pairs)  # type: ignore[arg-type]

    def edges_at(self, frontier: Sequence[Node | None]) -> Iterator[GradientEdge]:
        """`captured_edges` over the frontier nodes alone (`frontiers`' answer, or the C++ walk's
        `GraphWalk.match`, which hands back only those)."""
        nodes = frontier if self._one_edge_each else self._edge_frontiers_of(frontier)
        pairs = zip(nodes, self.edge_outputs, strict=True)
        return map(tuple.__new__, repeat(GradientEdge), pairs)  # type: ignore[arg-type]

    def captured_edges(self, nodes: Sequence[Node]) -> Iterator[GradientEdge]:
        """The edges `I` captures a gradient at, over one walk's `nodes`: built by C loops, each
        edge a (node, output) tuple of class `GradientEdge` without its `__new__`'s frame."""
        pairs = zip(self._edge_nodes_of(nodes), self.edge_outputs, strict=True)
        return map(tuple.__new__, repeat(GradientEdge), pairs)  # type: ignore[arg-type]


def _getter(indices: tuple[int, ...]) -> Callable[[Sequence[Node | None]], tuple[Node | None, ...]]:
    """`lambda seq: tuple(seq[i] for i in indices)` as one C call (`itemgetter`)."""
    if len(indices) >= 2:
        return itemgetter(*indices)
    if len(indices) == 1:
        only = itemgetter(indices[0])
        return lambda seq: (only(seq),)
    return lambda seq: ()


class GroupCache:
    """What `backward_input` keeps for one stage between its calls: per graph shape, each
    group's parameters and direct form (ignoring hooks, checked per call), which every graph of
    the shape shares for the stage's parameters. Owned by the caller (the executor keeps one
    per stage), so it lives and dies with the stage's parameters it holds. Its direct forms
    also remember that their parameters passed `W`'s readiness checks until `reset`."""

    def __init__(self) -> None:
        # id(plan) -> (plan, params, prepared): the entry holds both, so their ids stay theirs.
        self._entries: dict[int, tuple[PlanShape, Sequence[Tensor], Prepared]] = {}
        self._leaves: _Leaves | None = None
        self._last: tuple[tuple[object, ...], PlanShape] | None = None
        self._walk = native.load()
        self.walked: Walked | None = None
        """The C++ walk's signature of the last graph `graph_shape` keyed, with that graph's lean
        plan: `backward_input` asks `Walked.match` first and walks in Python only where it finds
        another graph (None: no C++ walk, or the plan is not lean)."""

    def shape(self, key: tuple[object, ...]) -> PlanShape | None:
        """`known_shape(key)`, comparing with the last key this cache found first: a stage's
        micro-batches mostly share one shape, and a compare costs less than hashing the key."""
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        shape = _plan_shapes.get(key)
        if shape is not None:
            self._last = (key, shape)
        return shape

    def get(self, shape: PlanShape, params: Sequence[Tensor]) -> Prepared:
        entry = self._entries.get(id(shape))
        if entry is not None and entry[0] is shape and entry[1] is params:
            return entry[2]
        prepared = prepare_all(shape, params)
        if len(self._entries) >= _MAX_PREPARED:
            self._entries.clear()
            self.walked = None  # its plan must stay where `reset` reaches it
        self._entries[id(shape)] = (shape, params, prepared)
        return prepared

    def remember(
        self,
        roots: Sequence[Tensor],
        inputs: Sequence[Tensor],
        params: Sequence[Tensor],
        shape: PlanShape,
        prepared: Prepared,
    ) -> None:
        """After `graph_shape` keyed a graph to `shape` (and `get` gave `prepared`): record the
        graph's C++ signature, so the next graph of the same shape skips the Python walk. Only
        a lean plan (`backward_input`'s fast path needs just the frontier nodes) over a tuple of
        parameters (the signature names them by position in that one tuple)."""
        walked = self.walked
        if walked is not None and walked.shape is shape and walked.params is params:
            # The C++ walk told apart a graph the Python key did not: it is stricter than the
            # key for this stage's graphs (never seen), so stop asking it instead of paying twice.
            self._walk = None
        walk = self._walk
        self.walked = None
        if walk is None or not prepared.lean or type(params) is not tuple:
            return
        signature = walk.record(roots, inputs, params, prepared.frontier_nodes)
        if signature is not None:
            self.walked = Walked(walk.match, signature, shape, prepared, params)

    def reset(self) -> None:
        """End the direct groups' readiness memo (`accumulate_at`): their next `W` checks the
        parameters in full. Call it wherever a parameter's data or a gradient's properties may
        have changed other than by assigning `.grad` (the executor: at each step's start and end,
        and after each STEP and sharding action), e.g. `param.data = ...`, which no version counter
        or `.grad` identity sees."""
        for _, _, prepared in self._entries.values():
            for _, found in prepared.groups:
                if found is not None:
                    found.forget()

    def leaves(self, params: Sequence[Tensor]) -> _Leaves | None:
        """The parameter leaves of `params` met so far, for `graph_shape`; None unless
        `params` is a tuple (immutable: a position names one tensor for as long as it lives)."""
        if type(params) is not tuple:
            return None
        leaves = self._leaves
        if leaves is None or leaves.params is not params:
            leaves = self._leaves = _Leaves(params)
        return leaves


class Walked(NamedTuple):
    """`GroupCache.walked`: what the C++ walk needs to recognise a stage's next graph."""

    match: native.MatchFn
    signature: object
    shape: PlanShape
    prepared: Prepared
    params: tuple[Tensor, ...]


class _Leaves:
    """A stage's parameters by identity, and the AccumulateGrad nodes that hold them.

    A parameter's AccumulateGrad node is one object for as long as something holds it (autograd
    keeps a weak reference on the parameter and hands the same node to every graph); holding
    them here makes every micro-batch's graph reach the same nodes, so `graph_shape` knows
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


_ACCUMULATE_GRAD: type = type(get_gradient_edge(torch.empty(0, requires_grad=True)).node)
"""The class of autograd's leaf nodes (AccumulateGrad, the only nodes with a `variable`)."""
_FUNCTION_BASE: type = torch._C._FunctionBase
"""The class of `torch.autograd.Function` nodes, whose Python object does not own the graph."""
_new = tuple.__new__


def root_edge(root: Tensor) -> GradientEdge:
    """`get_gradient_edge(root)` without its Python frame where `root` has a built-in grad_fn
    (an edge to a custom Function's node carries an ownership token: built by torch)."""
    node = root.grad_fn
    if node is None or isinstance(node, _FUNCTION_BASE):
        return get_gradient_edge(root)
    return _new(GradientEdge, (node, root.output_nr, None))


def graph_shape(
    roots: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    leaves: _Leaves | None = None,
) -> tuple[tuple[object, ...], list[Node], list[GradientEdge]]:
    """(key, nodes, root edges): one breadth-first walk from the roots. The key holds, per root,
    (walk index of its node, output number), then per node in walk order its class, and either
    the entries of its children, or for a leaf (AccumulateGrad, which has no children) which
    input it holds ("other" for none of them, None for no tensor). A child's entry is its walk
    index (-1 for none), or, for the leaf of a parameter, the ("param", position) it holds:
    parameter leaves are not walked. Flat, and unambiguous because a class starts each node's
    entries and no entry is a class (a node's entries end where the next class starts, so no
    terminator is appended: 29 appends fewer on the 4-block stage). Two graphs with equal keys are
    the same graph up to the node objects, so `_plan_groups` (a function of exactly that)
    plans them alike. `leaves` (a stage's, from its `GroupCache`) knows the parameter leaves
    met before, so they are recognised without reading the tensor each holds.

    One dict gives each node met its entry (a walk index, or a parameter leaf's position), so
    a child costs one lookup; `next_functions` (a new tuple per call) is most of what is left."""
    if leaves is None:
        held_by: dict[int, object] = {id(p): ("param", i) for i, p in enumerate(params)}
        entry: dict[Node | None, object] = {}
    else:
        held_by = leaves.held_by
        entry = leaves.nodes.copy()  # type: ignore[assignment]  # and None, below
    nodes: list[Node] = []
    key: list[object] = []
    edges: list[GradientEdge] = []
    for root in roots:
        # `root_edge`, inlined (a call's frame per root).
        node = root.grad_fn
        if node is None or isinstance(node, _FUNCTION_BASE):
            edge = get_gradient_edge(root)
            node = edge.node
        else:
            edge = _new(GradientEdge, (node, root.output_nr, None))
        edges.append(edge)
        at = entry.get(node)
        if type(at) is not int:  # a root's node is walked, even a parameter's leaf
            at = entry[node] = len(nodes)
            nodes.append(node)
        key.append((at, edge.output_nr))
    entry[None] = -1  # a missing child's entry, found as any other's (no test per child)
    find, add_node, add_key = entry.get, nodes.append, key.append
    accumulate_grad = _ACCUMULATE_GRAD
    learned: list[tuple[Node, object]] = []
    for node in nodes:  # grows while it is walked: breadth first
        node_type = type(node)
        add_key(node_type)
        if node_type is accumulate_grad:  # no children; a parameter's only where it is a root
            variable = node.variable  # type: ignore[attr-defined]
            if variable is None:
                add_key(None)
                continue
            held = held_by.get(id(variable))
            add_key(held if held is not None else _input_entry(variable, inputs))
            continue
        for child, _ in node.next_functions:
            at = find(child)  # a missing child (None) finds -1
            if at is None:
                if type(child) is accumulate_grad:
                    variable = child.variable  # type: ignore[union-attr]
                    held = None if variable is None else held_by.get(id(variable))
                    if held is not None:  # a parameter's leaf: its position, not a walk index
                        learned.append((child, held))  # type: ignore[arg-type]  # not None: found -1
                        entry[child] = held
                        add_key(held)
                        continue
                at = entry[child] = len(nodes)
                add_node(child)  # type: ignore[arg-type]  # not None: None finds -1
            add_key(at)
    if leaves is not None and learned:
        leaves.learn(learned)
    return tuple(key), nodes, edges


_INPUT_ENTRIES = tuple(("input", i) for i in range(8))
"""`graph_shape`'s key entry of the leaf of input i, one object for every walk (a compare of
equal keys then finds them identical)."""


def _input_entry(variable: Tensor, inputs: Sequence[Tensor]) -> object:
    """The key entry of a walked leaf holding `variable` that is no parameter: ("input", i) for
    the last i with `inputs[i] is variable`, else "other". (A loop, not a dict of the inputs'
    ids per walk: a stage has one input or a few.)"""
    for i in range(len(inputs) - 1, -1, -1):
        if inputs[i] is variable:
            return _INPUT_ENTRIES[i] if i < len(_INPUT_ENTRIES) else ("input", i)
    return "other"


def plan_shape(
    key: tuple[object, ...],
    nodes: Sequence[Node],
    edges: Sequence[GradientEdge],
    roots: Sequence[Tensor],
    root_grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
) -> PlanShape:
    """Plan a graph shape not seen before (`_plan_groups`, `match_direct` on each group) and
    keep the plan under its key."""
    shape = _shape_of(_plan_groups(roots, root_grads, inputs, params), nodes, edges, params)
    if len(_plan_shapes) >= _MAX_PLAN_SHAPES:
        _plan_shapes.pop(next(iter(_plan_shapes)))
    _plan_shapes[key] = shape
    return shape


def known_shape(key: tuple[object, ...]) -> PlanShape | None:
    """The plan kept under `key` by an earlier `plan_shape`, if any."""
    return _plan_shapes.get(key)


def groups_of(
    shape: PlanShape,
    prepared: Prepared,
    nodes: Sequence[Node],
    edges: Sequence[GradientEdge],
    root_grads: Sequence[Tensor],
    *,
    direct: bool,
) -> list[Group]:
    """The plan's groups as `Group` objects over one graph (`graph_shape`'s nodes and edges),
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


def prepare_all(shape: PlanShape, params: Sequence[Tensor]) -> Prepared:
    return Prepared(shape, params)


def _prepare(
    found: tuple[str, int, int, int, tuple[tuple[int, int], ...]] | None,
    param_positions: tuple[int, ...],
    params: Sequence[Tensor],
) -> tuple[list[Tensor], Direct | None]:
    """A group's parameters and direct form (from `PlanShape.directs`) for `params`."""
    group_params = [params[i] for i in param_positions]
    if found is None:
        return group_params, None
    kind, _, weight, bias, slots = found
    return group_params, direct_from_planned(
        kind,
        params[weight] if weight >= 0 else None,
        params[bias] if bias >= 0 else None,
        tuple((output, params[i]) for output, i in slots),
    )


def _shape_of(
    groups: Sequence[Group], nodes: Sequence[Node], edges: Sequence[GradientEdge], params: Sequence[Tensor]
) -> PlanShape:
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
                found.planned_kind,
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
    return PlanShape(
        tuple(shaped),
        num_outputs,
        tuple(directs),
        weight_order=tuple(weight_order),
        rerun_order=_rerun_order(groups),
        disjoint=groups_are_disjoint(groups),
        captured=all(n > 0 for per_group in num_outputs for n in per_group),
    )


def _rerun_order(groups: Sequence[Group]) -> tuple[int, ...]:
    """The groups by the latest autograd sequence number among their anchor nodes, highest
    first: about the order the engine reached them in `I`, the last layer's first.

    Under non-reentrant activation checkpointing `W`'s first unpack in a layer reruns the
    layer's forward, and the checkpoint keeps each rerun tensor until its saved slot is
    unpacked in that call or the node holding the slot dies. `W` never unpacks what only
    the input closure's nodes read (an attention core's saved tensors, a layer norm's
    statistics, ...), and those nodes live while any node above them does. Run in the walk's
    order (`weight_order`, which interleaves the layers along the residual path), `W` reran
    every layer before finishing any and held them all at its peak; from the inputs up, each
    finished layer's leftovers stay held by the layers above. From the last layer down, a
    layer's nodes (and so its leftovers) die with its last group, before the next layer's
    rerun: `W`'s peak is one layer's rerun, as `I`'s is. A checkpointed layer's nodes are
    created together in its forward, so their sequence numbers are contiguous and its
    groups run together. (`tests/model/test_profile_precision.py` counts it.)"""
    anchors = [
        [f.node for f in group.frontiers] + [edge.node for edge, _ in group.output_seeds] for group in groups
    ]
    latest = [max((node._sequence_nr() for node in nodes), default=-1) for nodes in anchors]
    return tuple(sorted(range(len(groups)), key=lambda i: latest[i], reverse=True))


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


def groups_are_disjoint(groups: Sequence[Group]) -> bool:
    """True when no call of `W` can execute a node that another call also executes.

    A group's call executes nodes of the input closure only at its own frontier nodes,
    unless one of its frontier nodes reaches another through the closure; that happens
    only for a parameter used at several places, and then the calls may overlap.
    """
    return all(len(group.frontiers) <= 1 for group in groups)
