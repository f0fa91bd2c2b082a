"""torch.compile per layer (`RuntimeOptions(compile=True)`) in one process: two stages on one
rank run the split-backward V schedules (zb-v, dualpipe-v) with every layer compiled, and the
loss and every gradient equal the eager pipeline's; the split backward keeps `I` and `W` apart
on compiled layers without running a compiled backward twice; the refusals.

Compilation is slow (seconds per distinct layer), so the models are tiny and the cases few."""

from __future__ import annotations

import pytest
import torch
from _cases import _batch, _loss_fn, transformer
from torch import nn

from pipefold.errors import ConfigError
from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions, executor
from pipefold.runtime.backward import backward_input, backward_weight


def _step(schedule: str, compiled: bool, kind: str = "transformer"):
    pipe = Pipeline(
        transformer(6), loss_fn=_loss_fn(kind), schedule=schedule, num_microbatches=2, num_virtual=2,
        layout=LayoutOptions(seed=3), runtime=RuntimeOptions(compile=compiled, fuse_backward=False),
    )
    inputs, targets = _batch(kind, 4, seed=1)
    losses = [pipe.step(inputs, targets) for _ in range(2)]  # twice: the second reuses the graphs
    return pipe, losses, {name: p.grad.clone() for name, p in pipe.named_parameters()}


@pytest.mark.parametrize("schedule", ["zb-v", "dualpipe-v"])
def test_compiled_split_backward_schedules_equal_eager(schedule, monkeypatch):
    eager, eager_losses, eager_grads = _step(schedule, compiled=False)
    kinds = []

    def recording(*args, **kwargs):
        grads, state = backward_input(*args, **kwargs)
        # Groups reached through the stage input (a frontier node): each is one compiled layer.
        kinds.extend(
            group.direct.kind if group.direct else None for group in state._groups if group.frontiers
        )
        return grads, state

    monkeypatch.setattr(executor, "backward_input", recording)
    pipe, losses, grads = _step(schedule, compiled=True)
    ops = {action.op.value for row in pipe.schedule.actions for action in row}
    assert {"I", "W"} <= ops, ops  # the split backward really runs (not fused into B)
    torch.testing.assert_close(losses, eager_losses)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], msg=name)
    # The layers ran compiled, and each I kept its compiled layers' weight gradients for W. (The
    # first stage's input, token ids, takes no gradient: its groups are seeded from the outputs;
    # dualpipe-v on one rank splits only that stage's backward, zb-v the second stage's too.)
    assert all(kind == "compiled" for kind in kinds), kinds
    assert kinds or schedule == "dualpipe-v"


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 6)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.norm(self.a(x))))


def test_split_backward_of_compiled_layers_runs_each_compiled_backward_once():
    """`I` gets the input gradient from the compiled graph, keeps the weight gradients it
    returns, and `W` accumulates them without running the graph again."""
    torch.manual_seed(0)
    layers, reference = [_Layer(), _Layer()], [_Layer(), _Layer()]
    for layer, copy in zip(layers, reference, strict=True):
        copy.load_state_dict(layer.state_dict())
    compiled = [torch.compile(layer) for layer in layers]
    inputs = torch.randn(4, 6, requires_grad=True)
    output = compiled[1](compiled[0](inputs))
    grad = torch.randn_like(output)
    params = [p for layer in layers for p in layer.parameters()]
    (input_grad,), state = backward_input((output,), (grad,), (inputs,), params)
    assert all(p.grad is None for p in params)
    assert [group.direct.kind if group.direct else None for group in state._groups] == ["compiled"] * 2
    runs = []
    for group in state._groups:
        group.frontiers[0].node.register_prehook(lambda grads: runs.append(1))
    backward_weight(state)
    assert not runs  # W ran no compiled backward
    plain_inputs = inputs.detach().requires_grad_()
    reference[1](reference[0](plain_inputs)).backward(grad)
    torch.testing.assert_close(input_grad, plain_inputs.grad)
    for param, want in zip(params, [p for layer in reference for p in layer.parameters()], strict=True):
        torch.testing.assert_close(param.grad, want.grad)


def test_compile_must_be_a_bool():
    with pytest.raises(ConfigError, match="compile = 'yes'"):
        RuntimeOptions(compile="yes")  # type: ignore[arg-type]


def test_compile_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ConfigError, match="no-such-compiler"):
        Pipeline(
            transformer(4), loss_fn=_loss_fn("transformer"), schedule="1f1b", num_microbatches=2,
            runtime=RuntimeOptions(compile=True),
        )
