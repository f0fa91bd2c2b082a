"""`profile` measures a layer's backward temporaries from the allocator: the gradient handed to it,
the input gradient it hands on and its new weight and bias gradients, beyond what it saved."""

import torch
from torch import nn

from pipefold.runtime import profile


def test_a_linear_layers_backward_holds_its_gradients_at_once() -> None:
    for rows, width in ((4, 16), (8, 32)):
        measured = profile(nn.Sequential(nn.Linear(width, width), nn.Linear(width, width)),
                           torch.randn(rows, width), num_repeats=1)
        # Handed (rows x width), handed on (rows x width), a new weight (width^2) and bias gradient.
        expected = 4 * (2 * rows * width + width * width + width)
        assert [p.backward_temporary_bytes for p in measured] == [expected, expected]
        assert [p.loss_backward_bytes for p in measured] == [0, 0]


def test_a_cross_entropys_backward_holds_two_logits_sized_gradients() -> None:
    rows, width, classes = 4, 8, 64
    measured = profile(nn.Sequential(nn.Linear(width, classes)), torch.randn(rows, width), num_repeats=1,
                       loss_fn=nn.functional.cross_entropy, target=torch.randint(0, classes, (rows,)))
    logits = 4 * rows * classes
    # The log-probabilities' gradient and the logits', held at once.
    assert measured[-1].loss_backward_bytes == 2 * logits
