"""The benchmark's data: configurations, options and results, as plain JSON-able records.

No torch import: the report renders results on machines without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.harness.pairs import SchedulePair, pair
from benchmarks.harness.quiet import QuietGate

__all__ = ["BenchConfig", "ConfigResult", "LayerCost", "RunOptions", "SideResult"]


@dataclass(frozen=True)
class BenchConfig:
    """One cell of the matrix: a workload, a schedule pair, ranks and micro-batches."""

    workload: str
    schedule: str
    num_ranks: int
    num_microbatches: int

    @property
    def pair(self) -> SchedulePair:
        return pair(self.schedule)

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.schedule}/p{self.num_ranks}/m{self.num_microbatches}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """How every configuration is measured."""

    warmup_steps: int = 2
    """Untimed steps per library after the gradient check (allocator, shape inference)."""
    timed_steps: int = 7
    """Timed steps per library, taken alternately A B A B."""
    libraries: tuple[str, ...] = ("pipefold", "torch")
    """Sides to time, in alternation order; "deepspeed" is added when it imports."""
    gate: QuietGate = field(default_factory=QuietGate)
    seed: int = 0
    timeout_s: float = 300.0
    """Collective timeout inside the workers: a failed rank stops the run instead of hanging it."""
    interleave_baseline: bool = True
    """Time the one-process baseline on rank 0 inside the alternation (benchmarks/harness/single_side.py)."""


@dataclass
class SideResult:
    """What one library did on one configuration (gathered over all ranks by rank 0)."""

    label: str
    samples_s: list[float] = field(default_factory=list)
    """Kept step times (max over ranks), in the order taken."""
    foreign_shares: list[float] = field(default_factory=list)
    """Other processes' share of the machine's CPU in each kept window."""
    num_disturbed: int = 0
    """Kept windows that were still above the quiet threshold after all retakes."""
    num_retakes: int = 0
    grad_max_abs_err: float | None = None
    peak_rss_bytes: list[int] = field(default_factory=list)
    """Per rank: the highest resident memory seen during this library's timed steps."""
    activation_bytes_peak: list[int | None] = field(default_factory=list)
    """Per rank, as the library counted it (pipefold's timeline); None where it does not."""
    error: str | None = None
    timeline: dict[str, Any] | None = None
    """The library's own measured timeline of its last timed step (pipefold only), as JSON."""
    calibrated_prediction_s: float | None = None
    """pipefold only: the simulator's step time with stage costs measured in its warm-up steps."""
    schedule: dict[str, Any] | None = None
    """pipefold's searched rows only (auto, auto-v): the schedule that ran, as pipefold.schedule.io JSON."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SideResult:
        return cls(**data)


@dataclass
class ConfigResult:
    config: BenchConfig
    sides: dict[str, SideResult] = field(default_factory=dict)
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "sides": {label: side.to_json() for label, side in self.sides.items()},
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConfigResult:
        return cls(
            config=BenchConfig(**data["config"]),
            sides={label: SideResult.from_json(side) for label, side in data["sides"].items()},
            skipped=data.get("skipped"),
        )


@dataclass(frozen=True)
class LayerCost:
    """One layer's measured costs on one micro-batch (see benchmarks.harness.profile)."""

    forward_s: float
    backward_s: float
    input_grad_s: float
    activation_bytes: int
    output_bytes: int

    @property
    def weight_grad_s(self) -> float:
        return max(self.backward_s - self.input_grad_s, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "weight_grad_s": self.weight_grad_s}
