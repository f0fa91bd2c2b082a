"""torch.compile per layer (`RuntimeOptions(compile=True)`) in one process: the split backward
keeps `I` and `W` apart on compiled layers without running a compiled backward twice; the
refusals. The V schedules with compiled layers across ranks: tests/runtime/test_compile_ranks.py.

Compilation is slow (seconds per distinct layer), so the models are tiny and the cases few."""

from __future__ import annotations

import pytest
import torch
from _cases import _loss_fn, transformer
from torch import nn

from pipefold.errors import ConfigError
from pipefold.runtime import Pipeline, RuntimeOptions
from pipefold.runtime.backward import backward_input, backward_weight


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
    assert [group.direct.kind if group.direct else None for group in state.groups] == ["compiled"] * 2
    runs = []
    for group in state.groups:
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
