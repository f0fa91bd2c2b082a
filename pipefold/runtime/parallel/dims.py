"""A pipeline rank's parallel dimensions: its pipeline group, its replicas ("dp") and its
tensor-parallel peers ("tp"), resolved from `ParallelOptions` before any communication.

    dims = ParallelDims.of(ParallelOptions(process_group=mesh, tensor_parallel=plan))
    device = dims.check_device(device)           # the groups' backends fit the device
    dims.split_layers(modules)                   # tensor parallel: each layer by the plan
    data_parallel = dims.data_parallel(device, watchdog, params)   # None without "dp"

`Pipeline` holds one; `pipe.process_group`, `pipe.data_parallel_group` and
`pipe.tensor_parallel_group` read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import TensorMeta
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.options import ParallelOptions
from pipefold.runtime.parallel.data_parallel import DataParallel, split_mesh
from pipefold.runtime.parallel.sequence_parallel import sequence_sharded_outputs, shard_boundaries
from pipefold.runtime.parallel.tensor_parallel import (
    TensorParallelPlan,
    apply_tensor_parallel,
    check_plan,
    plan_for,
    tensor_parallel_mesh,
)

__all__ = ["ParallelDims", "resolve_group"]


def resolve_group(process_group: Any) -> tuple[dist.ProcessGroup | None, tuple[int, ...]]:
    """The pipeline's group and its members' global ranks; (None, (rank,)) for one process.

    A `DeviceMesh` has already been reduced to its "pp" group by `split_mesh`.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, (0,)
        process_group = dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise ConfigError(
            f"process_group must be a torch.distributed ProcessGroup or a DeviceMesh with a 'pp' dim, "
            f"got {type(process_group).__name__}"
        )
    if dist.get_world_size(process_group) == 1:
        return None, (dist.get_rank(),)
    return process_group, tuple(dist.get_process_group_ranks(process_group))


class ParallelDims:
    """The pipeline group, data-parallel group and tensor-parallel mesh of this rank."""

    def __init__(
        self,
        pipeline_group: dist.ProcessGroup | None,
        ranks: Sequence[int],
        data_parallel_group: dist.ProcessGroup | None,
        tensor_parallel_mesh: Any,
        tensor_parallel: TensorParallelPlan | None,
    ) -> None:
        self.pipeline_group = pipeline_group
        """The pipeline's own group (its "pp" ranks); None in one process."""
        self.ranks = tuple(ranks)
        """The world ranks of the pipeline's ranks, in pipeline-rank order."""
        self.rank = 0 if pipeline_group is None else dist.get_rank(pipeline_group)
        """This rank's index in the pipeline."""
        self.data_parallel_group = data_parallel_group
        """This rank's replicas along "dp", itself included; None without data parallelism."""
        self.tensor_parallel_mesh = tensor_parallel_mesh
        """The 1-D "tp" mesh this rank's layers are split over; None without tensor parallelism."""
        self.tensor_parallel = tensor_parallel
        """The tensor-parallel plan (None without)."""
        self.tensor_parallel_group: dist.ProcessGroup | None = (
            None if tensor_parallel_mesh is None else tensor_parallel_mesh.get_group()
        )
        """This stage's tensor-parallel ranks; None without tensor parallelism."""

    @classmethod
    def of(cls, options: ParallelOptions) -> ParallelDims:
        """Resolve and check `options`' groups (no communication)."""
        check_plan(options.tensor_parallel, options.process_group)
        pipeline_group, data_parallel_group = split_mesh(options.process_group, options.data_parallel_group)
        group, ranks = resolve_group(pipeline_group)
        if data_parallel_group is not None and dist.get_world_size(data_parallel_group) == 1:
            data_parallel_group = None
        mesh = tensor_parallel_mesh(options.process_group)
        return cls(group, ranks, data_parallel_group, mesh, options.tensor_parallel)

    @property
    def num_ranks(self) -> int:
        """The pipeline's ranks ("pp")."""
        return len(self.ranks)

    @property
    def num_data_parallel(self) -> int:
        """Replicas of the pipeline ("dp"; 1 without data parallelism)."""
        return 1 if self.data_parallel_group is None else dist.get_world_size(self.data_parallel_group)

    @property
    def num_tensor_parallel(self) -> int:
        """Ranks each layer is split over ("tp"; 1 without tensor parallelism)."""
        return 1 if self.tensor_parallel_mesh is None else int(self.tensor_parallel_mesh.size())

    @property
    def communicates(self) -> bool:
        """Whether this rank talks to any other (pipeline peers or replicas)."""
        return self.pipeline_group is not None or self.data_parallel_group is not None

    def check_device(self, device: torch.device | str | None) -> torch.device:
        """The device to compute on (default `cuda:<LOCAL_RANK>` where CUDA is available, else
        cpu), refused where the pipeline's or the replicas' backend cannot serve it."""
        resolved = _resolve_device(device, self.pipeline_group)
        if self.data_parallel_group is not None:
            _resolve_device(resolved, self.data_parallel_group)
        return resolved

    def splits(self, index: int, module: nn.Module) -> bool:
        """Whether the tensor-parallel plan splits layer `index` (`module`, a meta build is fine)."""
        return self.tensor_parallel is not None and bool(plan_for(self.tensor_parallel, index, module))

    def split_layers(self, modules: Mapping[int, nn.Module]) -> None:
        """Split every layer of `modules` (index -> whole module, built with the same seed on
        every tp rank) by the plan: the shards are exactly the unsplit model's
        (docs/decisions.md, "tensor parallel x pipeline")."""
        if self.tensor_parallel is not None:
            apply_tensor_parallel(modules, self.tensor_parallel_mesh, self.tensor_parallel)

    def sequence_sharded(self, meta: Sequence[nn.Module]) -> dict[int, int]:
        """Layer outputs a tp rank holds split along the sequence (docs/decisions.md, "sequence
        parallel x pipeline"): layer index -> the dim split."""
        if self.tensor_parallel is None:
            return {}
        return sequence_sharded_outputs(self.tensor_parallel, meta)

    def shard_boundaries(self, boundaries: list[TensorMeta], sharded: Mapping[int, int]) -> list[TensorMeta]:
        """`boundaries` as a tp rank holds them: 1/tp of the traced shape after `sharded` layers."""
        if not sharded:
            return boundaries
        return shard_boundaries(boundaries, dict(sharded), self.num_tensor_parallel)

    def processes_beside(self) -> int:
        """Processes that compute beside each pipeline rank: its replicas and its tp peers,
        itself included (they share the host's cores, docs/decisions.md, "shared cores")."""
        return self.num_data_parallel * self.num_tensor_parallel

    def data_parallel(
        self,
        device: torch.device,
        watchdog: Watchdog,
        params: Sequence[nn.Parameter],
        schedule_name: str,
        *,
        reduced_in_schedule: bool = False,
        stage_params: Mapping[int, Sequence[nn.Parameter]] | None = None,
    ) -> DataParallel | None:
        """The gradient averaging over the replicas, checked to hold the same stages on each
        (a collective over "dp"); None without data parallelism."""
        if self.data_parallel_group is None:
            return None
        data_parallel = DataParallel(
            self.data_parallel_group, device, watchdog, params, reduced_in_schedule=reduced_in_schedule,
            stage_params=stage_params,
        )
        data_parallel.check_replicas_agree(self.rank, self.num_ranks, schedule_name)
        return data_parallel


def _resolve_device(device: torch.device | str | None, group: dist.ProcessGroup | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            resolved = torch.device("cpu")
    else:
        resolved = torch.device(device)
    if group is not None:
        backend = str(dist.get_backend(group)).lower()
        if resolved.type == "cuda" and "nccl" not in backend:
            raise ConfigError(
                f"device {resolved} needs the nccl backend but the process group uses {backend}; "
                "init_process_group('nccl') for GPUs, or pass LayoutOptions(device='cpu')"
            )
        if resolved.type == "cpu" and "gloo" not in backend:
            raise ConfigError(
                f"device cpu needs the gloo backend but the process group uses {backend}; "
                "init_process_group('gloo') on CPU, or pass LayoutOptions(device=<a CUDA device>)"
            )
    return resolved
