"""Per-layer costs measured in one process: what the simulator's predictions are built from.

For each layer, on one micro-batch: forward time, full backward time (B), input-gradient
time (I), activation bytes saved for the backward and output bytes (the message to the
next stage). The weight-gradient time is taken as W = B - I: measuring W separately
with autograd would run the whole backward again, and the runtime keeps I's
intermediate gradients so that I + W = B (pipefold/runtime/backward.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.harness.results import LayerCost
from benchmarks.harness.workloads import Workload

__all__ = ["LayerCost", "profile_layers"]


def _median_time(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run the forward, counting bytes autograd saves for the backward (parameters excluded)."""
    parameter_ptrs = {p.data_ptr() for p in layer.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in parameter_ptrs:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out: torch.Tensor = layer(x)
    return out, total


def _profile_layer(
    work: Workload,
    layer: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    is_last: bool,
    repeats: int,
) -> tuple[LayerCost, torch.Tensor]:
    wants_input_grad = x.is_floating_point()
    x_in = x.detach().requires_grad_(wants_input_grad)

    def forward() -> torch.Tensor:
        out: torch.Tensor = layer(x_in)
        return work.loss_fn(out, targets) if is_last else out

    def run_forward() -> None:
        forward()

    first = forward()
    grad_out = torch.ones_like(first) if is_last else torch.randn_like(first)

    def backward() -> None:
        torch.autograd.backward(forward(), grad_out)

    def input_grad() -> None:
        torch.autograd.grad(forward(), x_in, grad_out)

    forward_s = _median_time(run_forward, repeats)
    # Each backward run includes its forward; the forward median is subtracted.
    backward_s = max(_median_time(backward, repeats) - forward_s, 0.0)
    input_grad_s = 0.0
    if wants_input_grad:
        input_grad_s = min(max(_median_time(input_grad, repeats) - forward_s, 0.0), backward_s)
    layer.zero_grad()
    out, saved = _saved_bytes(layer, x_in)
    cost = LayerCost(
        forward_s=forward_s,
        backward_s=backward_s,
        input_grad_s=input_grad_s,
        activation_bytes=saved,
        output_bytes=out.numel() * out.element_size(),
    )
    return cost, out.detach()


def profile_layers(
    work: Workload, layers: list[nn.Module], microbatch_size: int, *, seed: int = 0, repeats: int = 5
) -> list[LayerCost]:
    """Median costs of each layer on a micro-batch of `microbatch_size` samples.

    The last layer's costs include the loss, which both libraries apply on the last stage.
    """
    inputs, targets = work.make_batch(seed, batch_size=microbatch_size)
    costs = []
    x = inputs
    for index, layer in enumerate(layers):
        cost, x = _profile_layer(
            work, layer, x, targets, is_last=index == len(layers) - 1, repeats=repeats
        )
        costs.append(cost)
    return costs
