"""Cutting a layer sequence into contiguous stages: `partition`, with `Partition` and `balance`.

Every method reduces to per-layer weights (1 per layer, parameter counts, 1 per
matching layer, measured seconds) and one exact solver, `balance`: minimise the
slowest stage, where stage s takes `sum(weights of its layers) / speed of its rank`.
`Partition`, `balance` and `stage_times` live in the torch-free `pipefold.balance`
(the planner uses them without a model; see docs/decisions.md, "Balance tie-break") and
are re-exported here unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from torch import nn

from pipefold.balance import Partition, balance, check_weights, stage_times
from pipefold.errors import PartitionError
from pipefold.model.build import as_layers, meta_layers
from pipefold.model.spec import LayerLike, layer_name

__all__ = ["Partition", "partition", "balance", "stage_times", "METHODS"]

METHODS = ("uniform", "parameters", "type:<regex>", "profile")
"""The named methods of `partition`; an explicit list of per-stage layer counts, or a Partition, also work."""


def _stage_speeds(
    num_stages: int,
    speeds: Sequence[float] | None,
    placement: Sequence[int] | None,
) -> list[float]:
    if speeds is not None:
        for rank, speed in enumerate(speeds):
            if not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed <= 0:
                raise PartitionError(
                    f"speeds[{rank}] = {speed!r}; relative device speeds must be finite and > 0"
                )
    if placement is None:
        if speeds is None:
            return [1.0] * num_stages
        if len(speeds) != num_stages:
            raise PartitionError(
                f"speeds has {len(speeds)} entries (one per rank) but there are {num_stages} stages; "
                f"pass placement=[rank of each stage] (e.g. schedule.placement)"
            )
        return [float(s) for s in speeds]
    if len(placement) != num_stages:
        raise PartitionError(
            f"placement has {len(placement)} entries but there are {num_stages} stages; "
            f"give the rank of each stage"
        )
    num_ranks = len(speeds) if speeds is not None else max(placement) + 1
    for stage, rank in enumerate(placement):
        if not isinstance(rank, int) or not 0 <= rank < num_ranks:
            raise PartitionError(
                f"placement[{stage}] = {rank!r} is not a rank; "
                f"speeds has {num_ranks} ranks (0..{num_ranks - 1})"
            )
    if speeds is None:
        return [1.0] * num_stages
    return [float(speeds[rank]) for rank in placement]


def _type_weights(layers: Sequence[LayerLike], pattern: str) -> list[float]:
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise PartitionError(f"method 'type:{pattern}' has an invalid regex: {error}") from error
    names = [layer_name(layer) for layer in layers]
    weights = [1.0 if regex.search(name) else 0.0 for name in names]
    if not any(weights):
        raise PartitionError(
            f"method 'type:{pattern}' matches no layer class (case-sensitive); "
            f"the classes are {sorted(set(names))}"
        )
    return weights


def _parameter_weights(layers: Sequence[LayerLike]) -> list[float]:
    # Counted on meta, so no rank allocates the model to partition it. A tied module
    # counts at every occurrence: every stage that holds one stores the whole module.
    modules: list[nn.Module] = meta_layers(layers)
    return [float(sum(p.numel() for p in module.parameters())) for module in modules]


def partition(
    layers: nn.Sequential | Sequence[LayerLike],
    num_stages: int,
    method: str | Sequence[int] | Partition = "uniform",
    *,
    costs: Sequence[float] | None = None,
    speeds: Sequence[float] | None = None,
    placement: Sequence[int] | None = None,
) -> Partition:
    """Cut `layers` into `num_stages` contiguous stages.

    `method`: `"uniform"` (even layer counts), `"parameters"` (even parameter counts),
    `"type:<regex>"` (even counts of layers whose class name matches, case-sensitive),
    `"profile"` (least slowest-stage time for per-layer `costs`, e.g. measured by
    `pipefold.runtime.profile`), an explicit list of per-stage layer
    counts, or a `Partition`. `speeds[rank]` are relative device speeds; stage s runs
    on rank `placement[s]` (default: stage s on rank s) and takes weight / speed.
    """
    description = as_layers(layers)
    num_layers = len(description)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise PartitionError(f"num_stages = {num_stages!r}; it must be an integer >= 1")
    if num_stages > num_layers:
        raise PartitionError(
            f"cannot cut {num_layers} layers into {num_stages} stages: every stage needs at least one layer; "
            f"use at most {num_layers} stages, or describe the model with more, smaller layers"
        )
    if not (isinstance(method, str) and method == "profile") and costs is not None:
        raise PartitionError(f"costs= is only used by method='profile', but method is {method!r}")

    if isinstance(method, Partition) or (isinstance(method, Sequence) and not isinstance(method, str)):
        result = method if isinstance(method, Partition) else Partition.from_counts(list(method))
        if result.num_stages != num_stages:
            raise PartitionError(
                f"partition {result} has {result.num_stages} stages but num_stages is {num_stages}"
            )
        if result.num_layers != num_layers:
            raise PartitionError(
                f"partition {result} covers {result.num_layers} layers but the model has {num_layers}; "
                f"the per-stage counts must sum to {num_layers}"
            )
        return result
    if not isinstance(method, str):
        raise PartitionError(
            f"method must be a name {list(METHODS)}, a list of per-stage counts or a Partition, "
            f"got {method!r}"
        )

    stage_speeds = _stage_speeds(num_stages, speeds, placement)
    if method == "uniform":
        weights = [1.0] * num_layers
    elif method == "parameters":
        weights = _parameter_weights(description)
    elif method.startswith("type:"):
        weights = _type_weights(description, method.removeprefix("type:"))
    elif method == "profile":
        if costs is None:
            raise PartitionError(
                "method='profile' needs per-layer costs= (seconds); measure them with "
                "[p.total_s for p in pipefold.runtime.profile(layers, sample)]"
            )
        weights = check_weights(costs, "costs", num_layers)
    else:
        raise PartitionError(f"unknown partition method {method!r}; use one of {list(METHODS)}")
    return balance(weights, num_stages, stage_speeds)
