"""What a step costs beyond its layers' own time: the runtime's per action, the optimizer update's per byte.

    from pipefold.runtime.overheads import action_overhead, update_seconds_per_byte
    costs = replace(costs, action_overhead_s=action_overhead(),
                    update_s_per_parameter_byte=update_seconds_per_byte(model.parameters()))

`pipefold plan --profile` (and `pipefold profile`) add both to the measured layer costs, so the
planner's forecast prices what `pipefold train`'s wall step holds besides the layers
(docs/plan.md, "Forecast and measurement"):

- `action_overhead` runs a one-rank `Pipeline` (in this process, no messages) over two tiny
  layers and the same layers called by plain torch, alternated; the difference per compute
  action is the executor's (dispatch, the stage's and the backward's entry, recording).
- `update_seconds_per_byte` times what `pipefold train` does after the schedule on parameters
  holding gradients: the global gradient norm, AdamW's step and `zero_grad`, per parameter byte,
  in the run's `precision` (bf16-pure: fp32 masters stepped and rounded into bf16 weights).

The fastest of `num_repeats` runs (action overhead) and the median (update); both take well
under a second on a CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.runtime.master import fp32_master_weights
from pipefold.runtime.options import PRECISIONS, PURE_PRECISIONS, LayoutOptions
from pipefold.runtime.pipeline import Pipeline

__all__ = ["action_overhead", "update_seconds_per_byte"]

_WIDTH = 8
"""Features of the tiny layers: small enough that their torch calls' own time is the fixed part."""


def _check_repeats(num_repeats: int) -> None:
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise ConfigError(f"num_repeats = {num_repeats!r}; give an integer >= 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).pow(2).mean()


def action_overhead(
    device: torch.device | str = "cpu", *, num_microbatches: int = 32, num_repeats: int = 9
) -> float:
    """Seconds per compute action the runtime adds to the layers' own time, on `device`."""
    _check_repeats(num_repeats)
    where = torch.device(device)
    with torch.random.fork_rng(devices=[where.index or 0] if where.type == "cuda" else []):
        torch.manual_seed(0)
        layers = [nn.Linear(_WIDTH, _WIDTH), nn.Linear(_WIDTH, _WIDTH)]
        plain = nn.Sequential(*(nn.Linear(_WIDTH, _WIDTH) for _ in range(2))).to(where)
        inputs = torch.randn(num_microbatches, _WIDTH, device=where)
        targets = torch.randn(num_microbatches, _WIDTH, device=where)
    pipe = Pipeline(layers, loss_fn=_loss, schedule="gpipe", num_microbatches=num_microbatches,
                    layout=LayoutOptions(device=where))

    def run_pipeline() -> float:
        _sync(where)
        start = time.perf_counter()
        pipe.step(inputs, targets)
        _sync(where)
        return time.perf_counter() - start

    def run_plain() -> float:
        _sync(where)
        start = time.perf_counter()
        for row in range(num_microbatches):
            torch.autograd.backward([_loss(plain(inputs[row : row + 1]), targets[row : row + 1])])
        _sync(where)
        return time.perf_counter() - start

    run_pipeline(), run_plain()  # warm-up: first calls allocate and build the executor's tables
    pipeline_times, plain_times = [], []
    for _ in range(num_repeats):  # alternated, so a change of load hits both alike
        pipeline_times.append(run_pipeline())
        plain_times.append(run_plain())
    # The fastest of each: other processes on the host only ever add time, to either side.
    extra = min(pipeline_times) - min(plain_times)
    return max(extra, 0.0) / (2 * num_microbatches)


def update_seconds_per_byte(
    parameters: Iterable[Tensor], *, num_repeats: int = 5, precision: str = "fp32"
) -> float:
    """Seconds per parameter byte of the update after a flush step (gradient norm, AdamW step,
    zero_grad), timed on copies of `parameters` with random gradients (the originals are left
    alone), as `pipefold train --precision` runs it: bf16-pure holds the weights and gradients
    in bf16 and steps fp32 master copies (`fp32_master_weights(AdamW)`), rounding them back into
    the weights; fp16 checks the gradients for overflow and unscales them first (the loss scale).
    Per byte of the weights as held (2 a value in bf16-pure, as its profile's `parameter_bytes`)."""
    _check_repeats(num_repeats)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r}; use one of {', '.join(PRECISIONS)}")
    held = torch.bfloat16 if precision in PURE_PRECISIONS else None
    copies = [nn.Parameter(p.detach().to(held or p.dtype, copy=True))
              for p in parameters if p.is_floating_point()]
    if not copies:
        raise ConfigError("update_seconds_per_byte: no floating-point parameters to update")
    where = copies[0].device
    num_bytes = sum(p.numel() * p.element_size() for p in copies)
    adamw = fp32_master_weights(torch.optim.AdamW) if held is not None else torch.optim.AdamW
    optimizer = adamw(copies, lr=1e-3)
    scaled = precision == "fp16"
    times = []
    for repeat in range(num_repeats + 1):
        for p in copies:
            p.grad = torch.randn_like(p)
        _sync(where)
        start = time.perf_counter()
        grads = [p.grad for p in copies if p.grad is not None]
        if scaled:  # as runtime.loss_scale: an overflow flag over every gradient, then 1 / scale
            flag = torch.zeros(1, device=where)
            for grad in grads:
                flag = torch.maximum(flag, (~torch.isfinite(grad)).any().to(flag.dtype))
            bool(flag.item() > 0)
            for grad in grads:
                grad.mul_(1 / 1024.0)
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(where)
        if repeat:  # the first step allocates AdamW's state
            times.append(time.perf_counter() - start)
    return statistics.median(times) / num_bytes
