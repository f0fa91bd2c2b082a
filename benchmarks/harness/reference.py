"""The single-process reference every side's gradients are checked against."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness.workloads import Workload

__all__ = ["GradientMismatch", "check_gradients", "reference_gradients"]


class GradientMismatch(RuntimeError):
    """A library's gradients differ from one process's. Raised by the harness, about a library."""


def reference_gradients(
    workload: Workload, layers: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over the whole batch, computed by one process."""
    model = nn.Sequential(*layers)
    model.zero_grad()
    torch.autograd.backward(workload.loss_fn(model(inputs), targets))
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def check_gradients(
    label: str,
    grads: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """assert_close every local gradient against the reference; returns the largest abs. error.

    Micro-batching sums the same terms in another order, so float32 rounding differs a
    little; the tolerances are ten times above what torch's own schedules reach here.
    """
    if not grads:
        raise GradientMismatch(f"{label}: this rank reports no gradients at all")
    worst = 0.0
    for name, grad in grads.items():
        if name not in reference:
            raise GradientMismatch(f"{label}: gradient {name!r} has no counterpart in the reference model")
        try:
            torch.testing.assert_close(grad, reference[name], rtol=rtol, atol=atol)
        except AssertionError as error:
            raise GradientMismatch(
                f"{label}: gradient of {name!r} differs from one process: {error}"
            ) from None
        worst = max(worst, float((grad - reference[name]).abs().max()))
    return worst
