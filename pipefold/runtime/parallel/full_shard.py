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
owners sum their gradient shards (step_gradients.py, tied.py). Stages of one rank that hold one
weight (a V placement's first and last stage with a tied embedding and head) are one FSDP unit:
gathered at the first of their UNSHARDs, reduce-scattered at the last of their REDUCE_GRADs (the
tied gradient summed whole before it) and freed at the last of their RESHARDs. Design notes:
docs/decisions.md, "Full sharding driven by the schedule".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from pipefold.errors import ConfigError, PipelineError
from pipefold.model import LayerLike, Partition, tied_groups
from pipefold.runtime.parallel.data_parallel import reduce_dtype
from pipefold.runtime.stage import Stage
from pipefold.runtime.transport.comm import Collectives
from pipefold.schedule import Schedule, add_sharding, join_units, shard_units

__all__ = ["FullSharding", "tied_stages"]


class FullSharding:
    """The stages of this rank, each one FSDP unit sharded over the data-parallel group (the
    stages that hold one weight, one unit together)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        group: dist.ProcessGroup,
        device: torch.device,
        *,
        free_between: bool = False,
        lookahead: int = 0,
        root_mesh: object = None,
        tied: Sequence[Sequence[int]] = (),
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
        self._tied = tuple(tuple(held) for held in tied)
        """Every rank's stages that hold one weight (`tied_stages`): the pipeline's units."""
        self._stages = {stage.index: stage for stage in stages}
        self._units: list[_Unit] = []
        self._unit_of: dict[int, _Unit] = {}
        for members in _joined(stages):
            # One stage is its own root; stages holding one weight share a root module over
            # them all, so FSDP shards that weight once (it refuses one parameter in two units).
            root = members[0].module if len(members) == 1 else _Joint([m.module for m in members])
            module = fully_shard(root, mesh=mesh, reshard_after_forward=False,
                                 mp_policy=_policy(members))
            # The replicas' gradients are already weighted by their rows (the pipeline seeds each
            # backward with rows / global rows), so the reduce-scatter sums; gloo has no average.
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
            module._get_fsdp_state()._lazy_init()  # what its first forward would do: it is the root
            self._idle(module)
            unit = _Unit(module, tuple(stage.index for stage in members))
            self._units.append(unit)
            for stage in members:
                self._unit_of[stage.index] = unit
                stage.parameters = _parameters(stage.module)
        described = join_units(self._unit_of, self._tied)
        if described != self.units:
            raise PipelineError(
                f"full sharding: this rank's stages share parameters as units {self.units}, but the "
                f"layers' tied modules and shared parameters give {described}; the schedule would "
                "gather them apart (report this with the model's layers)"
            )
        self._free_between = free_between
        self._lookahead = lookahead
        self._handles: dict[int, object] = {}
        """Each unit's gather in flight, by its first stage."""
        self.num_gathers = 0
        """Weight all-gathers run so far (one per unit per step unless `free_between`; a unit
        is a stage, or the stages of this rank that hold one weight)."""
        self.num_reductions = 0
        """Gradient reduce-scatters run so far (one per unit per step)."""

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
        return tuple(sorted(self._unit_of))

    @property
    def units(self) -> tuple[tuple[int, ...], ...]:
        """The stages of each FSDP unit: one each, but stages that hold one weight together."""
        return tuple(unit.stages for unit in self._units)

    @staticmethod
    def _idle(module: FSDPModule) -> None:
        # Between the gather and the reduction FSDP must neither free the weights nor reduce.
        module.set_requires_gradient_sync(False)
        module.set_reshard_after_backward(False)
        module.set_is_last_backward(False)

    def schedule(self, schedule: Schedule) -> Schedule:
        """`schedule` with the sharding actions this pipeline runs (the same on every rank): a
        unit's stages gathered together at its first use, reduced and freed together after its
        last (`add_sharding(units=shard_units(...))`, as the planner prices them)."""
        units = shard_units(schedule.placement, self._tied)
        return add_sharding(schedule, free_between=self._free_between, lookahead=self._lookahead, units=units)

    def _refresh(self, unit: _Unit) -> None:
        # The layers hold the gathered parameters or the shards: what the backward differentiates.
        for stage in unit.stages:
            self._stages[stage].parameters = _parameters(self._stages[stage].module)

    # -- the executor's handlers for UNSHARD, RESHARD and REDUCE_GRAD -------------------------

    def unshard(self, stage: int) -> None:
        """Start all-gathering `stage`'s weights (collective over "dp"), unless its unit is
        gathered already; `wait_gathered` finishes it before the stage's next compute action."""
        unit = self._unit_of.get(stage)
        if unit is None:
            return  # a stage of parameter-free layers: nothing to gather
        if not unit.holders:
            self._handles[unit.stages[0]] = unit.module.unshard(async_op=True)
            self.num_gathers += 1
        unit.holders.add(stage)

    def wait_gathered(self, stage: int) -> None:
        """Finish `stage`'s gather: its layers then hold the whole weights."""
        unit = self._unit_of.get(stage)
        handle = None if unit is None else self._handles.pop(unit.stages[0], None)
        if unit is None or handle is None:
            return
        handle.wait()  # type: ignore[attr-defined]
        # The unsharded parameters are the leaves of this step's graphs: I hands them to W.
        self._refresh(unit)

    def reduce_grad(self, stage: int) -> None:
        """Reduce-scatter the step's gradients into the shards' `.grad` (summed into what is
        there; collective over "dp"), keeping the whole weights: at `stage`'s REDUCE_GRAD, or
        in a unit of several stages at the last of theirs (each adds to the whole gradient of
        the weight they hold until then)."""
        unit = self._unit_of.get(stage)
        if unit is None:
            return
        unit.reduced.add(stage)
        if len(unit.reduced) < len(unit.stages):
            return
        unit.reduced.clear()
        module = unit.module
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
        micro-batches, the whole gradients accumulated so far); in a unit of several stages,
        once none of them holds the weights."""
        unit = self._unit_of.get(stage)
        if unit is None:
            return
        unit.holders.discard(stage)
        if unit.holders:
            return
        unit.module.reshard()
        self._refresh(unit)

    def gather(self, stage: int) -> None:
        """All-gather `stage`'s weights now (collective over "dp")."""
        self.unshard(stage)
        self.wait_gathered(stage)

    def gather_all(self) -> None:
        """Gather every stage (forward-only evaluation needs whole weights)."""
        for stage in self.stages:
            self.gather(stage)

    def free_all(self) -> None:
        """Free every stage's whole weights, without reducing anything."""
        for unit in self._units:
            unit.holders.clear()
            unit.module.reshard()
            self._refresh(unit)


class _Unit:
    """One FSDP unit: its root module, its stages, and which of them hold the gathered weights
    now and have reached their REDUCE_GRAD this step."""

    def __init__(self, module: FSDPModule, stages: tuple[int, ...]) -> None:
        self.module = module
        self.stages = stages
        self.holders: set[int] = set()
        self.reduced: set[int] = set()


class _Joint(nn.Module):
    """The root over stages that hold one weight (never called: the executor runs each stage's
    layers itself)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(modules)


def tied_stages(
    layers: Sequence[LayerLike],
    partition: Partition,
    shared: Mapping[str, Sequence[tuple[int, str]]] | None = None,
    meta: Sequence[nn.Module] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """The stages that hold one weight, on any rank: each tied key's (with parameters, where the
    `meta` modules are given) and each shared parameter's (`shared_parameter_uses`) layers, by
    stage, where they are on more than one stage."""
    groups = [
        list(indices) for indices in tied_groups(layers).values()
        if meta is None or any(True for _ in meta[indices[0]].parameters())
    ]
    groups += [[index for index, _ in uses] for uses in (shared or {}).values()]
    found = (tuple(sorted({partition.stage_of(index) for index in group})) for group in groups)
    return tuple(stages for stages in found if len(stages) > 1)


def _joined(stages: Sequence[Stage]) -> list[list[Stage]]:
    """The stages with parameters, in units (`pipefold.schedule.join_units`, which the planner's
    `shard_units` uses too): those holding one parameter (by identity, as a tied module or a
    shared parameter is held) together, in stage order."""
    with_parameters = {stage.index: stage for stage in stages if stage.parameters}
    holders: dict[int, list[int]] = {}
    for stage in with_parameters.values():
        for param in stage.parameters:
            holders.setdefault(id(param), []).append(stage.index)
    units = join_units(with_parameters, [held for held in holders.values() if len(held) > 1])
    return [[with_parameters[index] for index in unit] for unit in units]


def _policy(members: Sequence[Stage]) -> MixedPrecisionPolicy:
    """FSDP's precision for a unit of `members` stages: the weights as they are held (FSDP casts
    nothing for the forward; autocast does that under mixed precision), and 16-bit gradients
    (bf16 weights, `precision="bf16-pure"`) reduce-scattered in fp32, as the replicas' all-reduce
    does without sharding (`data_parallel.reduce_dtype`): the sum rounds once, into bf16."""
    dtypes = {param.dtype for stage in members for param in stage.parameters if param.is_floating_point()}
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
