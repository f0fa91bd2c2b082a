"""Full sharding (FSDP2, `fully_shard`) of each stage over the data-parallel replicas, driven
by the schedule: `pipefold.schedule.shard.add_sharding` puts UNSHARD / REDUCE_GRAD / RESHARD
actions into the rank's program, and the executor runs them through this object. By default a
stage's weights are gathered once per step, before its first forward, kept for every
micro-batch, and freed after its last backward action (B or W), when its gradients are
reduce-scattered once; `free_between` and `lookahead` move the gathers and frees.

    pipe = Pipeline(layers, ..., parallel=ParallelOptions(process_group=mesh, shard="full"))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-4)   # steps this rank's 1/dp shards
    loss = pipe.step(x[rows], y[rows]); optimizer.step(); optimizer.zero_grad()

FSDP's own forward and backward hooks never fire: the executor runs a stage's layers one by
one, not through the module `fully_shard` wraps, and the backward goes through pipefold's own
autograd calls (backward.py). What FSDP would do per micro-batch happens where the schedule
says instead. fp16's loss scale checks and unscales the shards after the step, and tied layers'
owners sum their gradient shards (step_gradients.py, tied.py). Design notes: docs/decisions.md,
"Full sharding driven by the schedule".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from pipefold.errors import ConfigError
from pipefold.runtime.parallel.data_parallel import reduce_dtype
from pipefold.runtime.stage import Stage
from pipefold.runtime.transport.comm import Collectives
from pipefold.schedule import Schedule, add_sharding

__all__ = ["FullSharding"]


class FullSharding:
    """The stages of this rank, each one FSDP unit sharded over the data-parallel group."""

    def __init__(
        self,
        stages: Sequence[Stage],
        group: dist.ProcessGroup,
        device: torch.device,
        *,
        free_between: bool = False,
        lookahead: int = 0,
        root_mesh: object = None,
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        # The "dp" dim of the user's mesh where there is one: with a "tp" dim, FSDP2 shards the
        # tensor-parallel DTensors over "dp" only when both come from the same mesh.
        names = tuple(getattr(root_mesh, "mesh_dim_names", None) or ())
        mesh = (
            root_mesh["dp"]  # type: ignore[index]
            if "dp" in names
            else DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp",))
        )
        self._group = group
        self._modules: dict[int, FSDPModule] = {}
        self._stages = {stage.index: stage for stage in stages}
        for stage in stages:
            if not stage.parameters:
                continue  # nothing to shard (a stage of parameter-free layers)
            module = fully_shard(
                stage.module, mesh=mesh, reshard_after_forward=False, mp_policy=_policy(stage)
            )
            # The replicas' gradients are already weighted by their rows (the pipeline seeds each
            # backward with rows / global rows), so the reduce-scatter sums; gloo has no average.
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
            module._get_fsdp_state()._lazy_init()  # what its first forward would do: it is the root
            self._idle(module)
            self._modules[stage.index] = module
            stage.parameters = _parameters(stage.module)
        self._free_between = free_between
        self._lookahead = lookahead
        self._handles: dict[int, object] = {}
        self.num_gathers = 0
        """Weight all-gathers run so far (one per stage per step unless `free_between`)."""
        self.num_reductions = 0
        """Gradient reduce-scatters run so far (one per stage per step)."""

    def check_one_replica(self, collectives: Collectives | None) -> None:
        """With tied layers or shared parameters: refuse a pipeline whose ranks are not all the
        same replica index along "dp" (hand-built data-parallel groups can pair them so). The
        owners of a tied weight sum their gradient shards, which only line up where each holds
        the same 1/dp of it; a mesh's "dp" dim always does. Collective over the pipeline."""
        if collectives is None:
            return
        mine = dist.get_rank(self._group)
        indices = collectives.all_gather_object(mine, what="full-sharding replica handshake")
        if any(index != mine for index in indices):
            raise ConfigError(
                f"data_parallel_group: this pipeline's ranks are replicas {indices} along it, and full "
                "sharding of tied layers needs every rank of one pipeline to be the same replica (the "
                "owners sum matching gradient shards); order the groups alike, pass a DeviceMesh with a "
                "'dp' dim, or shard='replicate'"
            )

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

    def schedule(self, schedule: Schedule) -> Schedule:
        """`schedule` with the sharding actions this pipeline runs (the same on every rank)."""
        return add_sharding(schedule, free_between=self._free_between, lookahead=self._lookahead)

    # -- the executor's handlers for UNSHARD, RESHARD and REDUCE_GRAD -------------------------

    def unshard(self, stage: int) -> None:
        """Start all-gathering `stage`'s weights (collective over "dp"); `wait_gathered`
        finishes it before the stage's next compute action."""
        module = self._modules.get(stage)
        if module is None:
            return  # a stage of parameter-free layers: nothing to gather
        self._handles[stage] = module.unshard(async_op=True)
        self.num_gathers += 1

    def wait_gathered(self, stage: int) -> None:
        """Finish `stage`'s gather: its layers then hold the whole weights."""
        handle = self._handles.pop(stage, None)
        if handle is None:
            return
        handle.wait()  # type: ignore[attr-defined]
        # The unsharded parameters are the leaves of this step's graphs: I hands them to W.
        self._stages[stage].parameters = _parameters(self._stages[stage].module)

    def reduce_grad(self, stage: int) -> None:
        """Reduce-scatter `stage`'s gradients of the step into its shards' `.grad` (summed
        into what is there; collective over "dp"), keeping the whole weights."""
        module = self._modules.get(stage)
        if module is None:
            return
        module.set_is_last_backward(True)
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

    def reshard(self, stage: int) -> None:
        """Free `stage`'s whole weights, keeping this replica's shard (and, between
        micro-batches, the whole gradients accumulated so far)."""
        module = self._modules.get(stage)
        if module is None:
            return
        module.reshard()
        self._stages[stage].parameters = _parameters(self._stages[stage].module)

    def gather(self, stage: int) -> None:
        """All-gather `stage`'s weights now (collective over "dp")."""
        self.unshard(stage)
        self.wait_gathered(stage)

    def gather_all(self) -> None:
        """Gather every stage (forward-only evaluation needs whole weights)."""
        for stage in self._modules:
            self.gather(stage)

    def free_all(self) -> None:
        """Free every stage's whole weights, without reducing anything."""
        for stage, module in self._modules.items():
            module.reshard()
            self._stages[stage].parameters = _parameters(self._stages[stage].module)


def _policy(stage: Stage) -> MixedPrecisionPolicy:
    """FSDP's precision for `stage`: the weights as they are held (FSDP casts nothing for the
    forward; autocast does that under mixed precision), and 16-bit gradients (bf16 weights,
    `precision="bf16-pure"`) reduce-scattered in fp32, as the replicas' all-reduce does
    without sharding (`data_parallel.reduce_dtype`): the sum rounds once, into bf16."""
    dtypes = {param.dtype for param in stage.parameters if param.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != reduce_dtype(dtype):
        return MixedPrecisionPolicy(reduce_dtype=reduce_dtype(dtype))
    return MixedPrecisionPolicy()  # fp32 weights: FSDP's defaults, nothing cast


def _parameters(module: nn.Module) -> tuple[nn.Parameter, ...]:
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return tuple(params)
