"""`pipefold train --adaptive`: the chooser for the job's GPT and pipeline, checked on every
batch shape the data can give before the first step.

    runner = adaptive_runner(config, pipe, shapes)   # on every rank, in set_up
    choice = runner.prepare(inputs); pipe.step(inputs, targets); runner.finish(choice)

The costs per length are the built-in GPT's FLOP estimate (`pipefold.plan.gpt_costs`: blocks
linear in the length, attention quadratic) at an assumed device rate and per-layer overhead;
only their ratios steer the choice, and the measured re-check (`AdaptiveSpace.trial_steps`)
corrects a ranking the estimate gets wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipefold.errors import ConfigError, ScheduleError
from pipefold.job.config import TrainConfig
from pipefold.plan import gpt_costs
from pipefold.plan.adaptive import AdaptiveChooser, AdaptiveSpace
from pipefold.plan.costs import ModelCosts
from pipefold.plan.estimate import PRECISION_BYTES
from pipefold.plan.orders import family_placement
from pipefold.plan.space import is_asynchronous
from pipefold.runtime import Pipeline
from pipefold.runtime.adaptive import AdaptiveRunner
from pipefold.schedule import names

__all__ = ["adaptive_runner", "candidate_families"]

_ASSUMED_FLOPS = {"cpu": 2e10, "cuda": 5e13}
"""FLOP/s the estimate assumes per device type: a sustained rate well below peak."""

_ASSUMED_OVERHEAD_S = {"cpu": 1e-4, "cuda": 2e-5}
"""Seconds each layer's action costs besides its FLOPs (launch, Python): what makes many small
micro-batches slow."""

_SERIAL = ("naive",)
"""Families that run one micro-batch at a time through the whole pipeline: never faster."""


def candidate_families(num_ranks: int, num_virtual: int, placement: tuple[int, ...]) -> tuple[str, ...]:
    """The flush families whose stage placement is `placement`: what a running pipeline may switch to."""
    return tuple(
        name for name in names()
        if name not in _SERIAL and not is_asynchronous(name)
        and _placement(name, num_ranks, num_virtual) == placement
    )


def adaptive_runner(config: TrainConfig, pipe: Pipeline, shapes: Sequence[tuple[int, int]]) -> AdaptiveRunner:
    """The job's runner; every (rows, length) in `shapes` is priced now, so a batch no choice fits
    is refused (`BatchTooLong`) before the first step."""
    schedule = pipe.schedule
    num_ranks = schedule.num_ranks
    num_virtual = schedule.num_stages // num_ranks
    bounds = tuple(pipe.partition.bounds)
    most = config.schedule.num_microbatches
    m = config.model
    device = pipe.device.type
    value_bytes, parameter_bytes = PRECISION_BYTES[config.precision]

    def costs_at(length: int) -> ModelCosts:
        return gpt_costs(
            num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, seq_len=length,
            flops=_ASSUMED_FLOPS.get(device, _ASSUMED_FLOPS["cuda"]), bytes_per_value=value_bytes,
            parameter_bytes_per_value=parameter_bytes, tie_embeddings=m.tie_embeddings,
            overhead_s=_ASSUMED_OVERHEAD_S.get(device, _ASSUMED_OVERHEAD_S["cuda"]),
        )

    space = AdaptiveSpace(
        num_ranks=num_ranks, num_virtual=num_virtual, bounds=bounds,
        families=candidate_families(num_ranks, num_virtual, schedule.placement),
        microbatch_counts=tuple(d for d in range(1, most + 1) if most % d == 0),
        memory_limit=config.schedule.memory_limit_bytes, memory_hint="schedule.memory_limit",
    )
    chooser = AdaptiveChooser(costs_at, space)
    for rows, length in shapes:
        chooser.ranked(rows, length)
    return AdaptiveRunner(pipe, chooser)


def _placement(name: str, num_ranks: int, num_virtual: int) -> tuple[int, ...] | None:
    try:
        return family_placement(name, num_ranks, num_virtual)
    except (ScheduleError, ConfigError):  # a family with no order at this size is no candidate
        return None
