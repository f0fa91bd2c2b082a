"""fp32 master weights for a model held in 16 bits (`RuntimeOptions(precision="bf16-pure")`).

    pipe = Pipeline(layers, ..., runtime=RuntimeOptions(precision="bf16-pure"))   # bf16 weights
    optimizer = fp32_master_weights(torch.optim.AdamW)(pipe.parameters(), lr=3e-3)
    pipe.step(x, y); optimizer.step(); optimizer.zero_grad()

`fp32_master_weights(cls)` is a subclass of the optimizer class `cls` whose `step` updates an
fp32 copy of every 16-bit parameter (kept in the optimizer's state as "master", so checkpoints
save it by parameter name like `exp_avg`) from the fp32-cast gradient, with all of `cls`'s state
in fp32, then rounds the result into the 16-bit parameter. Updates smaller than a bf16 step
therefore accumulate in the master instead of rounding away. fp32 parameters are stepped as
`cls` steps them. The parameter groups, hyperparameters and learning-rate schedulers are `cls`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["MASTER_KEY", "fp32_master_weights"]

MASTER_KEY = "master"
"""The optimizer-state key of a 16-bit parameter's fp32 master copy."""

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)

_CLASSES: dict[type[Any], type[Any]] = {}


def fp32_master_weights(optimizer_class: type[OptimizerT]) -> type[OptimizerT]:
    """`optimizer_class` stepping fp32 master copies of its 16-bit parameters (module docstring)."""
    made = _CLASSES.get(optimizer_class)
    if made is not None:
        return made

    class MasterWeights(optimizer_class):  # type: ignore[valid-type,misc]
        __doc__ = f"{optimizer_class.__name__} over fp32 master copies of 16-bit parameters."

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> Any:
            swapped: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
            for group in self.param_groups:
                for param in group["params"]:
                    if param.dtype == torch.float32:
                        continue
                    state = self.state[param]
                    # Out of the state while the class steps: an optimizer that initializes its
                    # state when it finds it empty (AdamW) must still find it empty the first time.
                    master = state.pop(MASTER_KEY, None)
                    if master is None:
                        master = param.detach().to(torch.float32)
                    low, grad = param.data, param.grad
                    param.grad = None
                    param.data = master
                    param.grad = None if grad is None else grad.to(torch.float32)
                    swapped.append((param, low, grad))
            try:
                loss = super().step(closure)
            finally:
                for param, low, grad in swapped:
                    master = param.data
                    param.grad = None
                    low.copy_(master)  # round to nearest into the 16-bit weight
                    param.data = low
                    param.grad = grad
                    self.state[param][MASTER_KEY] = master
            return loss

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # torch casts loaded state to each parameter's dtype; a 16-bit parameter's state
            # (master and moments) stays fp32.
            super().load_state_dict(state_dict)
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
                for saved_id, param in zip(saved_group["params"], group["params"], strict=True):
                    if param.dtype == torch.float32:
                        continue
                    for key, value in state_dict["state"].get(saved_id, {}).items():
                        if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                            self.state[param][key] = value.to(device=param.device, dtype=torch.float32)

    MasterWeights.__name__ = MasterWeights.__qualname__ = f"FP32Master{optimizer_class.__name__}"
    _CLASSES[optimizer_class] = MasterWeights
    return MasterWeights
