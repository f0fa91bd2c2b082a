"""fp32 master weights for a model held in 16 bits (`RuntimeOptions(precision="bf16-pure")`).

    pipe = Pipeline(layers, ..., runtime=RuntimeOptions(precision="bf16-pure"))   # bf16 weights
    optimizer = fp32_master_weights(torch.optim.AdamW)(pipe.parameters(), lr=3e-3)
    pipe.step(x, y); optimizer.step(); optimizer.zero_grad()

`fp32_master_weights(cls)` is a subclass of the optimizer class `cls` whose `step` updates an
fp32 copy of every 16-bit parameter (kept in the optimizer's state as "master", so checkpoints
save it by parameter name like `exp_avg`) from the fp32-cast gradient, with all of `cls`'s state
in fp32, then rounds the result into the 16-bit parameter. Updates smaller than a bf16 step
therefore accumulate in the master instead of rounding away. fp32 parameters are stepped as
`cls` steps them. Tensor-parallel (DTensor) parameters work alike: the master is a DTensor of
the parameter's layout, so each rank keeps the fp32 copy of its own shard. The parameter
groups, hyperparameters and learning-rate schedulers are `cls`'s.

Asynchronous schedules (PipeDream, 2BW) step each stage's optimizer inside the step; with bf16
weights their factory must build such an optimizer (`keeps_fp32_masters` checks it):
`ParallelOptions(optimizer=lambda params: fp32_master_weights(torch.optim.SGD)(params, lr=0.1))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["MASTER_KEY", "fp32_master_weights", "keeps_fp32_masters"]

MASTER_KEY = "master"
"""The optimizer-state key of a 16-bit parameter's fp32 master copy."""

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)

_CLASSES: dict[type[Any], type[Any]] = {}


def keeps_fp32_masters(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is an instance of a class `fp32_master_weights` made (or of a subclass)."""
    return isinstance(optimizer, tuple(_CLASSES.values()))


def fp32_master_weights(optimizer_class: type[OptimizerT]) -> type[OptimizerT]:
    """`optimizer_class` stepping fp32 master copies of its 16-bit parameters (module docstring)."""
    made = _CLASSES.get(optimizer_class)
    if made is not None:
        return made

    class MasterWeights(optimizer_class):  # type: ignore[valid-type,misc]
        __doc__ = f"{optimizer_class.__name__} over fp32 master copies of 16-bit parameters."

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> Any:
            # Each 16-bit parameter is replaced, in its group and as the key of its state, by an
            # fp32 stand-in holding the master and the fp32-cast gradient while `cls` steps; then
            # the parameter comes back and takes the master rounded to nearest. (Swapping
            # `param.data` instead would not reach a DTensor's local shard.)
            swapped: list[tuple[list[Any], int, torch.nn.Parameter, torch.nn.Parameter]] = []
            for group in self.param_groups:
                params = group["params"]
                for index, param in enumerate(params):
                    if param.dtype == torch.float32:
                        continue
                    # The master leaves the state while the class steps: an optimizer that
                    # initializes its state when it finds it empty (AdamW) must still find it
                    # empty the first time.
                    state = self.state.pop(param, {})
                    master = state.pop(MASTER_KEY, None)
                    if master is None:
                        master = param.detach().to(torch.float32)
                    stand_in = torch.nn.Parameter(master, requires_grad=param.requires_grad)
                    if param.grad is not None:
                        stand_in.grad = param.grad.to(torch.float32)
                    self.state[stand_in] = state
                    params[index] = stand_in
                    swapped.append((params, index, param, stand_in))
            try:
                loss = super().step(closure)
            finally:
                for params, index, param, stand_in in swapped:
                    params[index] = param
                    state = self.state.pop(stand_in, {})
                    master = stand_in.detach()
                    param.copy_(master)  # round to nearest into the 16-bit weight
                    state[MASTER_KEY] = master
                    self.state[param] = state
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
