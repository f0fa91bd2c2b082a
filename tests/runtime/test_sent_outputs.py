"""Freeing a stage's sent output (pipefold.runtime.sent_outputs), on one process: the storage goes,
the backward from the emptied output gives the same gradients, and what must keep its data does."""

import pytest
import torch
from torch import nn

from pipefold.errors import BoundaryMismatch
from pipefold.runtime.backward import GroupCache, backward_full, backward_input, backward_weight
from pipefold.runtime.sent_outputs import output_shape, release_sent


def _stage(last: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), last)


@pytest.mark.parametrize("last", [nn.Identity(), nn.Tanh(), nn.ReLU(), nn.Softmax(-1)],
                         ids=["linear", "tanh", "relu", "softmax"])
@pytest.mark.parametrize("split", [False, True])
def test_a_released_output_backpropagates_as_before(last, split):
    # tanh, relu and softmax save their own result for the backward: it must stay theirs.
    stage = _stage(last)
    params = tuple(stage.parameters())
    grad = torch.randn(4, 16)
    x = torch.randn(4, 16)

    def run(release: bool):
        for param in params:
            param.grad = None
        leaf = x.clone().requires_grad_()
        out = stage(leaf)
        if release:
            assert release_sent((out,))
            assert out.untyped_storage().nbytes() == 0 and output_shape(out) == (4, 16)
        if split:
            (input_grad,), state = backward_input((out,), (grad,), (leaf,), params, cache=GroupCache())
            backward_weight(state)
        else:
            (input_grad,) = backward_full((out,), (grad,), (leaf,))
        return input_grad, [param.grad.clone() for param in params]

    (kept_input, kept_params), (freed_input, freed_params) = run(False), run(True)
    assert torch.equal(kept_input, freed_input)
    for kept, freed in zip(kept_params, freed_params, strict=True):
        assert torch.equal(kept, freed)


def test_what_must_keep_its_data_is_not_released():
    x = torch.randn(4, 16, requires_grad=True)
    h = x * 2
    # Several outputs (one may be an input another op saved), a view, a leaf, no graph.
    assert not release_sent((h, h.sin()))
    assert not release_sent((h[1:],))
    assert not release_sent((x,))
    assert not release_sent((torch.randn(3),))
    assert h.untyped_storage().nbytes() == 4 * 16 * 4
    # Twice: the shape of the first release stays.
    assert release_sent((h,)) and not release_sent((h,))
    assert output_shape(h) == (4, 16)


def test_a_wrong_gradient_for_a_released_output_names_its_shape():
    x = torch.randn(4, 16, requires_grad=True)
    out = (x * 2).relu()
    assert release_sent((out,))
    with pytest.raises(BoundaryMismatch, match=r"output 0 has shape \(4, 16\)"):
        backward_full((out,), (torch.randn(4, 8),), ())
