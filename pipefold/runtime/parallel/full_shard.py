"""Full sharding (FSDP2, `fully_shard`) of each stage over the data-parallel replicas, driven
by the schedule: a stage's weights are gathered once per step, before its first forward, kept
for every micro-batch, and freed after its last backward action (B or W), when its gradients
are reduce-scattered once.

    pipe = Pipeline(layers, ..., parallel=ParallelOptions(process_group=mesh, shard="full"))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-4)   # steps this rank's 1/dp shards
    loss = pipe.step(x[rows], y[rows]); optimizer.step(); optimizer.zero_grad()

FSDP's own forward and backward hooks never fire: the executor runs a stage's layers one by
one, not through the module `fully_shard` wraps, and the backward goes through pipefold's own
autograd calls (backward.py). Everything FSDP would do per micro-batch happens here once per
step instead. Design notes: docs/decisions.md, "Full sharding driven by the schedule".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pipefold.runtime.stage import Stage

__all__ = ["FullSharding"]


class FullSharding:
    """The stages of this rank, each one FSDP unit sharded over the data-parallel group."""

    def __init__(self, stages: Sequence[Stage], group: dist.ProcessGroup, device: torch.device) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp",))
        self._modules: dict[int, FSDPModule] = {}
        self._stages = {stage.index: stage for stage in stages}
        for stage in stages:
            if not stage.parameters:
                continue  # nothing to shard (a stage of parameter-free layers)
            module = fully_shard(stage.module, mesh=mesh, reshard_after_forward=False)
            # The replicas' gradients are already weighted by their rows (the pipeline seeds each
            # backward with rows / global rows), so the reduce-scatter sums; gloo has no average.
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
            module._get_fsdp_state()._lazy_init()  # what its first forward would do: it is the root
            self._idle(module)
            self._modules[stage.index] = module
            stage.parameters = _parameters(stage.module)
        self.num_gathers = 0
        """Weight all-gathers run so far (one per stage per step)."""
        self.num_reductions = 0
        """Gradient reduce-scatters run so far (one per stage per step)."""

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages sharded here (those with parameters)."""
        return tuple(self._modules)

    @staticmethod
    def _idle(module: FSDPModule) -> None:
        # Between the gather and the reduction FSDP must neither free the weights nor reduce.
        module.set_requires_gradient_sync(False)
        module.set_reshard_after_backward(False)
        module.set_is_last_backward(False)

    def gather(self, stage: int) -> None:
        """All-gather `stage`'s weights (collective over "dp"); its layers then hold them whole."""
        module = self._modules[stage]
        module.unshard()
        self.num_gathers += 1
        # The unsharded parameters are the leaves of this step's graphs: I hands them to W.
        self._stages[stage].parameters = _parameters(self._stages[stage].module)

    def reduce_and_free(self, stage: int) -> None:
        """Reduce-scatter `stage`'s gradients into its shards' `.grad` (summed into what is
        there) and free its whole weights (collective over "dp")."""
        module = self._modules[stage]
        module.set_is_last_backward(True)
        module.set_reshard_after_backward(True)
        module.set_requires_gradient_sync(True)
        # What FSDP's post-backward hooks and its end-of-backward callback would run, called
        # here because the backward never went through its hooks (as torch.distributed.pipelining
        # does for its REDUCE_GRAD action).
        state = module._get_fsdp_state()
        for each in state._state_ctx.all_states:
            for group in each._fsdp_param_groups:
                group.post_backward()
        state._root_post_backward_final_callback()
        self._idle(module)
        self.num_reductions += 1
        self._stages[stage].parameters = _parameters(self._stages[stage].module)

    def before_first_forward(self, stage: int) -> None:
        """The executor's hook (`StageHooks`): gather."""
        self.gather(stage)

    def after_last_backward(self, stage: int) -> None:
        """The executor's hook (`StageHooks`): reduce-scatter and free."""
        self.reduce_and_free(stage)

    def gather_all(self) -> None:
        """Gather every stage (forward-only evaluation needs whole weights)."""
        for stage in self._modules:
            self.gather(stage)

    def free_all(self) -> None:
        """Free every stage's whole weights, without reducing anything."""
        for stage, module in self._modules.items():
            module.reshard()
            self._stages[stage].parameters = _parameters(self._stages[stage].module)


def _parameters(module: nn.Module) -> tuple[nn.Parameter, ...]:
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return tuple(params)
