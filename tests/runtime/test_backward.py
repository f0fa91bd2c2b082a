"""The split backward (I then W) and the full backward (B) equal a plain autograd backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import pipefold.runtime.backward as backward_module
import pipefold.runtime.backward_plan as backward_plan
from pipefold.errors import BoundaryMismatch, PipelineError
from pipefold.runtime.backward import GroupCache, backward_full, backward_input, backward_weight

torch.set_num_threads(1)

D = 16


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class PreLNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, num_heads=2, batch_first=True)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MaskedStage(nn.Module):
    """Takes and returns (hidden, mask); the mask needs no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, hidden, mask):
        return torch.tanh(self.proj(hidden)) * mask.unsqueeze(-1), mask


class CheckpointedStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MLPBlock()
        self.out = nn.Linear(D, D)

    def forward(self, x):
        return self.out(checkpoint(self.inner, x, use_reentrant=False))


class TiedStage(nn.Module):
    """One square weight used at two places, with a nonlinearity between them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.tanh(x @ self.weight + self.bias) @ self.weight


def _hidden(batch: int = 3, seq: int = 5) -> Tensor:
    return torch.randn(batch, seq, D)


def _mask(batch: int = 3, seq: int = 5) -> Tensor:
    return (torch.rand(batch, seq) > 0.3).float()


# name -> (module factory, input factory)
STAGES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, ...]]]] = {
    "mlp": (MLPBlock, lambda: (_hidden(),)),
    "pre_ln_transformer": (PreLNBlock, lambda: (_hidden(),)),
    "tuple_hidden_mask": (MaskedStage, lambda: (_hidden(), _mask())),
    "checkpointed": (CheckpointedStage, lambda: (_hidden(),)),
    "tied": (TiedStage, lambda: (_hidden(),)),
}


def _as_tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _stage_inputs(raw: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """What an executor passes: leaves, with a gradient only for floating hidden states."""
    hidden = raw[0].detach().requires_grad_()
    return (hidden, *(t.detach() for t in raw[1:]))


def _output_grads(outputs: tuple[Tensor, ...], seed: int) -> tuple[Tensor | None, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=gen) if o.requires_grad else None for o in outputs)


def _reference(module: nn.Module, raw: tuple[Tensor, ...], seed: int) -> tuple[Tensor, list[Tensor]]:
    """Input gradient and parameter gradients from a plain backward."""
    inputs = _stage_inputs(raw)
    outputs = _as_tuple(module(*inputs))
    params = list(module.parameters())
    grads = _output_grads(outputs, seed)
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
    result = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[0], *params], [g for _, g in pairs], allow_unused=True
    )
    return result[0], [
        g if g is not None else torch.zeros_like(p) for g, p in zip(result[1:], params, strict=True)
    ]


def _param_grads(module: nn.Module) -> list[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.parametrize(
    "split", [True, "autograd-W", False], ids=["I+W", "I+W(autograd)", "B"]
)
@pytest.mark.parametrize("engine", ["direct", "public"])
def test_backward_matches_plain_autograd(name, split, engine, monkeypatch):
    if engine == "public":
        # The path taken where torch lacks the private engine entry (or for tensor subclasses).
        monkeypatch.setattr(backward_module, "_engine_run_backward", None)
    torch.manual_seed(0)
    make_module, make_inputs = STAGES[name]
    module = make_module()
    raw = make_inputs()
    expected_input_grad, expected_param_grads = _reference(module, raw, seed=1)

    inputs = _stage_inputs(raw)
    outputs = _as_tuple(module(*inputs))
    grads = _output_grads(outputs, seed=1)
    if split:
        input_grads, state = backward_input(
            outputs, grads, inputs, list(module.parameters()), direct=split is True
        )
        assert all(p.grad is None for p in module.parameters()), "I must not touch weight gradients"
        backward_weight(state)
        assert state.done
    else:
        input_grads = backward_full(outputs, grads, inputs)

    assert len(input_grads) == len(inputs)
    torch.testing.assert_close(input_grads[0], expected_input_grad)
    assert all(g is None for g in input_grads[1:]), "inputs without requires_grad get None"
    assert inputs[0].grad is None, "the input's own .grad is left untouched"
    for got, want in zip(_param_grads(module), expected_param_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_two_microbatches_accumulate_out_of_order(name):
    """I0 I1 W1 W0 (a zero-bubble order) and B0 B1 both sum the two micro-batches' gradients."""
    torch.manual_seed(0)
    make_module, make_inputs = STAGES[name]
    module = make_module()
    raws = [make_inputs(), make_inputs()]
    references = [_reference(module, raw, seed=10 + mb) for mb, raw in enumerate(raws)]
    expected = [a + b for a, b in zip(references[0][1], references[1][1], strict=True)]

    states = []
    for mb, raw in enumerate(raws):
        inputs = _stage_inputs(raw)
        outputs = _as_tuple(module(*inputs))
        grads = _output_grads(outputs, 10 + mb)
        input_grads, state = backward_input(outputs, grads, inputs, list(module.parameters()))
        torch.testing.assert_close(input_grads[0], references[mb][0])
        states.append(state)
    backward_weight(states[1])
    backward_weight(states[0])
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)

    module.zero_grad(set_to_none=True)
    for mb, raw in enumerate(raws):
        inputs = _stage_inputs(raw)
        outputs = _as_tuple(module(*inputs))
        backward_full(outputs, _output_grads(outputs, 10 + mb), inputs)
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_last_stage_loss_with_none_gradient():
    torch.manual_seed(0)
    module = MLPBlock()
    x = torch.randn(4, D)
    target = torch.randn(4, D)
    reference_input = x.clone().requires_grad_()
    nn.functional.mse_loss(module(reference_input), target).backward()
    expected = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)

    leaf = x.clone().requires_grad_()
    loss = nn.functional.mse_loss(module(leaf), target)
    (input_grad,), state = backward_input((loss,), (None,), (leaf,), list(module.parameters()))
    backward_weight(state)
    torch.testing.assert_close(input_grad, reference_input.grad)
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_first_stage_without_input_gradient_does_all_weight_work_in_w():
    """Stage 0 takes token ids: I has nothing to compute, W still yields every weight gradient."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Embedding(11, D), MLPBlock())
    ids = torch.randint(0, 11, (3, 5))
    grad = torch.randn(3, 5, D)
    module(ids).backward(grad)
    expected = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)

    out = module(ids)
    (input_grad,), state = backward_input((out,), (grad,), (ids,), list(module.parameters()))
    assert input_grad is None
    assert all(p.grad is None for p in module.parameters())
    backward_weight(state)
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_first_stage_w_is_b_with_a_leaf_outside_params():
    """Where no input needs a gradient, W is the stage's whole backward: B's engine call, into
    every leaf of the graph (here a tensor the module holds that is not one of `params`), with
    the same bits as B."""
    torch.manual_seed(0)
    module = MLPBlock()
    scale = torch.randn(D, requires_grad=True)  # a leaf, not a parameter
    x = torch.randn(4, D)
    grad = torch.randn(4, D)
    found = {}
    for split in (False, True):
        module.zero_grad(set_to_none=True)
        scale.grad = None
        out = module(x) * scale
        if split:
            _, state = backward_input((out,), (grad,), (x,), tuple(module.parameters()))
            backward_weight(state)
        else:
            backward_full((out,), (grad,), (x,))
        found[split] = [scale.grad, *(p.grad for p in module.parameters())]
    for got, want in zip(found[True], found[False], strict=True):
        assert got is not None and torch.equal(got, want)


def test_unreached_parameter_keeps_none_grad():
    torch.manual_seed(0)
    module = MLPBlock()
    spare = nn.Parameter(torch.randn(3))
    x = torch.randn(2, D, requires_grad=True)
    out = module(x)
    _, state = backward_input((out,), (torch.ones_like(out),), (x,), [*module.parameters(), spare])
    backward_weight(state)
    assert spare.grad is None
    assert all(p.grad is not None for p in module.parameters())


def _find_node(output: Tensor, type_name: str):
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == type_name:
            return node
        stack.extend(child for child, _ in node.next_functions)
    raise LookupError(type_name)


@pytest.mark.parametrize("direct", [False, True], ids=["autograd", "direct"])
def test_w_does_not_rerun_the_input_path(direct):
    """GeluBackward sits between fc2 and fc1 on the input path only; W must not run it again.

    A W that re-ran the stage's backward from its outputs (or re-derived fc1's output
    gradient) would run it a second time. On autograd's path the weight-only TBackward of
    fc1 runs in W and never in I; the direct path computes fc1's weight gradient from the
    addmm's saved input and runs no autograd node at all.
    """
    torch.manual_seed(0)
    module = MLPBlock()
    x = torch.randn(4, D, requires_grad=True)
    out = module(x)
    counts = {"gelu": 0, "transpose": 0}
    gelu = _find_node(out, "GeluBackward0")
    gelu.register_prehook(lambda grads: counts.__setitem__("gelu", counts["gelu"] + 1))
    # fc1's weight reaches its addmm through a transpose node that only W needs.
    fc1_addmm = gelu.next_functions[0][0]
    transpose = next(
        n for n, _ in fc1_addmm.next_functions if n is not None and "TBackward" in type(n).__name__
    )
    transpose.register_prehook(lambda grads: counts.__setitem__("transpose", counts["transpose"] + 1))

    _, state = backward_input(
        (out,), (torch.randn_like(out),), (x,), list(module.parameters()), direct=direct
    )
    assert counts == {"gelu": 1, "transpose": 0}
    backward_weight(state)
    assert counts == {"gelu": 1, "transpose": 0 if direct else 1}


def test_weight_twice_is_refused():
    module = MLPBlock()
    x = torch.randn(2, D, requires_grad=True)
    out = module(x)
    _, state = backward_input((out,), (torch.ones_like(out),), (x,), list(module.parameters()))
    backward_weight(state)
    with pytest.raises(PipelineError, match="twice"):
        backward_weight(state)


def test_non_leaf_input_is_refused():
    module = MLPBlock()
    x = torch.randn(2, D, requires_grad=True) * 2
    out = module(x)
    with pytest.raises(PipelineError, match=r"inputs\[0\] is not a leaf"):
        backward_input((out,), (torch.ones_like(out),), (x,), list(module.parameters()))
    with pytest.raises(PipelineError, match=r"inputs\[0\] is not a leaf"):
        backward_full((out,), (torch.ones_like(out),), (x,))


def test_gradient_shape_mismatch_is_refused():
    module = MLPBlock()
    x = torch.randn(2, D, requires_grad=True)
    out = module(x)
    with pytest.raises(BoundaryMismatch, match=r"output_grads\[0\] has shape \(3, 16\)"):
        backward_full((out,), (torch.ones(3, D),), (x,))
    with pytest.raises(PipelineError, match="1 outputs but 2 output gradients"):
        backward_full((out,), (torch.ones(2, D), None), (x,))


def test_one_output_and_one_input_take_the_general_rules():
    """`_roots` and `_check_inputs` have a path for one output and one input; it answers as the
    loop over several does (the second output needs no gradient, the second input none)."""
    from pipefold.runtime.sent_outputs import release_sent

    spare = torch.zeros(1)
    x = torch.randn(2, D, requires_grad=True)
    released = x * 3
    assert release_sent((released,))
    cases = [
        (x * 2, torch.ones(2, D)),  # a plain boundary
        ((x * 2).sum(), None),  # a loss: seeded with ones
        (x * 2, None),  # an output the next stage did not use
        (torch.randn(2, D), torch.ones(2, D)),  # an output without a graph
        (released, torch.ones(2, D)),  # a sent output: its kept shape
    ]
    for output, grad in cases:
        one = backward_module._roots((output,), (grad,))
        many = backward_module._roots((output, spare), (grad, None))
        assert [r is output for r in one[0]] == [r is output for r in many[0]] == [True] * len(one[0])
        assert len(one[1]) == len(many[1])
        assert all(torch.equal(a, b) for a, b in zip(one[1], many[1], strict=True))
    mismatch = r"output_grads\[0\] has shape \(3, 16\) but output 0 has shape \(2, 16\)"
    with pytest.raises(BoundaryMismatch, match=mismatch):
        backward_module._roots((released,), (torch.ones(3, D),))
    for leaf in (x, torch.randn(2, D), x * 2):
        try:
            many: object = backward_module._check_inputs((leaf, spare))
        except PipelineError as error:
            many = str(error)
        try:
            one: object = backward_module._check_inputs((leaf,))
        except PipelineError as error:
            one = str(error)
        assert one == many


def test_b_leaves_the_inputs_grad_as_it_was():
    """B lends a stage input an empty `.grad` and hands back what it had, also when the engine
    fails; one input (its own path) and with a second input beside it alike."""
    torch.manual_seed(0)
    module = MLPBlock()
    spare = torch.zeros(1)
    for inputs_of in (lambda leaf: (leaf,), lambda leaf: (leaf, spare)):
        leaf = torch.randn(2, D, requires_grad=True)
        before = torch.full((2, D), 7.0)
        leaf.grad = before
        out = module(leaf)
        grad = torch.randn(2, D)
        (got, *_) = backward_full((out,), (grad,), inputs_of(leaf))
        assert leaf.grad is before and torch.equal(before, torch.full((2, D), 7.0))
        other = leaf.detach().requires_grad_()
        (want,) = torch.autograd.grad(module(other), other, grad)
        torch.testing.assert_close(got, want)
        with pytest.raises(RuntimeError):  # the graph was freed by the first call
            backward_full((out,), (grad,), inputs_of(leaf))
        assert leaf.grad is before


@pytest.mark.skipif(
    not hasattr(torch.utils.checkpoint, "GraphExecGroup"), reason="torch without GraphExecGroup"
)
def test_checkpointed_region_is_recomputed_once_in_w():
    """The checkpointed MLP holds two parameter groups; W recomputes it once, not per group."""
    torch.manual_seed(0)
    module = CheckpointedStage()
    calls = []
    module.inner.register_forward_pre_hook(lambda mod, args: calls.append(1))
    x = torch.randn(3, 5, D, requires_grad=True)
    out = module(x)
    assert len(calls) == 1
    _, state = backward_input((out,), (torch.randn_like(out),), (x,), list(module.parameters()))
    assert len(calls) == 2  # I recomputes the region
    assert state.num_groups == 3  # fc1, fc2 inside the region, out outside
    backward_weight(state)
    assert len(calls) == 3


@pytest.mark.skipif(
    not hasattr(torch.utils.checkpoint, "GraphExecGroup"), reason="torch without GraphExecGroup"
)
def test_w_leaves_no_exec_group_behind_and_refuses_to_nest():
    """W enters its GraphExecGroup without the context manager: it clears it after the groups
    ran, and inside another group it raises as the context manager does, before any group."""
    torch.manual_seed(0)
    module = CheckpointedStage()
    params = list(module.parameters())
    x = torch.randn(3, 5, D, requires_grad=True)
    out = module(x)
    _, state = backward_input((out,), (torch.randn_like(out),), (x,), params)
    backward_weight(state)
    assert torch._C._get_graph_exec_group() is None
    out = module(x)
    _, state = backward_input((out,), (torch.randn_like(out),), (x,), params)
    before = [p.grad.clone() for p in params]
    with torch.utils.checkpoint.GraphExecGroup():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            backward_weight(state)
    assert torch._C._get_graph_exec_group() is None
    for param, grad in zip(params, before, strict=True):
        assert torch.equal(param.grad, grad)


# -- direct weight gradients ([Note: direct weight gradients] in backward.py) ---------------


class LinearZoo(nn.Module):
    """Every layer shape the direct path knows: linear with and without bias on 2-D and
    3-D inputs, layer norm with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D, bias=False)
        self.ln_no_bias = nn.LayerNorm(D, bias=False)
        self.flat = nn.Linear(D, D)
        self.flat_no_bias = nn.Linear(D, D, bias=False)

    def forward(self, x):
        h = x + self.fc2(torch.tanh(self.fc1(self.ln(x))))
        h = self.ln_no_bias(h)
        flat = h.reshape(-1, D)
        return x + (self.flat(flat) + self.flat_no_bias(torch.sin(flat))).reshape(x.shape)


def _engine_calls(monkeypatch) -> list[int]:
    # Every engine call goes through the entry point (`_run_engine` and the inlined common
    # paths of `B` and `I` alike), so count there.
    calls: list[int] = []
    real = backward_module._engine_run_backward
    assert real is not None

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_module, "_engine_run_backward", counted)
    return calls


def test_direct_w_equals_autograd_and_skips_the_engine(monkeypatch):
    torch.manual_seed(0)
    module = LinearZoo()
    x = torch.randn(3, 5, D)
    references = [_reference(module, (x,), seed=20 + mb) for mb in range(3)]
    expected = [sum(r[1][i] for r in references) for i in range(len(references[0][1]))]
    calls = _engine_calls(monkeypatch)
    states = []
    for mb in range(3):
        inputs = _stage_inputs((x,))
        outputs = _as_tuple(module(*inputs))
        _, state = backward_input(outputs, _output_grads(outputs, 20 + mb), inputs, list(module.parameters()))
        states.append(state)
    assert len(calls) == 3  # the three I calls
    assert all(state.num_groups == 6 for state in states)
    # Out of order, so the second and third W accumulate into existing gradients.
    for state in (states[2], states[0], states[1]):
        backward_weight(state)
    assert len(calls) == 3, "W ran autograd although every group has a direct form"
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_direct_w_leaves_hooked_parameters_to_autograd(monkeypatch):
    """A hook on a parameter must see its gradient: that group takes autograd's path."""
    torch.manual_seed(0)
    module = MLPBlock()
    x = torch.randn(4, D)
    _, expected = _reference(module, (x,), seed=3)
    seen = []
    module.fc1.weight.register_hook(lambda grad: seen.append(grad.clone()) or grad * 2)
    calls = _engine_calls(monkeypatch)
    inputs = _stage_inputs((x,))
    outputs = _as_tuple(module(*inputs))
    _, state = backward_input(outputs, _output_grads(outputs, 3), inputs, list(module.parameters()))
    backward_weight(state)
    assert len(calls) == 2  # I, and W for fc1 only (fc1's bias shares its group)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected[0])
    torch.testing.assert_close(module.fc1.weight.grad, 2 * expected[0])
    for got, want in zip(_param_grads(module)[1:], expected[1:], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_direct_w_falls_back_when_the_gradient_slot_is_unusual(monkeypatch):
    """A transposed (non-contiguous) existing .grad: autograd's path accumulates into it."""
    torch.manual_seed(0)
    module = MLPBlock()
    x = torch.randn(4, D)
    _, expected = _reference(module, (x,), seed=4)
    module.fc2.weight.grad = torch.zeros(2 * D, D).t()
    calls = _engine_calls(monkeypatch)
    inputs = _stage_inputs((x,))
    outputs = _as_tuple(module(*inputs))
    _, state = backward_input(outputs, _output_grads(outputs, 4), inputs, list(module.parameters()))
    backward_weight(state)
    assert len(calls) == 2  # I, and W for fc2's group
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def _split_once(
    module: nn.Module, params: tuple[Tensor, ...], cache: GroupCache, x: Tensor, seed: int
) -> None:
    inputs = _stage_inputs((x,))
    outputs = _as_tuple(module(*inputs))
    _, state = backward_input(outputs, _output_grads(outputs, seed), inputs, params, cache=cache)
    backward_weight(state)


def _summed_references(module: nn.Module, x: Tensor, seeds: range) -> list[Tensor]:
    references = [_reference(module, (x,), seed=seed)[1] for seed in seeds]
    return [sum(r[i] for r in references) for i in range(len(references[0]))]  # type: ignore[misc]


def _memo_case(monkeypatch, seeds):
    """An MLP block, its parameters, a fresh `GroupCache`, an input, the gradients summed over
    one-process references at `seeds`, and the engine calls list the memo tests count."""
    torch.manual_seed(0)
    module = MLPBlock()
    x = torch.randn(4, D)
    expected = _summed_references(module, x, seeds)
    return module, tuple(module.parameters()), GroupCache(), x, expected, _engine_calls(monkeypatch)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_the_readiness_memo_sees_a_replaced_gradient_and_a_new_hook(monkeypatch):
    """Between two `GroupCache.reset`s a direct group checks its parameters in full once, and
    then only what user code may change at any time: `.grad` being the tensor it checked or
    wrote (here replaced by a transposed one, which only autograd's path accumulates into), and
    the hooks (here one registered after the check)."""
    module, params, cache, x, expected, calls = _memo_case(monkeypatch, range(40, 43))
    _split_once(module, params, cache, x, 40)
    assert len(calls) == 1  # I; W's two groups are direct
    weight = module.fc2.weight
    assert weight.grad is not None
    weight.grad = weight.grad.t().contiguous().t()  # the same values, transposed
    _split_once(module, params, cache, x, 41)
    assert len(calls) == 3  # I, and W for fc2's group: the new `.grad` was checked
    seen: list[Tensor] = []
    module.fc1.bias.register_hook(lambda grad: seen.append(grad) or grad)
    _split_once(module, params, cache, x, 42)
    assert len(seen) == 1, "W's direct path skipped a hook registered after its check"
    assert len(calls) == 6  # I, fc2's group (still transposed), fc1's group (hooked)
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_a_reset_ends_the_readiness_memo(monkeypatch):
    """What no `.grad` identity or version counter shows (a parameter's data swapped, as a
    weight stash's step or `module.to()` does) is remembered until `GroupCache.reset`, which the
    executor calls at each step's start and after STEP and sharding actions; after it, W checks
    the parameters in full again."""
    module, params, cache, x, expected, calls = _memo_case(monkeypatch, range(50, 53))
    _split_once(module, params, cache, x, 50)
    weight = module.fc2.weight
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()  # the same values, transposed: not W's to compute
    _split_once(module, params, cache, x, 51)
    assert len(calls) == 2  # I and I: within one stretch the memo stands
    cache.reset()
    _split_once(module, params, cache, x, 52)
    assert len(calls) == 4, "after reset, W did not check the swapped parameter again"  # I, fc2's group
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


class _Branching(nn.Module):
    """Two graph shapes over the same parameters, picked by `wide` (as data-dependent control
    flow would): the split backward's plan, cached per shape, must follow the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)
        self.wide = False

    def forward(self, x):
        h = self.fc1(self.norm(x))
        return x + (self.fc2(torch.relu(h)) if self.wide else h)


@pytest.mark.parametrize("cached", [False, True])
def test_split_plan_is_cached_per_graph_shape(monkeypatch, cached):
    torch.manual_seed(0)
    cache = GroupCache() if cached else None
    module = _Branching()
    x = torch.randn(4, D)
    monkeypatch.setattr(backward_plan, "_plan_shapes", {})
    widths = [False, True, False, True, False]
    expected = None
    for mb, wide in enumerate(widths):
        module.wide = wide
        _, grads = _reference(module, (x,), seed=30 + mb)
        expected = grads if expected is None else [e + g for e, g in zip(expected, grads, strict=True)]
    module.zero_grad(set_to_none=True)
    input_grads = []
    params = tuple(module.parameters())  # one tuple, as a stage's: the cache's entries hit
    for mb, wide in enumerate(widths):
        module.wide = wide
        inputs = _stage_inputs((x,))
        outputs = _as_tuple(module(*inputs))
        got, state = backward_input(
            outputs, _output_grads(outputs, 30 + mb), inputs, params, cache=cache
        )
        backward_weight(state)
        input_grads.append(got[0])
        torch.testing.assert_close(got[0], _reference(module, (x,), seed=30 + mb)[0])
    assert len(backward_plan._plan_shapes) == 2  # one plan per shape, reused
    for got_grad, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got_grad, want)


def test_graph_key_is_the_same_with_and_without_known_parameter_leaves():
    """A stage's cache knows its parameters' AccumulateGrad nodes after the first walk; the key
    a later walk builds with them equals the one built without, and follows the graph's shape."""
    torch.manual_seed(0)
    module = _Branching()
    params = tuple(module.parameters())
    leaves = GroupCache().leaves(params)
    assert leaves is not None and GroupCache().leaves(list(params)) is None  # tuples only
    keys = {}
    for mb, wide in enumerate([False, True, False, True]):
        module.wide = wide
        (leaf,) = _stage_inputs((torch.randn(4, D),))
        out = module(leaf)
        plain, _, _ = backward_plan.graph_shape([out], [leaf], params)
        known, nodes, _ = backward_plan.graph_shape([out], [leaf], params, leaves)
        assert known == plain
        assert not any(
            type(node).__name__ == "AccumulateGrad" and node.variable is not leaf for node in nodes
        )
        if mb >= 2:
            assert keys[wide] == known
        keys[wide] = known
    assert keys[False] != keys[True]
    assert len(leaves.nodes) == len(params)


@pytest.mark.parametrize("cached", [False, True])
def test_hook_added_after_the_plan_is_cached_takes_autograds_path(monkeypatch, cached):
    """Hooks are checked per call, not cached with the graph's shape (nor in a group cache)."""
    torch.manual_seed(0)
    cache = GroupCache() if cached else None
    module = MLPBlock()
    x = torch.randn(4, D)
    params = list(module.parameters())
    inputs = _stage_inputs((x,))
    outputs = _as_tuple(module(*inputs))
    _, state = backward_input(outputs, _output_grads(outputs, 5), inputs, params, cache=cache)
    backward_weight(state)  # the shape's plan is cached now, fc1 direct
    module.zero_grad(set_to_none=True)
    _, expected = _reference(module, (x,), seed=6)
    seen = []
    module.fc1.weight.register_hook(lambda grad: seen.append(grad.clone()) or grad)
    calls = _engine_calls(monkeypatch)
    inputs = _stage_inputs((x,))
    outputs = _as_tuple(module(*inputs))
    _, state = backward_input(outputs, _output_grads(outputs, 6), inputs, params, cache=cache)
    backward_weight(state)
    assert len(calls) == 2 and len(seen) == 1  # I, and W through autograd for fc1's group
    torch.testing.assert_close(seen[0], expected[0])
    for got, want in zip(_param_grads(module), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_one_group_cache_serves_stages_of_one_shape_with_their_own_parameters():
    """Two stages whose graphs have the same shape share the plan; a cache given both keeps
    each one's parameters apart (and a new parameter tuple is prepared anew)."""
    torch.manual_seed(0)
    stages = [MLPBlock(), MLPBlock()]
    x = torch.randn(4, D)
    seeds = (40, 50, 60)
    expected = []
    for index, stage in enumerate(stages):
        per_seed = [_reference(stage, (x,), seed=seed + index)[1] for seed in seeds]
        expected.append([sum(grads[1:], grads[0]) for grads in zip(*per_seed, strict=True)])
    cache = GroupCache()
    kept = [tuple(stage.parameters()) for stage in stages]
    for round_, seed in enumerate(seeds):
        for index, stage in enumerate(stages):
            # The stages' own tuples, then tuples made anew: never another stage's entry.
            params = kept[index] if round_ < 2 else tuple(stage.parameters())
            inputs = _stage_inputs((x,))
            outputs = _as_tuple(stage(*inputs))
            grads = _output_grads(outputs, seed + index)
            got, state = backward_input(outputs, grads, inputs, params, cache=cache)
            backward_weight(state)
            torch.testing.assert_close(got[0], _reference(stage, (x,), seed=seed + index)[0])
    for stage, want in zip(stages, expected, strict=True):
        for got_grad, want_grad in zip(_param_grads(stage), want, strict=True):
            torch.testing.assert_close(got_grad, want_grad)


def test_root_edge_is_get_gradient_edge():
    """`root_edge` builds the edge itself only for a built-in node; a custom Function's node
    (whose edge carries an ownership token) and a leaf's accumulator come from torch."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    leaf = torch.randn(3, requires_grad=True)
    for tensor in (leaf * 3, Double.apply(leaf), leaf):
        edge, want = backward_plan.root_edge(tensor), torch.autograd.graph.get_gradient_edge(tensor)
        assert (edge.node, edge.output_nr) == (want.node, want.output_nr)
        assert (edge.ownership_token is None) == (want.ownership_token is None)


def test_group_cache_follows_the_shape_after_its_last_one(monkeypatch):
    """A stage's cache answers a repeated key from its last lookup and a new key from the
    shared plans, never the last plan for another key."""
    monkeypatch.setattr(backward_plan, "_plan_shapes", {})
    module = _Branching()
    params = tuple(module.parameters())
    cache = GroupCache()
    found = {}
    for wide in (False, False, True, True, False):
        module.wide = wide
        (leaf,) = _stage_inputs((torch.randn(4, D),))
        out = module(leaf)
        key, nodes, edges = backward_plan.graph_shape([out], [leaf], params, cache.leaves(params))
        shape = cache.shape(key)
        if shape is None:
            grads = [torch.randn(out.shape)]
            shape = backward_plan.plan_shape(key, nodes, edges, [out], grads, [leaf], params)
        assert found.setdefault(wide, shape) is shape
        assert cache.shape(key) is shape
    assert found[False] is not found[True]


class _AutocastStage(nn.Module):
    """A layer norm, a linear with a bias and one without (a tied head's `mm`), run under CPU
    autocast in bf16 as a mixed-precision stage runs: the linears see 16-bit casts of their fp32
    weights (`ToCopyBackward0` between the product and the weight), the layer norm a 16-bit
    input with its fp32 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 2 * D)
        self.head = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.head(torch.relu(self.fc(self.norm(x))))


def test_direct_w_under_autocast_equals_b_bit_for_bit_without_the_engine(monkeypatch):
    """W computes autocast's linears and layer norms itself: the product in bf16, cast and
    accumulated into the fp32 gradients as autograd's cast node and AccumulateGrad do."""
    torch.manual_seed(0)
    module = _AutocastStage()
    xs = [torch.randn(3, 5, D).to(torch.bfloat16) for _ in range(3)]
    params = list(module.parameters())

    def run(split: bool) -> list[Tensor]:
        for param in params:
            param.grad = None
        states = []
        for mb, x in enumerate(xs):
            inputs = _stage_inputs((x,))
            outputs = _as_tuple(module(*inputs))
            grads = tuple(g.to(torch.bfloat16) for g in _output_grads(outputs, 30 + mb) if g is not None)
            if split:
                states.append(backward_input(outputs, grads, inputs, params)[1])
            else:
                backward_full(outputs, grads, inputs)
        calls = _engine_calls(monkeypatch)
        for state in states:  # in B's order, so the sums' order is B's too
            backward_weight(state)
        assert not calls, "W ran autograd although every group has a direct form under autocast"
        return [p.grad.clone() for p in params]  # type: ignore[union-attr]

    split = run(True)
    monkeypatch.undo()
    whole = run(False)
    assert all(p.dtype == torch.float32 for p in split)
    for got, want in zip(split, whole, strict=True):
        assert torch.equal(got, want)
