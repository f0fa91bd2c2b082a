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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node
from torch.utils.hooks import RemovableHandle

from pipefold.errors import BoundaryMismatch, PipelineError
from pipefold.runtime.backward_groups import (
    Frontier,
    Grads,
    Group,
    accumulate_at,
    accumulate_direct,
    collector,
)
from pipefold.runtime.backward_plan import (
    GroupCache,
    GroupPlan,
    graph_shape,
    groups_of,
    known_shape,
    plan_shape,
    prepare_all,
    root_edge,
)
from pipefold.runtime.sent_outputs import SENT_SHAPE, output_shape

__all__ = ["GroupCache", "WeightGradState", "backward_full", "backward_input", "backward_weight"]

# autograd's engine entry point under `torch.autograd.backward` / `grad` (private; absent
# in some torch version -> the public functions). See `_run_engine`.
_engine_run_backward: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)

_PreHook = Callable[[Grads], Grads | None]
_HAS_EXEC_GROUP = hasattr(torch.utils.checkpoint, "GraphExecGroup")
"""Whether this torch has `GraphExecGroup` (see `backward_weight`)."""
_has_torch_function = torch.overrides.has_torch_function
# What `GraphExecGroup` enters and exits by (absent where `_HAS_EXEC_GROUP` is false).
_get_graph_exec_group: Callable[[], object] = getattr(torch._C, "_get_graph_exec_group", lambda: None)
_set_graph_exec_group: Callable[[object], None] = getattr(
    torch._C, "_set_graph_exec_group", lambda group: None
)


@dataclass(eq=False)
class WeightGradState:
    """What `backward_weight` needs from `backward_input` for one (stage, micro-batch).

    It holds the frontier nodes (and so the part of the stage's graph below them) and the
    gradients kept at them; `backward_weight` releases all of it. Either as `Group` objects
    (`_groups`), or, on the common path (see `Prepared.lean`), as the shape's plans with one
    flat list of frontier nodes and one of kept gradients, which costs no object per group.
    """

    _groups: list[Group] = field(default_factory=list)
    _disjoint: bool = True
    """No node runs in two calls of `W` (see `groups_are_disjoint`)."""
    _done: bool = False
    _plans: tuple[GroupPlan, ...] = ()
    """The lean form's groups, in the order `W` runs them."""
    _nodes: list[Node | None] = field(default_factory=list)
    """The lean form's frontier nodes (`GroupPlan.frontiers` positions)."""
    _kept: list[Tensor | None] = field(default_factory=list)
    """The lean form's gradients kept at the frontier nodes (`GroupPlan.frontiers` slots)."""
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
    if len(outputs) == 1 and len(output_grads) == 1 and len(inputs) <= 1 and _engine_run_backward is not None:
        # A stage's usual B: one output with its gradient, one input leaf that wants its
        # gradient or none (a first stage). `_roots`, `_check_inputs` and `_run_engine`
        # inlined, with the same checks (whatever fails one takes the general path below, which
        # raises or handles it): four Python calls fewer on each B, which runs right after
        # autograd's engine left the caches cold.
        (output,), (grad,) = outputs, output_grads
        root = (output,)
        if (
            grad is not None
            and output.requires_grad
            and grad.shape == getattr(output, SENT_SHAPE, output.shape)  # `output_shape`, inlined
            and not _has_torch_function(root)
        ):
            if not inputs:
                _engine_run_backward(
                    root, (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True
                )
                return ()
            (leaf,) = inputs
            if leaf.requires_grad and leaf.grad_fn is None:
                kept = leaf.grad
                leaf.grad = None
                try:
                    _engine_run_backward(
                        root, (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True
                    )
                    found = leaf.grad
                finally:
                    leaf.grad = kept
                return (found,)
    roots, root_grads = _roots(outputs, output_grads)
    wanted = _check_inputs(inputs)
    if not roots:
        return tuple(None for _ in inputs)
    # Inputs are leaves, so autograd accumulates their gradient into `.grad`; lend it an
    # empty `.grad` and hand back what it had, so the caller's tensors are unchanged.
    if len(inputs) == 1 and wanted:  # a stage's usual boundary: the same, without the lists
        (leaf,) = inputs
        kept = leaf.grad
        leaf.grad = None
        try:
            _run_engine(roots, root_grads, (), retain_graph=False, accumulate_grad=True, tensors=tuple(roots))
            found = leaf.grad
        finally:
            leaf.grad = kept
        return (found,)
    previous = [inputs[i].grad for i in wanted]
    for i in wanted:
        inputs[i].grad = None
    try:
        _run_engine(roots, root_grads, (), retain_graph=False, accumulate_grad=True, tensors=tuple(roots))
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
    `backward_weight` needs to accumulate the gradients of `params` later (where no input
    needs a gradient, `W` is the whole backward and accumulates into every leaf of the graph,
    as `backward_full` does). No parameter's `.grad` changes here. The stage's graph stays
    alive until `backward_weight` (it holds the activations the weight gradients need); the
    caller may drop `outputs`.
    `direct=False` makes `W` use autograd for every group; pass it where the stage
    recomputes activations or hooks sit on its parameters' AccumulateGrad nodes
    (docs/decisions.md, "direct weight gradients"). `cache` (one per stage, kept by the
    caller) saves rebuilding what every graph of a shape shares.
    """
    roots: list[Tensor]
    root_grads: list[Tensor]
    if len(outputs) == 1 and len(output_grads) == 1 and len(inputs) == 1:
        # A stage's usual boundary: `_roots` and `_check_inputs` inlined, with the same checks
        # (whatever fails one takes their calls, which raise or handle it).
        (output,), (grad,), (leaf,) = outputs, output_grads, inputs
        if (
            grad is not None
            and output.requires_grad
            and grad.shape == getattr(output, SENT_SHAPE, output.shape)  # `output_shape`, inlined
            and leaf.requires_grad
            and leaf.grad_fn is None
        ):
            roots, root_grads, wanted = [output], [grad], [0]
        else:
            roots, root_grads = _roots(outputs, output_grads)
            wanted = _check_inputs(inputs)
    else:
        roots, root_grads = _roots(outputs, output_grads)
        wanted = _check_inputs(inputs)
    if not wanted or not roots:
        # Nothing for `I` to compute (a first stage's inputs need no gradient): `W` is the
        # whole backward, `B`'s engine call from the outputs, so no walk or plan. It holds the
        # outputs' edges, not the outputs.
        whole = (list(map(root_edge, roots)), root_grads, params) if roots and params else None
        return (None,) * len(inputs), WeightGradState(_whole=whole)
    wanted_inputs = [inputs[0]] if len(inputs) == 1 else [inputs[i] for i in wanted]
    walked = cache.walked if cache is not None else None
    # The C++ walk first (`GroupCache.walked`): a graph of the last one's shape gives just its
    # frontier nodes, with no Python object for the others; any other graph the Python walk.
    frontier_nodes = None if walked is None else walked.match(walked.signature, roots, wanted_inputs, params)
    if frontier_nodes is not None:
        shape, prepared = walked.shape, walked.prepared  # type: ignore[union-attr]  # matched
        captured_edges = prepared.edges_at(frontier_nodes)
    else:
        key, nodes, edges = graph_shape(
            roots, wanted_inputs, params, cache.leaves(params) if cache is not None else None
        )
        shape = cache.shape(key) if cache is not None else known_shape(key)
        if shape is None:
            shape = plan_shape(key, nodes, edges, roots, root_grads, wanted_inputs, params)
        prepared = cache.get(shape, params) if cache is not None else prepare_all(shape, params)
        if cache is not None:
            cache.remember(roots, wanted_inputs, params, shape, prepared)
        if prepared.lean:
            frontier_nodes, captured_edges = prepared.capture(nodes)
    if prepared.lean:
        # The common path: no object per group, the frontier nodes and their gradients in two
        # flat lists that the shape's plans index.
        assert frontier_nodes is not None
        engine_inputs: tuple[Tensor | GradientEdge, ...] = (*wanted_inputs, *captured_edges)
        tensors = (*roots, *wanted_inputs)
        if _engine_run_backward is not None and not _has_torch_function(tensors):
            # `_run_engine`'s common case, without its frame and conversions.
            found = _engine_run_backward(
                tuple(roots), tuple(root_grads), True, False, engine_inputs,
                allow_unreachable=True, accumulate_grad=False,
            )
        else:
            found = _run_engine(
                roots, root_grads, engine_inputs, retain_graph=True, accumulate_grad=False, tensors=tensors
            )
        num_wanted = len(wanted)
        input_grads: Grads
        if num_wanted == len(inputs):  # every input wants its gradient (`wanted` is 0, 1, ...)
            input_grads = found[:num_wanted]
        else:
            result: list[Tensor | None] = [None] * len(inputs)
            for i, grad in zip(wanted, found, strict=False):
                result[i] = grad
            input_grads = tuple(result)
        # Positional: a dataclass's keyword call costs twice as much.
        kept = list(found[num_wanted:])
        # Recomputed (`direct` false): the groups one layer at a time, the last first, so W
        # holds one layer's rerun at a time (`PlanShape.rerun_order`).
        plans = prepared.plans if direct else prepared.rerun_plans
        lean = WeightGradState([], shape.disjoint, False, plans, frontier_nodes, kept, direct)
        return input_grads, lean
    result = [None] * len(inputs)
    groups = groups_of(shape, prepared, nodes, edges, root_grads, direct=direct)
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
    # the plan holds the order; with hooks it is when each hook ran.) A recomputed stage's W
    # (`direct` false) goes one layer at a time instead, the last first, for its memory.
    if captured:
        at = len(wanted)
        for frontier in frontiers:
            frontier.grads = grads[at : at + frontier.num_outputs]
            at += frontier.num_outputs
        state._groups = [groups[i] for i in (shape.weight_order if direct else shape.rerun_order)]
    elif direct:
        state._groups.sort(key=_last_kept, reverse=True)
    else:  # recomputed: one layer at a time, the last first (see `PlanShape.rerun_order`)
        state._groups = [groups[i] for i in shape.rerun_order]
    return tuple(result), state


def _last_kept(group: Group) -> int:
    return max((f.order for f in group.frontiers), default=-1)


def backward_weight(state: WeightGradState) -> None:
    """Weight half (`W`): accumulate the weight gradients into `param.grad`, free the state."""
    if state._done:
        raise PipelineError(
            "backward_weight was called twice with the same WeightGradState; run W exactly once after each I"
        )
    disjoint = state._disjoint
    share = disjoint and _HAS_EXEC_GROUP
    state._done = True
    if state._plans:
        _weight_lean(state, share)
        return
    if state._whole is not None:
        (roots, grads, _), state._whole = state._whole, None
        # Into every leaf of the graph, as `B` accumulates (`backward_full`), not into `params`
        # as inputs: naming them makes the engine mark the nodes that lead to them first (its
        # `exec_info`, 12 µs a call on the 4-block d=8 stage), and a stage's leaves are its
        # parameters. The same nodes run in the same order: the same bits. (The roots are
        # edges: a tensor subclass is among the gradients, if anywhere.)
        _run_engine(roots, grads, (), retain_graph=False, accumulate_grad=True, tensors=tuple(grads))
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
    # tensors recomputes its region, once per scope. The scope's `__enter__` and `__exit__`
    # inlined (two Python frames and the `with` protocol a call): the same nesting check.
    if share:
        if _get_graph_exec_group() is not None:
            raise RuntimeError(
                f"GraphExecGroup contexts cannot be nested. Already inside group {_get_graph_exec_group()}"
            )
        _set_graph_exec_group(torch.utils.checkpoint.GraphExecGroup())
    enabled = torch.is_grad_enabled()
    try:
        torch._C._set_grad_enabled(False)
        try:
            for plan in plans:
                found = plan.direct
                if found is not None and direct:
                    position, at = plan.first
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
    finally:
        if share:
            _set_graph_exec_group(None)


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
    if _engine_run_backward is None or _has_torch_function(tensors):
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
    if len(outputs) == 1 and len(output_grads) == 1:
        # A stage's usual boundary, without the loop's iterators (the same checks).
        (output,), (grad,) = outputs, output_grads
        if output.requires_grad:
            shape = output_shape(output)
            if grad is None:
                if shape.numel() == 1:
                    return [output], [torch.ones_like(output)]
            elif grad.shape != shape:
                raise BoundaryMismatch(
                    f"output_grads[0] has shape {tuple(grad.shape)} but output 0 has shape "
                    f"{tuple(shape)}; the gradient must match its output"
                )
            else:
                return [output], [grad]
        return [], []
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
        # A sent output may have had its data freed (runtime.sent_outputs): its shape is kept.
        shape = output_shape(output)
        if grad is None:
            if shape.numel() != 1:
                continue
            grad = torch.ones_like(output)
        elif grad.shape != shape:
            raise BoundaryMismatch(
                f"output_grads[{index}] has shape {tuple(grad.shape)} but output {index} has shape "
                f"{tuple(shape)}; the gradient must match its output"
            )
        roots.append(output)
        grads.append(grad)
    return roots, grads


def _check_inputs(inputs: Sequence[Tensor]) -> list[int]:
    """Indices of the inputs that need a gradient; each must be a leaf."""
    if len(inputs) == 1 and (not inputs[0].requires_grad or inputs[0].grad_fn is None):
        return [0] if inputs[0].requires_grad else []
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
