"""The adaptive chooser of `pipefold train --adaptive` for the built-in GPT, without torch: the job's
configuration refuses a batch no choice fits before any process starts, and every rank builds the
same chooser at set-up (pipefold.job.adaptive).

    chooser = gpt_chooser(config.model, config.schedule, config.compute_precision, bounds=(0, 3, 6),
                          placement=(0, 1), device_type="cpu")
    chooser.ranked(rows, seq_len)          # BatchTooLong where no choice fits schedule.memory_limit

The costs per length are the built-in GPT's FLOP estimate (`pipefold.plan.gpt_costs`: blocks
linear in the length, attention quadratic) at an assumed device rate and per-layer overhead;
only their ratios steer the choice, and the measured re-check (`AdaptiveSpace.trial_steps`)
corrects a ranking the estimate gets wrong. Memory does not depend on the assumed rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipefold.errors import ConfigError, ScheduleError
from pipefold.job.sections import ModelConfig, ScheduleConfig
from pipefold.plan import gpt_costs
from pipefold.plan.adaptive import AdaptiveChooser, AdaptiveSpace
from pipefold.plan.costs import ModelCosts
from pipefold.plan.estimate import PRECISION_BYTES
from pipefold.plan.orders import family_placement
from pipefold.plan.space import is_asynchronous
from pipefold.plan.tensor import split_costs
from pipefold.schedule import names
from pipefold.simulate import Link

__all__ = ["candidate_families", "gpt_chooser", "longest_batch", "replica_rows"]

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


def gpt_chooser(
    model: ModelConfig,
    schedule: ScheduleConfig,
    precision: str,
    *,
    bounds: Sequence[int],
    placement: tuple[int, ...],
    device_type: str,
) -> AdaptiveChooser:
    """The chooser for the GPT `model` cut at `bounds`, its stages placed as `placement`, run
    with `schedule`'s ranks, micro-batches (the most a choice uses) and memory limit."""
    m = model
    num_ranks = schedule.ranks
    num_virtual = len(placement) // num_ranks
    most = schedule.num_microbatches
    value_bytes, parameter_bytes = PRECISION_BYTES[precision]
    flops = _ASSUMED_FLOPS.get(device_type, _ASSUMED_FLOPS["cuda"])
    overhead_s = _ASSUMED_OVERHEAD_S.get(device_type, _ASSUMED_OVERHEAD_S["cuda"])

    link = Link()
    tp, sequence_parallel = schedule.tensor_parallel, schedule.sequence_parallel

    def costs_at(length: int) -> ModelCosts:
        costs = gpt_costs(
            num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, seq_len=length, flops=flops,
            bytes_per_value=value_bytes, parameter_bytes_per_value=parameter_bytes,
            tie_embeddings=m.tie_embeddings, overhead_s=overhead_s,
        )
        # One tp rank's share: what each rank of a stage holds and computes.
        return split_costs(costs, tp, link, sequence_parallel=sequence_parallel)

    space = AdaptiveSpace(
        num_ranks=num_ranks, num_virtual=num_virtual, bounds=tuple(bounds),
        families=candidate_families(num_ranks, num_virtual, placement),
        microbatch_counts=tuple(d for d in range(1, most + 1) if most % d == 0),
        memory_limit=schedule.memory_limit_bytes, memory_hint="schedule.memory_limit", link=link,
        num_data_parallel=schedule.data_parallel, num_tensor_parallel=tp, sequence_parallel=sequence_parallel,
    )
    return AdaptiveChooser(costs_at, space)


def longest_batch(schedule: ScheduleConfig, batch_size: int, seq_len: int, bucketed: bool) -> tuple[int, int]:
    """(rows of one replica, length) of the job's batch of the longest sequences: `seq_len`, and
    `batch_size` rows (bucketed by length, rounded down to a multiple of the micro-batches of
    every replica, as `LengthBuckets` does) shared by the replicas."""
    rows = batch_size
    if bucketed:
        multiple = schedule.num_microbatches * schedule.data_parallel
        rows = max(multiple, rows // multiple * multiple)
    return replica_rows(rows, schedule.data_parallel), seq_len


def replica_rows(rows: int, num_data_parallel: int) -> int:
    """One replica's rows of a global batch of `rows` (`pipefold.job.setup.shard_rows` splits
    it evenly; the chooser prices a replica's pipeline)."""
    return rows // num_data_parallel


def _placement(name: str, num_ranks: int, num_virtual: int) -> tuple[int, ...] | None:
    try:
        return family_placement(name, num_ranks, num_virtual)
    except (ScheduleError, ConfigError):  # a family with no order at this size is no candidate
        return None
