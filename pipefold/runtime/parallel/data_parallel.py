"""Data parallelism across pipeline replicas: each replica runs the whole pipeline on its
own shard of the global batch, and after the schedule the replicas average this step's
gradients so they equal the gradient of the mean loss over the global batch.

    mesh = init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))
    pipe = Pipeline(layers, loss_fn=..., parallel=ParallelOptions(process_group=mesh))  # over "pp"
    rows = slice(pipe.data_parallel_rank, None, pipe.num_data_parallel)
    loss = pipe.step(inputs[rows], targets[rows])                # global-batch mean loss

Design notes: docs/decisions.md, "data-parallel gradients".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.parallel.tensor_parallel import is_sharded, local
from pipefold.runtime.transport.comm import Collectives

__all__ = ["DataParallel", "split_mesh", "BUCKET_BYTES", "reduce_dtype"]

BUCKET_BYTES = 25 << 20
"""Gradient bytes flattened into one all-reduce (PyTorch DDP's default bucket size)."""

_MESH_DIMS = ("dp", "pp", "tp")


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a bucket of `dtype` gradients is all-reduced in: fp32 for 16-bit gradients
    (bf16 weights, `precision="bf16-pure"`), so the replicas' sum and the averaging round once,
    into the gradient's dtype at the end (docs/decisions.md, "data-parallel gradients")."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def split_mesh(process_group: Any, data_parallel_group: Any) -> tuple[Any, dist.ProcessGroup | None]:
    """(the pipeline's group argument, the data-parallel group or None) from `Pipeline`'s arguments.

    A `DeviceMesh` must name its pipeline dim "pp" and may add a "dp" dim; anything else
    is refused here, before any communication.
    """
    if process_group is not None and hasattr(process_group, "get_group"):  # a DeviceMesh
        names = tuple(getattr(process_group, "mesh_dim_names", None) or ())
        if "pp" not in names:
            raise ConfigError(
                f"process_group: the DeviceMesh has dims named {names or 'nothing'}, but the pipeline "
                "runs over a dim named 'pp'; build it with init_device_mesh(device, (dp, pp), "
                "mesh_dim_names=('dp', 'pp')) or (pp,) with mesh_dim_names=('pp',)"
            )
        unknown = [name for name in names if name not in _MESH_DIMS]
        if unknown:
            raise ConfigError(
                f"process_group: the DeviceMesh has dims {names}; pipefold composes only 'dp' (data "
                f"parallel), 'pp' (pipeline) and 'tp' (tensor parallel) and does not implement {unknown} "
                "(FSDP / context parallelism are absent); drop those dims"
            )
        if dist.is_available() and dist.is_initialized():
            mesh_size = int(process_group.size())
            world_size = dist.get_world_size()
            if mesh_size != world_size:
                shape = dict(zip(names, tuple(process_group.shape), strict=True))
                raise ConfigError(
                    f"process_group: the DeviceMesh {shape} covers {mesh_size} ranks but the world has "
                    f"{world_size}; choose {' x '.join(names)} = {world_size}"
                )
        mesh_data_parallel = process_group.get_group("dp") if "dp" in names else None
        if mesh_data_parallel is not None and data_parallel_group is not None:
            raise ConfigError(
                "data_parallel_group is given and the DeviceMesh has a 'dp' dim too; pass one of them"
            )
        process_group = process_group.get_group("pp")
        if data_parallel_group is None:
            data_parallel_group = mesh_data_parallel
    if data_parallel_group is not None and not isinstance(data_parallel_group, dist.ProcessGroup):
        raise ConfigError(
            f"data_parallel_group must be a torch.distributed ProcessGroup (the ranks that hold the same "
            f"stages in every replica), got {type(data_parallel_group).__name__}"
        )
    if data_parallel_group is not None and dist.get_rank(data_parallel_group) < 0:
        raise ConfigError(
            f"data_parallel_group: rank {dist.get_rank()} is not a member of it; pass the group of the "
            "ranks that hold this rank's stages in the other replicas"
        )
    return process_group, data_parallel_group


@dataclass(frozen=True)
class _Bucket:
    params: tuple[nn.Parameter, ...]
    num_bytes: int


def _buckets(params: Iterable[nn.Parameter], bucket_bytes: int) -> tuple[_Bucket, ...]:
    """Consecutive parameters of one dtype and device, up to `bucket_bytes` each (a larger
    parameter gets a bucket of its own). Every replica builds the same list from the same
    parameter order, which the all-reduces rely on."""
    result: list[_Bucket] = []
    current: list[nn.Parameter] = []
    size = 0
    for param in params:
        num_bytes = local(param).numel() * param.element_size()  # a DTensor's own shard
        if current and (
            size + num_bytes > bucket_bytes
            or param.dtype != current[0].dtype
            or param.device != current[0].device
        ):
            result.append(_Bucket(tuple(current), size))
            current, size = [], 0
        current.append(param)
        size += num_bytes
    if current:
        result.append(_Bucket(tuple(current), size))
    return tuple(result)


def _by_stage(
    params: Sequence[nn.Parameter], stage_params: Mapping[int, Sequence[nn.Parameter]], bucket_bytes: int
) -> dict[int, tuple[_Bucket, ...]]:
    """Each stage's buckets (its parameters in `params` order), or {} where the stages do not
    partition `params` exactly (a parameter two local stages share is complete only after both)."""
    owner: dict[int, int] = {}
    for stage, held in stage_params.items():
        for param in held:
            if param.requires_grad:
                if id(param) in owner and owner[id(param)] != stage:
                    return {}
                owner[id(param)] = stage
    if set(owner) != {id(p) for p in params}:
        return {}
    return {
        stage: buckets
        for stage in stage_params
        if (buckets := _buckets([p for p in params if owner[id(p)] == stage], bucket_bytes))
    }


class DataParallel:
    """Averages each step's gradient contribution over the replicas of a data-parallel group.

    Per step (see docs/decisions.md, "data-parallel gradients"): `set_aside_gradients` before the
    schedule; `reduce_losses` after the pipeline's own loss reduction; then either
    `average_gradients` or, to drop the step, `restore_set_aside`.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        watchdog: Watchdog,
        params: Sequence[nn.Parameter],
        *,
        bucket_bytes: int = BUCKET_BYTES,
        reduced_in_schedule: bool = False,
        stage_params: Mapping[int, Sequence[nn.Parameter]] | None = None,
    ) -> None:
        self._group = group
        self._watchdog = watchdog
        self._collectives = Collectives(group, dist.get_process_group_ranks(group), device, watchdog)
        self._collectives_device = device
        self.rank = dist.get_rank(group)
        self.num_replicas = dist.get_world_size(group)
        self._params = tuple(p for p in params if p.requires_grad)
        # Under full sharding the schedule reduce-scatters every gradient itself (full_shard.py):
        # nothing is left to all-reduce, but a step's contribution is still set aside and added
        # back (or dropped) here.
        self._reduced_in_schedule = reduced_in_schedule
        self._seeded = 1.0  # the weight the schedule's reduce-scatters were seeded with
        self._buckets = () if reduced_in_schedule else _buckets(self._params, bucket_bytes)
        self._set_aside: list[Tensor | None] | None = None
        self._stage_buckets = (
            {}
            if reduced_in_schedule or stage_params is None
            else _by_stage(self._params, stage_params, bucket_bytes)
        )
        self._rows = 0.0
        self._in_flight: list[tuple[_Bucket, Tensor, dist.Work | None]] = []

    @property
    def group(self) -> dist.ProcessGroup:
        """The ranks that hold this rank's stages in every replica, this one included."""
        return self._group

    @property
    def num_buckets(self) -> int:
        """All-reduces per step (per stage's buckets when overlapped)."""
        if self._stage_buckets:
            return sum(len(buckets) for buckets in self._stage_buckets.values())
        return len(self._buckets)

    @property
    def overlaps(self) -> bool:
        """Whether each stage's gradients are all-reduced as soon as its last backward of the
        step is done (`after_last_backward`), overlapping the rest of the schedule."""
        return bool(self._stage_buckets)

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages whose gradients `after_last_backward` reduces (the executor's `StageHooks`)."""
        return tuple(self._stage_buckets)

    def begin_step(self, rows: int) -> None:
        """A step on `rows` local rows starts: the overlapped all-reduces sum `rows` x this
        step's gradients (the global row count is known only after the schedule)."""
        self._rows = float(rows)
        self._in_flight = []

    def before_first_forward(self, stage: int) -> None:
        """Nothing: replicated weights are always whole."""

    def after_last_backward(self, stage: int) -> None:
        """Start the all-reduce of `stage`'s gradients of this step (its last B or W ran)."""
        for bucket in self._stage_buckets[stage]:
            self._in_flight.append(self._start(bucket, self._rows))

    def _start(self, bucket: _Bucket, factor: float) -> tuple[_Bucket, Tensor, dist.Work | None]:
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in bucket.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        wide = reduce_dtype(flat.dtype)
        if wide != flat.dtype:
            flat = flat.to(wide)
        flat.mul_(factor)
        return bucket, flat, dist.all_reduce(flat, group=self._group, async_op=True)

    def check_replicas_agree(self, pipeline_rank: int, num_pipeline_ranks: int, schedule: str) -> None:
        """Refuse (on every rank alike) replicas whose stages or parameters differ: their
        bucketed all-reduces would pair unrelated tensors."""
        layout = hashlib.sha256(
            repr([(tuple(p.shape), str(p.dtype)) for p in self._params]).encode()
        ).hexdigest()[:16]
        mine = (pipeline_rank, num_pipeline_ranks, schedule, layout)
        gathered = self._collectives.all_gather_object(mine, what="data-parallel handshake")
        if any(other != mine for other in gathered):
            raise ConfigError(
                f"data_parallel_group: its members do not hold the same stages (pipeline rank, pipeline "
                f"ranks, schedule, parameter layout per replica: {gathered}); every member must be the "
                "same pipeline rank of an identically built pipeline (a DeviceMesh's 'dp' dim is)"
            )

    def set_aside_gradients(self) -> None:
        """Move `.grad` out of the way so the schedule writes only this step's contribution."""
        self._set_aside = [p.grad for p in self._params]
        for param in self._params:
            param.grad = None

    def restore_set_aside(self) -> None:
        """Drop this step's contribution: the gradients are what they were before the step."""
        self._wait(self._in_flight)  # every replica started them: finish, then drop the sums
        self._in_flight = []
        if self._set_aside is None:
            return
        for param, previous in zip(self._params, self._set_aside, strict=True):
            param.grad = previous
        self._set_aside = None

    def reduce_losses(self, losses: Tensor, rows: int) -> tuple[Tensor, float]:
        """Per-micro-batch losses (each replica's summing to its own batch mean) → the same
        over the global batch on every replica, and this replica's weight `rows / total rows`."""
        count = torch.tensor([float(rows)], dtype=torch.float64, device=losses.device)
        packed = torch.cat([losses.detach().to(torch.float64) * rows, count])
        self._collectives.all_reduce_sum(packed, what="data-parallel loss all-reduce")
        total_rows = float(packed[-1].item())
        return (packed[:-1] / total_rows).to(losses.dtype), rows / total_rows

    def _wait(self, pending: Sequence[tuple[_Bucket, Tensor, dist.Work | None]]) -> None:
        for index, (_, _, work) in enumerate(pending):
            if work is not None:
                self._watchdog.wait(
                    work,
                    what=f"data-parallel gradient all-reduce (bucket {index} of {len(pending)})",
                    peer=None,
                )

    def weight_of(self, rows: int) -> float:
        """This replica's share of the global batch, `rows / global rows` (a collective over
        "dp", for schedules that reduce gradients before the losses are agreed)."""
        count = torch.tensor([float(rows)], dtype=torch.float64, device=self._collectives_device)
        self._collectives.all_reduce_sum(count, what="data-parallel row count all-reduce")
        self._seeded = rows / float(count.item())
        return self._seeded

    @property
    def in_flight(self) -> bool:
        """Whether this step's all-reduces were started during the schedule (overlapped)."""
        return bool(self._in_flight)

    def average_gradients(self, weight: float) -> None:
        """Sum `weight` x this step's gradients over the replicas; add back what was set aside."""
        self.reduce_gradients(weight)
        self.add_back_set_aside()

    def reduce_gradients(self, weight: float) -> None:
        """`.grad` = the sum over the replicas of `weight` x this step's gradient."""
        if self._reduced_in_schedule:
            # The schedule reduce-scattered the shards' sums of `_seeded` x the gradient (the
            # same rows / global rows as `weight`): what is left is fp16's 1 / loss scale.
            factor = weight / self._seeded
            if factor != 1.0:
                for param in self._params:
                    if param.grad is not None:
                        local(param.grad).mul_(factor)
            return
        if self._in_flight:
            # Started during the schedule, each summing rows x gradients: now divide by the rows.
            pending, self._in_flight = self._in_flight, []
            after = weight / self._rows
        else:
            pending = [self._start(bucket, weight) for bucket in self._buckets]
            after = 1.0
        self._wait(pending)
        for bucket, flat, _ in pending:
            if after != 1.0:
                flat.mul_(after)
            offset = 0
            for param in bucket.params:
                shard = local(param)
                averaged = flat[offset : offset + shard.numel()].view_as(shard).to(shard.dtype)
                offset += shard.numel()
                if is_sharded(param):
                    # A tensor-parallel parameter's gradient stays a DTensor of the same layout:
                    # the averaged shard goes into its local part.
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    local(param.grad).copy_(averaged)
                else:
                    param.grad = averaged

    def add_back_set_aside(self) -> None:
        """Add what the gradients held before the step to this step's (averaged) contribution."""
        set_aside = self._set_aside
        self._set_aside = None
        if set_aside is None:
            return
        for param, previous in zip(self._params, set_aside, strict=True):
            if previous is not None and param.grad is not None:
                # In place, so the tensor the user (or an optimizer) holds as `.grad` stays it.
                param.grad = previous.add_(param.grad)
