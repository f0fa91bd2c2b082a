"""The activation counter: counts what autograd saves and lets all of it go again."""

import torch
import torch.nn.functional as F
from torch import nn

from pipefold.runtime.backward import backward_full, backward_input, backward_weight
from pipefold.runtime.memory import ActivationCounter


class Attention(nn.Module):
    # scaled_dot_product_attention saves its own output for the backward: the case that
    # once leaked under the counter's pack hook (see ActivationCounter._pack).
    def __init__(self, width=16, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))


def _run(split):
    torch.manual_seed(0)
    stage = Attention()
    params = list(stage.parameters())
    counter = ActivationCounter(params)
    for _ in range(3):
        with counter.counting():
            inputs = torch.randn(2, 8, 16, requires_grad=True)
            out = stage(inputs)
            assert counter.current > 0
            grad = torch.randn_like(out)
            if split:
                _, state = backward_input([out], [grad], [inputs], params)
                del out
                backward_weight(state)
                del state
            else:
                backward_full([out], [grad], [inputs])
                del out
        assert counter.current == 0, f"{counter.current} bytes still counted after the backward"
    return counter


def test_split_backward_releases_every_saved_activation():
    counter = _run(split=True)
    assert counter.peak > 0


def test_full_backward_releases_every_saved_activation():
    _run(split=False)
