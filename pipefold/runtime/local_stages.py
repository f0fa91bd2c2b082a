"""This rank's stages, built before any communication: its layers materialized on its device
(whole first, with the same seed on every tensor-parallel peer, then split), cast for a pure
precision, and wrapped as `Stage`s with their recomputation (selective: the attention cores)
and compilation.

    modules, stages = build_local_stages(layers, schedule, partition, rank, device, dims, layout, runtime)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipefold.model import LayerLike, Partition, materialize
from pipefold.runtime.arguments import resolve_recompute
from pipefold.runtime.options import COMPUTE_DTYPES, PURE_PRECISIONS, LayoutOptions, RuntimeOptions
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.selective import recompute_attention_cores
from pipefold.runtime.stage import Stage
from pipefold.schedule import Schedule

__all__ = ["build_local_stages"]


def build_local_stages(
    layers: Sequence[LayerLike],
    schedule: Schedule,
    partition: Partition,
    rank: int,
    device: torch.device,
    dims: ParallelDims,
    layout: LayoutOptions,
    runtime: RuntimeOptions,
) -> tuple[dict[int, nn.Module], dict[int, Stage]]:
    """(this rank's modules by layer index, its stages by stage index, in schedule order)."""
    local_stages = schedule.stages_of(rank)
    indices = [i for s in local_stages for i in partition.layers_of(s)]
    modules = materialize(layers, indices, device, seed=layout.seed)
    dims.split_layers(modules)
    if runtime.precision in PURE_PRECISIONS:
        for module in modules.values():  # in place: a parameter two layers share stays one
            module.to(torch.bfloat16)
    recompute_all, recompute_layers = resolve_recompute(layout.recompute)
    selective = layout.recompute == "selective"
    compute_dtype = COMPUTE_DTYPES[runtime.precision]
    stages: dict[int, Stage] = {}
    for s in local_stages:
        span = partition.layers_of(s)
        stage = Stage(
            s,
            span,
            [layers[i] for i in span],
            [modules[i] for i in span],
            is_first=s == 0,
            is_last=s == schedule.num_stages - 1,
            recompute_all=recompute_all,
            recompute_layers=recompute_layers,
            compile_layers=runtime.compile,
        )
        if selective and recompute_attention_cores(stage.modules):
            stage.recomputes = True  # its backward unpacks recomputed activations
        # A tp peer's outputs must be plain tensors (not DTensors) to cross the boundary.
        stage.check_plain_output = dims.tensor_parallel is not None
        stage.compute_dtype = compute_dtype
        stage.device_type = device.type
        stages[s] = stage
    return modules, stages
