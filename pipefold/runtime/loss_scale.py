"""The dynamic loss scale of fp16 training (`RuntimeOptions(precision="fp16", loss_scale=2.0**16)`).

    loss = pipe.step(inputs, targets)          # backward of loss x scale; gradients unscaled
    if not pipe.loss_scale.skipped:            # the same answer on every rank
        optimizer.step()
    optimizer.zero_grad()

fp16 keeps 5 exponent bits, so small gradients underflow to zero; the backward therefore starts
from the loss times `scale`, and the step's gradient contribution is divided by it again before
it is added to what `.grad` held. A contribution with an inf or NaN anywhere (an overflow) is
dropped: `.grad` keeps what it held before the step. Whether to drop is ONE agreement: each rank
checks its own contribution and a single all-reduce (max) of that flag over every rank of the job
(pipeline stages, data-parallel replicas, tensor-parallel peers) gives every rank the same answer,
so every rank skips the same step and changes the scale the same way: halved after an overflow,
doubled after `growth_interval` steps in a row without one (torch.amp.GradScaler's rule).
`state_dict()` / `load_state_dict()` (the scale, the clean steps since the last change, the
skipped steps) travel in checkpoints, so a resumed run continues where the saved one stood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.parallel.tensor_parallel import local

__all__ = ["DynamicLossScale", "check_state"]


def check_state(state: Mapping[str, object]) -> None:
    """Refuse what `DynamicLossScale.state_dict()` cannot have written (a ConfigError)."""
    scale, good, skipped = state.get("scale"), state.get("good_steps"), state.get("num_skipped")
    if not (
        isinstance(scale, (int, float)) and 0 < scale < float("inf")
        and isinstance(good, int) and good >= 0 and isinstance(skipped, int) and skipped >= 0
    ):
        raise ConfigError(
            f"loss_scale={dict(state)!r} is not a saved dynamic loss scale (a positive finite scale, "
            "good_steps and num_skipped >= 0); resume from a checkpoint save_checkpoint wrote"
        )


class DynamicLossScale:
    """The scale, its rule, and the gradients set aside while a step runs (one per pipeline)."""

    def __init__(
        self,
        scale: float,
        *,
        growth_interval: int,
        group: dist.ProcessGroup | None,
        watchdog: Watchdog,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        self.scale = float(scale)
        """The factor the next step's loss is multiplied by before its backward."""
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.skipped = False
        """Whether the last step overflowed somewhere (its contribution dropped on every rank)."""
        self.num_skipped = 0
        self._good_steps = 0
        self._group = group
        self._watchdog = watchdog
        self._set_aside: list[Tensor | None] | None = None

    def state_dict(self) -> dict[str, float | int]:
        """What a resumed run needs (JSON data; the same on every rank)."""
        return {"scale": self.scale, "good_steps": self._good_steps, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from `state_dict()`'s values (a checkpoint's `loss_scale`)."""
        check_state(state)
        self.scale = float(state["scale"])  # type: ignore[arg-type]
        self._good_steps = int(state["good_steps"])  # type: ignore[call-overload]
        self.num_skipped = int(state["num_skipped"])  # type: ignore[call-overload]
        self.skipped = False

    def set_aside(self, params: Sequence[nn.Parameter]) -> None:
        """Move `.grad` out of the way so the step writes only its own (scaled) contribution."""
        self._set_aside = [p.grad for p in params]
        for param in params:
            param.grad = None

    def overflowed(self, params: Sequence[nn.Parameter], device: torch.device) -> bool:
        """Whether any rank's contribution holds an inf or NaN: one all-reduce of a flag."""
        flag = torch.zeros(1, device=device)
        for param in params:
            if param.grad is not None:
                flag = torch.maximum(flag, (~torch.isfinite(local(param.grad))).any().to(flag.dtype))
        if self._group is not None:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            self._watchdog.wait(work, what="loss-scale overflow all-reduce", peer=None)
        return bool(flag.item() > 0)

    def restore(self, params: Sequence[nn.Parameter]) -> None:
        """Drop the step's contribution: `.grad` as before the step."""
        if self._set_aside is None:
            return
        for param, previous in zip(params, self._set_aside, strict=True):
            param.grad = previous
        self._set_aside = None

    def unscale_and_add_back(self, params: Sequence[nn.Parameter]) -> None:
        """`.grad` = what was set aside + this step's contribution / scale. (With data
        parallelism the average does both: `DataParallel.average_gradients(weight / scale)`.)"""
        set_aside = self._set_aside or [None] * len(params)
        inverse = 1.0 / self.scale
        for param, previous in zip(params, set_aside, strict=True):
            grad = param.grad
            if grad is None:
                param.grad = previous
                continue
            local(grad).mul_(inverse)
            if previous is not None:
                local(grad).add_(local(previous))
        self._set_aside = None

    def update(self, overflow: bool) -> None:
        """Halve the scale after an overflow; grow it after `growth_interval` clean steps."""
        self.skipped = overflow
        if overflow:
            self.num_skipped += 1
            self.scale *= self.backoff_factor
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self._good_steps = 0
