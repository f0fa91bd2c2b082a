"""Weight stashing: every STEP applies the gradients computed on the weights each forward saw.

Each test emulates one stage of an asynchronous schedule in a single process: the
stage's actions run in the order drawn below, and an independent reference keeps its
own copy of every weight version and differentiates with torch.autograd.grad.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from pipefold.errors import ConfigError, PipelineError
from pipefold.runtime.backward import backward_full, backward_input, backward_weight
from pipefold.runtime.stash import WeightStash

torch.set_num_threads(1)

LR = 0.1

# PipeDream on a stage with 2 micro-batches in flight (the last of 2 stages would have 1):
# STEP follows every backward, so a backward may run on weights two steps old.
PIPEDREAM_2_IN_FLIGHT = "F0 F1 B0 STEP F2 B1 STEP F3 B2 STEP F4 B3 STEP B4 STEP"
# PipeDream, first of 4 stages: 4 micro-batches in flight, up to 4 versions.
PIPEDREAM_4_IN_FLIGHT = (
    "F0 F1 F2 F3 B0 STEP F4 B1 STEP F5 B2 STEP F6 B3 STEP F7 B4 STEP B5 STEP B6 STEP B7 STEP"
)
# PipeDream-2BW, 2 in flight, one STEP per 2 micro-batches: never more than 2 versions.
DOUBLE_BUFFER = "F0 F1 B0 F2 B1 STEP F3 B2 F4 B3 STEP F5 B4 F6 B5 STEP F7 B6 B7 STEP"
# The same with the backward split and W deferred past the next forward (zero-bubble style).
DOUBLE_BUFFER_SPLIT = "F0 F1 I0 F2 W0 I1 W1 STEP F3 I2 F4 W2 I3 W3 STEP F5 I4 W4 I5 W5 STEP"


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(num_microbatches: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(num_microbatches)
    ]


def _loss(output: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(output, target)


def _reference_grads(
    module: nn.Module, weights: dict[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    leaves = {name: w.clone().requires_grad_() for name, w in weights.items()}
    loss = _loss(torch.func.functional_call(module, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def _run(pattern: str, split_input: bool = True, recompute: bool = False):
    """Run the pattern through a WeightStash and check every STEP against the reference.

    `split_input`: the stage input requires grad (a middle stage) rather than not.
    Returns the stash.
    """
    torch.manual_seed(0)
    module = Stage()
    reference_module = Stage()  # only its structure is used, with explicit weights
    stash = WeightStash(module, lambda params: torch.optim.SGD(params, lr=LR))
    names = [name for name, _ in module.named_parameters()]
    actions = pattern.split()
    num_microbatches = 1 + max(int(a[1:]) for a in actions if a != "STEP")
    data = _data(num_microbatches)

    versions = [{name: p.detach().clone() for name, p in module.named_parameters()}]
    version_seen: dict[int, int] = {}
    pending: dict[int, tuple] = {}  # micro-batch -> (outputs, inputs) until its backward
    states = {}
    expected_since_step = {name: torch.zeros_like(w) for name, w in versions[0].items()}

    def finish(mb: int) -> None:
        stash.after_backward(mb)
        x, y = data[mb]
        grads = _reference_grads(reference_module, versions[version_seen[mb]], x, y)
        for name in names:
            expected_since_step[name] += grads[name]

    for action in actions:
        if action == "STEP":
            applied = {
                name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for name, p in module.named_parameters()
            }
            for name in names:
                torch.testing.assert_close(applied[name], expected_since_step[name])
            stash.step()
            new = {name: versions[-1][name] - LR * applied[name] for name in names}
            for name, p in module.named_parameters():
                torch.testing.assert_close(p.detach(), new[name])
                assert p.grad is None
            versions.append(new)
            for name in names:
                expected_since_step[name].zero_()
            continue
        op, mb = action[0], int(action[1:])
        x, y = data[mb]
        if op == "F":
            leaf = x.clone().requires_grad_(split_input)
            out = stash.forward(mb, leaf, recompute=recompute)
            version_seen[mb] = len(versions) - 1
            assert stash.version_of(mb) == version_seen[mb]
            pending[mb] = ((_loss(out, y),), (leaf,))
        elif op == "B":
            outputs, inputs = pending.pop(mb)
            backward_full(outputs, (None,), inputs)
            finish(mb)
        elif op == "I":
            outputs, inputs = pending.pop(mb)
            _, states[mb] = backward_input(outputs, (None,), inputs, stash.params_for(mb))
        elif op == "W":
            backward_weight(states.pop(mb))
            finish(mb)
        else:
            raise ValueError(action)
    assert stash.num_versions_held == 0
    return stash


@pytest.mark.parametrize(
    ("pattern", "peak"),
    [
        (PIPEDREAM_2_IN_FLIGHT, 2),
        (PIPEDREAM_4_IN_FLIGHT, 4),
        (DOUBLE_BUFFER, 2),
        (DOUBLE_BUFFER_SPLIT, 2),
    ],
    ids=["pipedream-2", "pipedream-4", "2bw", "2bw-split"],
)
@pytest.mark.parametrize("split_input", [True, False], ids=["middle-stage", "first-stage"])
def test_steps_apply_gradients_of_the_weights_each_forward_saw(pattern, peak, split_input):
    stash = _run(pattern, split_input)
    assert stash.peak_versions_held == peak
    assert stash.version == pattern.split().count("STEP")


@pytest.mark.parametrize(
    "pattern",
    [PIPEDREAM_4_IN_FLIGHT, DOUBLE_BUFFER, DOUBLE_BUFFER_SPLIT],
    ids=["pipedream-4", "2bw", "2bw-split"],
)
def test_full_recomputation_runs_again_on_the_stashed_version(pattern):
    """The recomputed forward sees the version its forward saw, not the live weights."""
    _run(pattern, recompute=True)


@st.composite
def _patterns(draw: st.DrawFn) -> tuple[str, int]:
    """Any order a stage could see: forwards in order, backwards of in-flight micro-batches
    in any order (B, or I then W later), STEPs anywhere. Returns (pattern, max in flight)."""
    num_microbatches = draw(st.integers(1, 5))
    actions: list[str] = []
    next_forward, in_flight, awaiting_w, peak = 0, [], [], 0
    while next_forward < num_microbatches or in_flight or awaiting_w:
        choices = []
        if next_forward < num_microbatches:
            choices.append(f"F{next_forward}")
        choices += [f"B{mb}" for mb in in_flight] + [f"I{mb}" for mb in in_flight]
        choices += [f"W{mb}" for mb in awaiting_w]
        if actions and actions[-1] != "STEP":
            choices.append("STEP")  # last, so that shrinking removes steps first
        action = draw(st.sampled_from(choices))
        actions.append(action)
        op, mb = action[0], int(action[1:]) if action != "STEP" else -1
        if op == "F":
            next_forward += 1
            in_flight.append(mb)
        elif op in "BI":
            in_flight.remove(mb)
            if op == "I":
                awaiting_w.append(mb)
        elif op == "W":
            awaiting_w.remove(mb)
        peak = max(peak, len(in_flight) + len(awaiting_w))
    actions.append("STEP")
    return " ".join(actions), peak


@settings(max_examples=25, deadline=None)
@given(_patterns())
def test_any_order_of_forwards_backwards_and_steps(pattern_and_peak):
    pattern, max_in_flight = pattern_and_peak
    stash = _run(pattern)
    assert 1 <= stash.peak_versions_held <= max_in_flight


def test_current_version_shares_storage_until_a_step():
    """Holding n versions costs n - 1 copies: the current one is the live weights."""
    module = Stage()
    stash = WeightStash(module, lambda params: torch.optim.SGD(params, lr=LR))
    storage = module.fc1.weight.data_ptr()
    out = stash.forward(0, torch.randn(2, 4))
    assert module.fc1.weight.data_ptr() == storage
    backward_full((out.sum(),), (None,), ())
    stash.step()
    # micro-batch 0 is still in flight on version 0: the live weights moved to a new buffer.
    assert module.fc1.weight.data_ptr() != storage
    stash.after_backward(0)
    assert stash.num_versions_held == 0


def test_momentum_state_follows_the_live_parameters():
    """Moving the live weights to a new buffer keeps the optimizer's per-parameter state."""
    torch.manual_seed(0)
    module = Stage()
    plain = Stage()
    plain.load_state_dict(module.state_dict())
    stash = WeightStash(module, lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9))
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)
    for mb, (x, y) in enumerate(_data(3)):
        # One micro-batch in flight at a time: stashing then equals plain training.
        backward_full((_loss(stash.forward(mb, x), y),), (None,), ())
        stash.after_backward(mb)
        stash.step()
        _loss(plain(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for got, want in zip(module.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_misuse_is_refused():
    stash = WeightStash(Stage(), lambda params: torch.optim.SGD(params, lr=LR))
    stash.forward(3, torch.randn(2, 4))
    with pytest.raises(PipelineError, match="micro-batch 3 already ran its forward"):
        stash.forward(3, torch.randn(2, 4))
    with pytest.raises(PipelineError, match=r"micro-batch 4 has no forward in flight.*in flight: \[3\]"):
        stash.after_backward(4)
    with pytest.raises(PipelineError, match="micro-batch 5 has no forward in flight"):
        stash.params_for(5)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter that requires grad"):
        WeightStash(frozen, lambda params: torch.optim.SGD(params, lr=LR))
