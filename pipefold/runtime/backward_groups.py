"""The weight side of a split backward, in groups: the parameters whose gradients come from the
same frontier nodes (where `I` stops), and the groups `W` computes itself without autograd's
engine (one linear or layer norm, or a compiled graph whose weight gradients `I` already
computed). `pipefold.runtime.backward` plans the groups and runs `I` and `W`.

Design notes: docs/decisions.md, "split backward" and "direct weight gradients".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

__all__ = [
    "Direct",
    "Frontier",
    "Group",
    "accumulate_at",
    "accumulate_direct",
    "collector",
    "direct_from_planned",
    "has_hooks",
    "match_direct",
]

Grads = tuple[Tensor | None, ...]


@dataclass(eq=False)
class Frontier:
    """A node of the input closure with an edge into a weight subgraph."""

    node: Node
    grads: Grads | None = None
    """The gradients that arrived at `node` during `I` (one per output of its forward)."""
    order: int = -1
    """When `node` ran during `I` (0 first); -1 if it did not run."""
    computed: Grads | None = None
    """The weight gradients a compiled node computed during `I` (its outputs at the group's
    parameter edges, see `Direct.slots`); None until it ran."""
    num_outputs: int = 0
    """Outputs of `node`'s forward (gradients it receives); 0 where torch does not say, and
    `I` then keeps its gradients with a Python hook instead of asking the engine for them."""


@dataclass(eq=False)
class Group:
    """Parameters whose weight gradients come from the same frontier nodes and outputs."""

    params: list[Tensor]
    frontiers: list[Frontier]
    output_seeds: list[tuple[GradientEdge, Tensor]]
    """Outputs that reach this group's parameters but no input, with their gradients."""
    direct: Direct | None = None
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


@dataclass(eq=False)  # not frozen: `I` builds one per group per call, and a frozen init costs 3x
class Direct:
    """A group `W` computes itself: one linear (`kind` "addmm" / "mm") or layer norm, or a
    compiled graph whose weight gradients `I` already computed (`kind` "compiled"), at the
    group's one frontier node. It holds no node, so one serves every graph of a shape."""

    kind: str
    weight: Tensor | None
    bias: Tensor | None
    slots: tuple[tuple[int, Tensor], ...] = ()
    """"compiled": (output index of `node`, the parameter whose gradient it is), per edge."""
    # The readiness memo (`accumulate_at`): once `_ready` passed for the parameters in one
    # stretch (`GroupCache.reset` ends it), a later call checks only what can change without
    # a step boundary in between, see `accumulate_at`.
    ready: torch.dtype | None = None
    """The gradient dtype `_ready` passed both parameters for; None: check them again."""
    weight_slot: Tensor | None = None
    """`weight.grad` as `_ready` passed it or `W` last left it (None: was None)."""
    bias_slot: Tensor | None = None
    """`bias.grad`, likewise."""
    rows: int = -1
    """A linear's: the size the gradient's and the bias's last dim must have (the weight's rows),
    as the memo's check found it."""
    columns: int = -1
    """A linear's: the size the saved input's last dim must have (the weight's columns); -1
    where there is no weight."""
    cast: bool = False
    """A linear under autocast: its parameters reach it through their 16-bit casts
    (`ToCopyBackward0`), so its product is in the compute dtype and is accumulated into the
    parameters' own (fp32) gradients, as autograd's cast node and AccumulateGrad do."""

    @property
    def planned_kind(self) -> str:
        """`kind` as `PlanShape.directs` keeps it (a cast linear's marked: `direct_from_planned` reads it)."""
        return self.kind + _CAST_MARK if self.cast else self.kind

    def forget(self) -> None:
        """End the readiness memo: the next call checks the parameters in full."""
        self.ready = self.weight_slot = self.bias_slot = None


def _leaf_param(node: Node | None, params: dict[int, Tensor]) -> Tensor | None:
    """The group parameter whose AccumulateGrad `node` is, else None."""
    variable = getattr(node, "variable", None) if node is not None else None
    if isinstance(variable, Tensor) and id(variable) in params:
        return params[id(variable)]
    return None


def _transposed_param(node: Node | None, params: dict[int, Tensor], *, cast: bool = False) -> Tensor | None:
    """The group parameter reached through exactly one `TBackward0` (a linear weight); with
    `cast`, through a `TBackward0` and then autocast's cast of the weight (`_cast_param`)."""
    if node is None or node.name() != "TBackward0" or len(node.next_functions) != 1:
        return None
    child = node.next_functions[0][0]
    return _cast_param(child, params) if cast else _leaf_param(child, params)


def _cast_param(node: Node | None, params: dict[int, Tensor]) -> Tensor | None:
    """The group parameter reached through exactly one `ToCopyBackward0` (autocast's 16-bit copy
    of a weight or bias, whose backward casts the gradient back: `accumulate_at` does that)."""
    if node is None or node.name() != "ToCopyBackward0" or len(node.next_functions) != 1:
        return None
    return _leaf_param(node.next_functions[0][0], params)


_CAST_MARK = "+cast"
"""Appended to a cast linear's kind in `PlanShape.directs` (`Direct.planned_kind`)."""


def direct_from_planned(
    kind: str, weight: Tensor | None, bias: Tensor | None, slots: tuple[tuple[int, Tensor], ...]
) -> Direct:
    """The `Direct` a planned kind (`Direct.planned_kind`) and its parameters describe."""
    if kind.endswith(_CAST_MARK):
        return Direct(kind[: -len(_CAST_MARK)], weight, bias, slots, cast=True)
    return Direct(kind, weight, bias, slots)


_DIRECT_NODES = {"AddmmBackward0", "MmBackward0", "NativeLayerNormBackward0", "CompiledFunctionBackward"}
_node_names: dict[type, str | None] = {}
"""Node class -> its name when it is one `match_direct` knows (name() builds a string per call)."""


def match_direct(group: Group, *, check_hooks: bool = True) -> Direct | None:
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
        return match_compiled(group, node, params, check_hooks=check_hooks)
    weight: Tensor | None
    bias: Tensor | None = None
    cast = False
    if name == "AddmmBackward0" and len(edges) == 3:  # addmm(self=bias, mat1=input, mat2=weight.t())
        kind, weight = "addmm", _transposed_param(edges[2][0], params)
        if weight is None:  # under autocast: mat2 = the weight's 16-bit cast, transposed
            weight = _transposed_param(edges[2][0], params, cast=True)
            cast = weight is not None
        if edges[0][0] is not None:
            bias = _cast_param(edges[0][0], params) if cast else _leaf_param(edges[0][0], params)
            if bias is None:
                return None
    elif name == "MmBackward0" and len(edges) == 2:  # mm(self=input, mat2=weight.t())
        kind, weight = "mm", _transposed_param(edges[1][0], params)
        if weight is None:
            weight = _transposed_param(edges[1][0], params, cast=True)
            cast = weight is not None
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
    if check_hooks and any(has_hooks(param) for param in found):
        return None
    return Direct(kind, weight, bias, cast=cast)


def match_compiled(
    group: Group, node: Node, params: dict[int, Tensor], *, check_hooks: bool = True
) -> Direct | None:
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
    if check_hooks and any(has_hooks(param) for param in group.params):
        return None
    return Direct("compiled", None, None, tuple(slots))


def _accumulate_computed(direct: Direct, frontier: Frontier) -> bool:
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


def collector(frontier: Frontier, slots: tuple[tuple[int, Tensor], ...]) -> Callable[[Grads, Grads], None]:
    def collect(grad_inputs: Grads, grad_outputs: Grads) -> None:
        frontier.computed = tuple(grad_inputs[index] for index, _ in slots)

    return collect


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_STRIDED = torch.strided


def _plain(tensor: Tensor, dtype: torch.dtype) -> bool:
    return (
        type(tensor) in _PLAIN_TYPES
        and tensor.dtype == dtype
        and tensor.layout == _STRIDED
        and tensor.is_contiguous()
    )


def _ready(param: Tensor, dtype: torch.dtype) -> tuple[bool, Tensor | None]:
    """(`_plain(param, dtype) and _grad_slot_ok(param)` with no hook on its gradient's
    accumulation, `param.grad`): one call per parameter on `W`'s direct path, which then
    uses the gradient slot it read. (Dtypes and layouts are singletons, so `is` compares them
    without a rich compare.)"""
    if not (
        type(param) in _PLAIN_TYPES
        and param.dtype is dtype
        and param.layout is _STRIDED
        and param.is_contiguous()
    ):
        return _NOT_READY
    if param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
        return _NOT_READY  # only autograd's path runs them
    if getattr(param, "grad_dtype", dtype) is not dtype:
        return _NOT_READY  # autograd would cast to the declared gradient dtype
    grad = param.grad
    if grad is None or (
        type(grad) in _PLAIN_TYPES
        and grad.dtype is dtype
        and grad.layout is _STRIDED
        and grad.is_contiguous()
        and not grad.requires_grad
        and grad.shape == param.shape
    ):
        return True, grad
    return _NOT_READY


_NOT_READY: tuple[bool, Tensor | None] = (False, None)


def _grad_slot_ok(param: Tensor) -> bool:
    """`param.grad` can take an in-place accumulation exactly as AccumulateGrad would."""
    if getattr(param, "grad_dtype", param.dtype) != param.dtype:
        return False  # autograd would cast to the declared gradient dtype
    grad = param.grad
    return grad is None or (
        _plain(grad, param.dtype) and not grad.requires_grad and grad.shape == param.shape
    )


def accumulate_direct(direct: Direct, frontier: Frontier) -> bool:
    """Accumulate the group's weight gradients without autograd (called with grad mode off);
    False (nothing done) when a runtime condition fails and the autograd path must run instead."""
    if direct.kind == "compiled":
        return _accumulate_computed(direct, frontier)
    grads = frontier.grads
    if not grads:
        return False
    return accumulate_at(direct, frontier.node, grads[0])


def accumulate_at(direct: Direct, node: Node, grad: Tensor | None) -> bool:
    """`accumulate_direct` for a linear or layer norm `direct` at its frontier `node`, given
    the gradient that arrived at the node's first output (the layer's output).

    The parameters' readiness (`_ready`) is checked in full once and then remembered on
    `direct` (`Direct.ready`) until `GroupCache.reset`, which the executor calls at each step's
    start and end and after each action that may swap a parameter's data (STEP under a weight stash,
    the sharding actions). In between, a call checks per parameter only what user code can
    change at any time without touching the parameter's data: `.grad` is the tensor checked
    or last written here (an assignment, `zero_grad(set_to_none=True)`, autograd's fallback
    replacing it), and no hook sits on its accumulation. (What the memo holds besides is set
    once when a model is built: the parameters' type, dtype, layout, contiguity, shape and
    `grad_dtype`, and their gradients'.)"""
    if grad is None or type(grad) is not Tensor:
        return False
    dtype = grad.dtype
    weight, bias = direct.weight, direct.bias
    weight_grad = bias_grad = None
    if (
        direct.ready is dtype
        and (
            weight is None
            or (
                weight.grad is direct.weight_slot
                and not weight._backward_hooks
                and not weight._post_accumulate_grad_hooks
            )
        )
        and (
            bias is None
            or (
                bias.grad is direct.bias_slot
                and not bias._backward_hooks
                and not bias._post_accumulate_grad_hooks
            )
        )
    ):
        weight_grad, bias_grad = direct.weight_slot, direct.bias_slot
    else:
        direct.ready = None
        # The gradients' dtype is the parameters' own. A cast linear's (autocast's fp32 masters)
        # differs from its product's compute dtype: a real cast, on the same device (a
        # `ToCopyBackward0` that moved devices takes autograd's path). A layer norm may get a
        # 16-bit input with fp32 parameters (CPU autocast keeps them uncast): its kernel returns
        # their gradients in their own dtype, as autograd's node does (`_layer_norm_direct` checks).
        owned = dtype
        if direct.cast or direct.kind == "layer_norm":
            owned = (weight if weight is not None else bias).dtype  # type: ignore[union-attr]  # match_direct found one
        if direct.cast and (
            owned is dtype or any(p is not None and p.device != grad.device for p in (weight, bias))
        ):
            return False
        if weight is not None:
            ready, weight_grad = _ready(weight, owned)
            if not ready:
                return False
        if bias is not None:
            ready, bias_grad = _ready(bias, owned)
            if not ready:
                return False
        if direct.kind != "layer_norm":
            dims = _linear_dims(weight, bias)
            if dims is None:
                return False
            direct.rows, direct.columns = dims
        direct.ready, direct.weight_slot, direct.bias_slot = dtype, weight_grad, bias_grad
    kind = direct.kind
    if kind == "layer_norm":
        return _layer_norm_direct(direct, weight_grad, bias_grad, node, grad, dtype)
    saved_input: Tensor
    if kind == "addmm":
        if node._saved_alpha != 1 or node._saved_beta != 1:  # type: ignore[attr-defined]
            return False
        saved_input = node._saved_mat1  # type: ignore[attr-defined]
    else:
        saved_input = node._saved_self  # type: ignore[attr-defined]
    if type(saved_input) is not Tensor or saved_input.dtype is not dtype:
        return False
    grad_shape, input_shape = grad.shape, saved_input.shape
    columns = direct.columns
    if (
        len(grad_shape) != 2
        or len(input_shape) != 2
        or grad_shape[1] != direct.rows  # the parameters' shapes, as the memo's check read them
        or (columns >= 0 and input_shape[1] != columns)
    ):
        return False
    # The gradient slots as checked: nothing runs between the check and the write.
    if direct.cast:
        # Autograd's path: the product in the compute dtype (mm_mat2_backward on the cast
        # weight's transpose, transposed back), `ToCopyBackward0` casting it to the master's
        # dtype, AccumulateGrad adding it: the same bits (an add_ of a 16-bit tensor into an
        # fp32 one converts it exactly first).
        if weight is not None:
            product = _mm(grad.mT, saved_input)
            if weight_grad is None:
                weight.grad = direct.weight_slot = product.to(weight.dtype)
            else:
                weight_grad.add_(product)
        if bias is not None:
            summed = _sum(grad, 0)
            if bias_grad is None:
                bias.grad = direct.bias_slot = summed.to(bias.dtype)
            else:
                bias_grad.add_(summed)
        return True
    if weight is not None:
        # The product autograd forms for a linear weight (mm_mat2_backward on W.t(),
        # transposed back), accumulated inside the GEMM.
        # (`mT` is `t()` for a matrix, the same view, read as a property.)
        if weight_grad is None:
            weight.grad = direct.weight_slot = _mm(grad.mT, saved_input)
        else:
            weight_grad.addmm_(grad.mT, saved_input)
    if bias is not None:
        # `torch.sum(grad, 0)` is `grad.sum(0)` (one overload) with a cheaper argument parse.
        if bias_grad is None:
            bias.grad = direct.bias_slot = _sum(grad, 0)  # a reduction's result is contiguous
        else:
            bias_grad.add_(_sum(grad, 0))
    return True


def _linear_dims(weight: Tensor | None, bias: Tensor | None) -> tuple[int, int] | None:
    """(`Direct.rows`, `Direct.columns`) for a linear's parameters: a weight of shape (rows,
    columns) and a bias of (rows,); None where they do not fit together (no direct path)."""
    if weight is not None:
        if weight.dim() != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
            return None
        return weight.shape[0], weight.shape[1]
    if bias is None or bias.dim() != 1:
        return None
    return bias.shape[0], -1


_mm = torch.mm
_sum = torch.sum
# The overload's operator itself: the packet's `__call__` resolves the overload in Python on
# every call, and the overload's `__call__` is one more Python frame around `_op` (0.5 of
# 5.8 µs a call, measured with timeit); where a torch has no `_op`, the overload.
_native_layer_norm_overload = torch.ops.aten.native_layer_norm_backward.default
_native_layer_norm_backward: Callable[..., tuple[Tensor, Tensor, Tensor]] = getattr(
    _native_layer_norm_overload, "_op", _native_layer_norm_overload
)


def _layer_norm_direct(
    direct: Direct,
    weight_slot: Tensor | None,
    bias_slot: Tensor | None,
    node: Node,
    grad: Tensor,
    dtype: torch.dtype,
) -> bool:
    """The layer norm's weight half; `weight_slot` and `bias_slot` are the parameters' `.grad`
    as checked (`accumulate_at`)."""
    saved_input: Tensor = node._saved_input  # type: ignore[attr-defined]
    if type(saved_input) is not Tensor or saved_input.dtype is not dtype:
        return False
    weight, bias = direct.weight, direct.bias
    # The node saved the parameters themselves (a leaf is saved as the tensor, not a copy), so
    # a parameter is what unpacking its slot gives, without the unpack. (The kernel reads only
    # their shapes here: their values enter the input's gradient, which is masked off.)
    _, weight_grad, bias_grad = _native_layer_norm_backward(
        grad,
        saved_input,
        node._saved_normalized_shape,  # type: ignore[attr-defined]
        node._saved_result1,  # type: ignore[attr-defined]
        node._saved_result2,  # type: ignore[attr-defined]
        weight if weight is not None else node._saved_weight,  # type: ignore[attr-defined]
        bias if bias is not None else node._saved_bias,  # type: ignore[attr-defined]
        [False, weight is not None, bias is not None],
    )
    if (weight is not None and weight_grad.dtype is not weight.dtype) or (
        bias is not None and bias_grad.dtype is not bias.dtype
    ):
        return False  # nothing written: autograd's path (which casts as AccumulateGrad would)
    if weight is not None:
        if weight_slot is None:
            weight.grad = direct.weight_slot = _contiguous(weight_grad)
        else:
            weight_slot.add_(weight_grad)
    if bias is not None:
        if bias_slot is None:
            bias.grad = direct.bias_slot = _contiguous(bias_grad)
        else:
            bias_slot.add_(bias_grad)
    return True


def _contiguous(grad: Tensor) -> Tensor:
    return grad if grad.is_contiguous() else grad.contiguous()


def _accumulate(param: Tensor, grad: Tensor) -> None:
    """AccumulateGrad's rule for a plain dense parameter outside autograd."""
    _accumulate_into(param, param.grad, grad)


def _accumulate_into(param: Tensor, slot: Tensor | None, grad: Tensor) -> None:
    """`_accumulate` given `param.grad` (`slot`), read just before."""
    if slot is None:
        param.grad = grad if grad.is_contiguous() else grad.contiguous()
    else:
        slot.add_(grad)


def has_hooks(param: Tensor) -> bool:
    """Hooks on `param`'s gradient accumulation, which only autograd's path runs."""
    return bool(param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None))
