"""Choosing, per batch shape, how a running pipeline takes that batch: the micro-batch count (and
so their size), the schedule family and the recomputation, from the cost model at the batch's
length, within a memory limit; cached per length bucket and re-checked against measured steps.

    chooser = AdaptiveChooser(lambda length: gpt_costs(..., seq_len=length), AdaptiveSpace(
        num_ranks=2, num_virtual=1, bounds=(0, 3, 6), families=("1f1b", "gpipe", "zb-h1"),
        microbatch_counts=(1, 2, 4, 8), memory_limit=2**30))
    choice = chooser.choose(rows=16, seq_len=200)   # priced at the bucket length 256, then cached
    ...run the step as `choice` says...
    chooser.observe(choice, measured_step_s)        # may move the bucket to its runner-up

The partition (`bounds`) and the stage placement are fixed: a running pipeline keeps its stages,
so only families of its placement compete (`pipefold.runtime.adaptive` switches between them).
The re-check is `--schedule auto`'s trial, per bucket: the predicted best runs
`AdaptiveSpace.trial_steps` steps, then the runner-up as many, and the bucket keeps whichever
measured the shorter median step. No torch: `pipefold train --adaptive` builds one chooser on
every rank, and every rank, fed the same measurements, chooses alike (with data-parallel
replicas or tensor-parallel peers, the slowest pipeline's step: `pipefold.runtime.adaptive`).
`rows` are one replica's; `costs_at` gives one tensor-parallel rank's costs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipefold.errors import ConfigError, ScheduleError
from pipefold.plan.costs import ModelCosts
from pipefold.plan.orders import family_schedule
from pipefold.plan.result import Candidate
from pipefold.plan.search import evaluate
from pipefold.plan.space import Config
from pipefold.plan.units import format_bytes
from pipefold.simulate import Link

__all__ = [
    "RECOMPUTE_CHOICES",
    "AdaptiveChoice",
    "AdaptiveChooser",
    "AdaptiveSpace",
    "BatchTooLong",
    "length_bucket",
]

RECOMPUTE_CHOICES = ("none", "full")
"""What the chooser may recompute: nothing, or every stage (`LayoutOptions.recompute`)."""


def length_bucket(seq_len: int) -> int:
    """The bucket of a sequence length: the smallest power of two at least as long. A bucket's
    choice is priced at its bucket length, so it fits every batch in the bucket."""
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} is not a sequence length; give one >= 1")
    return 1 << (seq_len - 1).bit_length()


@dataclass(frozen=True)
class AdaptiveChoice:
    """How one (rows, length bucket) runs, and what the cost model predicts for it."""

    rows: int
    bucket: int
    """The length bucket (`length_bucket`) the costs were taken at."""
    schedule: str
    num_microbatches: int
    microbatch_rows: int
    """Rows of the largest micro-batch."""
    recompute: str
    """"none" or "full" (every stage keeps only its input and recomputes in the backward)."""
    predicted_step_s: float
    peak_memory: int
    """Predicted bytes of the fullest rank: weights, gradients, optimizer state, activations."""
    activation_bytes: int
    """Predicted peak activation bytes of the fullest rank."""

    @property
    def label(self) -> str:
        """How the run summary names it, e.g. "1f1b m=4 recompute=none"."""
        return f"{self.schedule} m={self.num_microbatches} recompute={self.recompute}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule, "num_microbatches": self.num_microbatches,
            "microbatch_rows": self.microbatch_rows, "recompute": self.recompute,
            "predicted_step_s": self.predicted_step_s, "peak_memory": self.peak_memory,
            "activation_bytes": self.activation_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class AdaptiveSpace:
    """What the chooser may pick from, for a pipeline whose stages are fixed."""

    num_ranks: int
    num_virtual: int
    bounds: tuple[int, ...]
    """The running partition: virtual stage s owns layers [bounds[s], bounds[s + 1])."""
    families: tuple[str, ...]
    """Flush families of the pipeline's stage placement."""
    microbatch_counts: tuple[int, ...]
    """Micro-batch counts to try; a batch's rows must divide by the count to use it."""
    recompute: tuple[str, ...] = RECOMPUTE_CHOICES
    memory_limit: float = math.inf
    """Bytes each rank may use (`pipefold.plan` prices them: docs/decisions.md, "Planner memory model")."""
    link: Link = field(default_factory=Link)
    num_data_parallel: int = 1
    """Replicas of the pipeline: the step adds their gradient all-reduce (rows are one replica's)."""
    num_tensor_parallel: int = 1
    """Tensor-parallel ranks per stage; `costs_at` then gives one tp rank's costs (`split_costs`)."""
    sequence_parallel: bool = False
    """Whether `costs_at`'s split is with sequence parallelism (recorded, as `evaluate` does)."""
    trial_steps: int = 3
    """Steps each of a bucket's two best choices runs before the measured verdict; 0: no re-check."""
    memory_hint: str = "the memory limit"
    """How the caller's user names the limit, for the refusal (e.g. "schedule.memory_limit")."""

    def __post_init__(self) -> None:
        degrees = (self.num_ranks, self.num_virtual, self.num_data_parallel, self.num_tensor_parallel)
        if min(degrees) < 1:
            raise ConfigError(
                f"AdaptiveSpace: num_ranks={self.num_ranks}, num_virtual={self.num_virtual}, "
                f"num_data_parallel={self.num_data_parallel}, "
                f"num_tensor_parallel={self.num_tensor_parallel}; "
                "use >= 1"
            )
        if len(self.bounds) != self.num_ranks * self.num_virtual + 1:
            raise ConfigError(
                f"AdaptiveSpace: bounds={list(self.bounds)} describe {len(self.bounds) - 1} stages, the "
                f"pipeline has {self.num_ranks * self.num_virtual}; give one bound per stage plus the end"
            )
        if not self.families or not self.microbatch_counts:
            raise ConfigError("AdaptiveSpace: give at least one family and one micro-batch count")
        if any(m < 1 for m in self.microbatch_counts):
            raise ConfigError(
                f"AdaptiveSpace: microbatch_counts={list(self.microbatch_counts)}; use counts >= 1"
            )
        unknown = [r for r in self.recompute if r not in RECOMPUTE_CHOICES]
        if unknown or not self.recompute:
            raise ConfigError(
                f"AdaptiveSpace: recompute={list(self.recompute)}; use some of {RECOMPUTE_CHOICES}"
            )
        if self.trial_steps < 0:
            raise ConfigError(f"AdaptiveSpace: trial_steps={self.trial_steps}; use >= 0 (0: no re-check)")


class BatchTooLong(ConfigError):
    """No choice runs a batch of this shape within the memory limit."""

    def __init__(self, rows: int, seq_len: int, space: AdaptiveSpace, leanest: AdaptiveChoice) -> None:
        self.rows, self.seq_len, self.leanest = rows, seq_len, leanest
        limit = space.memory_limit
        super().__init__(
            f"a batch of {rows} rows x seq_len={seq_len} (bucket {leanest.bucket}) does not fit "
            f"{space.memory_hint}={format_bytes(limit)} ({limit:.0f} bytes) per rank under any choice: the "
            f"leanest, {leanest.label}, needs {format_bytes(leanest.peak_memory)} "
            f"({leanest.peak_memory} bytes); "
            f"raise {space.memory_hint} to at least that, or give batches of fewer tokens (shorter "
            "sequences or fewer rows: model.seq_len / batch_size), or more ranks"
        )


@dataclass
class _Bucket:
    """One (rows, bucket)'s ranked choices and the measured re-check."""

    options: list[AdaptiveChoice]
    """The predicted best first, then the runner-up (when there is one)."""
    current: int = 0
    measured: dict[str, list[float]] = field(default_factory=dict)
    settled: bool = False
    steps: int = 0
    verdict: dict[str, float] = field(default_factory=dict)
    """The trial's median step per choice when it settled (later steps do not change it)."""


class AdaptiveChooser:
    """Picks a choice per (rows, length bucket) from `costs_at(length)`, per-sample costs of the
    model at that sequence length (`reference_rows` as `ModelCosts` says); see the module docstring."""

    def __init__(self, costs_at: Callable[[int], ModelCosts], space: AdaptiveSpace) -> None:
        self._costs_at = costs_at
        self.space = space
        self._costs: dict[int, ModelCosts] = {}
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def ranked(self, rows: int, seq_len: int) -> list[AdaptiveChoice]:
        """Every choice that fits the memory limit for this shape, fastest predicted first.
        Raises BatchTooLong where none fits."""
        bucket = length_bucket(seq_len)
        choices = self.priced(rows, bucket)
        fitting = [c for c in choices if c.peak_memory <= self.space.memory_limit]
        if not fitting:
            leanest = min(choices, key=lambda c: (c.peak_memory, c.predicted_step_s))
            raise BatchTooLong(rows, seq_len, self.space, leanest)
        # Ties go to fewer micro-batches, then to no recomputation: less overhead for the same time.
        return sorted(fitting, key=lambda c: (c.predicted_step_s, c.num_microbatches, c.recompute != "none"))

    def choose(self, rows: int, seq_len: int) -> AdaptiveChoice:
        """How to run a batch of `rows` x `seq_len` now (priced once per (rows, bucket))."""
        key = (rows, length_bucket(seq_len))
        state = self._buckets.get(key)
        if state is None:
            ranked = self.ranked(rows, seq_len)
            best = ranked[0]
            # The runner-up is the next choice the cost model tells apart from the best (two
            # families with one order at this size are the same run).
            told = (best.predicted_step_s, best.peak_memory)
            others = [c for c in ranked[1:] if (c.predicted_step_s, c.peak_memory) != told]
            options = [best, *others[:1]] if self.space.trial_steps else [best]
            state = self._buckets[key] = _Bucket(options, settled=len(options) == 1)
        return state.options[state.current]

    def observe(self, choice: AdaptiveChoice, step_s: float) -> None:
        """A step run as `choice` took `step_s` (measured; every rank must pass the same value)."""
        state = self._buckets[(choice.rows, choice.bucket)]
        state.steps += 1
        state.measured.setdefault(choice.label, []).append(step_s)
        if state.settled or choice != state.options[state.current]:
            return
        if len(state.measured[choice.label]) < self.space.trial_steps:
            return
        if state.current == 0:
            state.current = 1  # the runner-up's turn
            return
        medians = [statistics.median(state.measured[option.label]) for option in state.options]
        state.current = 0 if medians[0] <= medians[1] else 1
        state.settled = True
        state.verdict = {option.label: median for option, median in zip(state.options, medians, strict=True)}

    def report(self) -> list[dict[str, Any]]:
        """Per (rows, bucket) seen: the choice it runs now, its prediction, the trial's median step
        per choice that decided it (`trial_s`, empty until settled) and every step's median per
        choice run (`measured_s`)."""
        rows: list[dict[str, Any]] = []
        for (num_rows, bucket), state in sorted(self._buckets.items(), key=lambda item: item[0][1]):
            chosen = state.options[state.current]
            rows.append({
                "bucket": bucket, "rows": num_rows, "steps": state.steps, "choice": chosen.label,
                **chosen.to_json(),
                "settled": state.settled,
                "trial_s": dict(state.verdict),
                "measured_s": {
                    label: statistics.median(times) for label, times in state.measured.items()
                },
                "runner_up": state.options[1 - state.current].label if len(state.options) > 1 else None,
            })
        return rows

    def priced(self, rows: int, bucket: int) -> list[AdaptiveChoice]:
        """Every choice of the space for `rows` x `bucket` (a bucket length), whether it fits or not."""
        space = self.space
        costs = self._costs.get(bucket)
        if costs is None:
            costs = self._costs[bucket] = self._costs_at(bucket)
        num_stages = len(space.bounds) - 1
        choices: list[AdaptiveChoice] = []
        for num_microbatches in space.microbatch_counts:
            if rows % num_microbatches:
                continue
            for name in space.families:
                if not _builds(name, space.num_ranks, num_microbatches, space.num_virtual):
                    continue
                config = Config(name, space.num_virtual, num_microbatches, rows // num_microbatches)
                for recompute in space.recompute:
                    stages = tuple(range(num_stages)) if recompute == "full" else ()
                    candidate = evaluate(
                        costs, config, space.num_ranks, space.bounds, stages, space.link,
                        num_data_parallel=space.num_data_parallel,
                        num_tensor_parallel=space.num_tensor_parallel,
                        sequence_parallel=space.sequence_parallel,
                    )
                    choices.append(_choice(candidate, rows, bucket, recompute))
        if not choices:
            raise ConfigError(
                f"a batch of {rows} rows: no micro-batch count of {list(space.microbatch_counts)} divides it "
                f"for any of {list(space.families)}; give batches whose rows divide by one of them"
            )
        return choices


def _builds(name: str, num_ranks: int, num_microbatches: int, num_virtual: int) -> bool:
    try:
        family_schedule(name, num_ranks, num_microbatches, num_virtual)
    except (ScheduleError, ConfigError):
        return False
    return True


def _choice(candidate: Candidate, rows: int, bucket: int, recompute: str) -> AdaptiveChoice:
    return AdaptiveChoice(
        rows=rows, bucket=bucket, schedule=candidate.schedule, num_microbatches=candidate.num_microbatches,
        microbatch_rows=candidate.microbatch_rows, recompute=recompute,
        predicted_step_s=candidate.step_time, peak_memory=candidate.peak_memory,
        activation_bytes=max(memory.activations + memory.recompute for memory in candidate.memory),
    )
