"""What the planner returns: `Candidate` configurations, `Verdict`s on the others, the `Plan`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipefold.balance import Partition
from pipefold.plan.degree import split_text
from pipefold.plan.memory import PeakMemory, RankMemory
from pipefold.plan.units import format_bytes
from pipefold.schedule import Schedule, build
from pipefold.schedule.io import from_json as schedule_from_json
from pipefold.schedule.io import to_json as schedule_to_json

__all__ = ["Candidate", "Verdict", "Plan", "SearchedOrder", "Status", "exposed_text"]

Status = Literal["chosen", "slower", "over-memory", "pruned", "not-applicable", "not-searched"]
"""How a schedule family or a setting fared: see `Verdict`."""


def _ranges(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    parts: list[str] = []
    start = previous = -2
    for value in values:
        if value != previous + 1:
            if start >= 0:
                parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = value
        previous = value
    if start >= 0:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


@dataclass(frozen=True)
class Candidate(PeakMemory):
    """One simulated configuration: what to run, and what the simulator predicts for it."""

    schedule: str
    num_ranks: int
    num_virtual: int
    num_microbatches: int
    microbatch_rows: int
    """Samples per micro-batch the costs were scaled to (the largest one, when uneven)."""
    bounds: tuple[int, ...]
    """The partition: virtual stage s owns layers [bounds[s], bounds[s + 1])."""
    recompute: tuple[int, ...]
    """Virtual stages whose layers are recomputed in the backward (sorted)."""
    step_time: float
    """Predicted seconds per step (a whole global batch): the simulated schedule on one replica's
    batch plus `allreduce_s` and `tied_exchange_s`."""
    bubble_fraction: float
    """Of the simulated schedule (the all-reduce after it is not part of it)."""
    memory: tuple[RankMemory, ...]
    """Predicted peak memory per pipeline rank (the same in every replica)."""
    num_data_parallel: int = 1
    """Data-parallel replicas dp of the pipeline; `num_ranks` is each one's pipeline ranks pp."""
    allreduce_s: float = 0.0
    """Seconds of the gradient all-reduce across replicas after the schedule (0 when dp = 1)."""
    tied_exchange_s: float = 0.0
    """Seconds after the schedule the ranks holding a tied weight (embedding and head) take to sum
    its gradient (`pipefold.plan.evaluate.tied_exchange_time`; 0 where one rank holds both ends)."""
    num_tensor_parallel: int = 1
    """Tensor-parallel ranks tp per stage; `memory` and the times are one tp rank's."""
    sharded_optimizer: bool = False
    """Whether the optimizer state is sharded over the dp replicas (ZeRO-1); `allreduce_s` then
    includes the weights' all-gather."""
    sequence_parallel: bool = False
    """Whether the tp ranks split the stream by position too (sequence parallelism)."""
    order: Schedule | None = None
    """For a searched order (`schedule` "auto"): the order itself, to save and run; None for a family."""
    base_family: str | None = None
    """For a searched order: the family of the same configuration it was searched against (the best
    family order there, or the fastest where none fits); None for a family."""
    placed: str = ""
    recompute_attention: bool = False
    """Whether every layer recomputes its attention core in the backward (selective recomputation,
    Korthikanti et al. 2022), besides the stages in `recompute`."""
    """How the mesh sits on a hardware file's nodes (`pipefold.plan.topology`); empty without one."""
    rank_speeds: tuple[float, ...] = ()
    """On a mix of device kinds (docs/plan.md, "Heterogeneous devices"): per pipeline rank, its
    slowest device's speed; empty where every device is the reference device."""
    rank_limits: tuple[int, ...] = ()
    """On a mix of device kinds: per pipeline rank, its smallest device's usable memory (the rank
    fits the smaller of it and the plan's limit); empty where every device is the reference device."""
    shard: str = "replicate"
    """What the dp replicas shard: "replicate", "zero1" (`sharded_optimizer`) or "full" (weights,
    gradients and optimizer state; its gathers and reduce-scatters are inside `pipeline_s`)."""
    free_between_microbatches: bool = False
    """Full sharding: each stage's weights freed whenever its rank turns to another of its stages."""
    gather_lookahead: int = 0
    """Full sharding: each weight gather issued this many actions of the rank's row before the
    action that needs it (`pipefold train --gather-lookahead`), so it overlaps that compute."""
    gather_exposed_s: float | None = 0.0
    """Full sharding: seconds the weight gathers add to the simulated step (the step less the same
    schedule with instant gathers); the look-ahead is chosen to shrink it. None where the search
    did not price it (a variant neither shown nor ranked)."""
    held_slowdown: tuple[tuple[float, float], ...] = ()
    """Per pipeline rank, the extra fraction of its F and of its B, I and W for the activations it
    holds beyond the calibration's (`pipefold.plan.held_cost`); empty where the costs price none."""

    @property
    def is_searched_order(self) -> bool:
        return self.order is not None

    @property
    def schedule_text(self) -> str:
        """'zb-h2', or for a searched order 'auto (vs zb-h2)'."""
        return f"{self.schedule} (vs {self.base_family})" if self.is_searched_order else self.schedule

    def held_text(self) -> str:
        """'activations held: +3.1% F, +1.2% B on rank 0; ...' for the ranks priced slower for the
        activations they hold; empty where none is."""
        parts = [f"+{f:.1%} F, +{b:.1%} B on rank {rank}" for rank, (f, b) in enumerate(self.held_slowdown)
                 if f > 0 or b > 0]
        if not parts:
            return ""
        return ("activations held: " + "; ".join(parts) + " (a CPU rank's actions slow with the activation "
                "memory it holds beyond the calibration run's)")

    @property
    def num_devices(self) -> int:
        return self.num_data_parallel * self.num_ranks * self.num_tensor_parallel

    @property
    def degree_text(self) -> str:
        """'dp=2 x pp=4', with ' x tp=2' where the stages are split."""
        return split_text(self.num_data_parallel, self.num_ranks, self.num_tensor_parallel)

    @property
    def pipeline_s(self) -> float:
        """Seconds of the simulated schedule alone."""
        return self.step_time - self.allreduce_s - self.tied_exchange_s

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def partition(self) -> Partition:
        return Partition(self.bounds)

    def devices_text(self, limit: float) -> str:
        """On a mix of device kinds: 'devices (a mix): ranks 0-1 speed 1, 15 GiB; ranks 2-3 speed
        0.5, 7 GiB; layers per rank 4, 4, 2, 2; peak 32 MiB, 28 MiB, ...'."""
        kinds: list[tuple[list[int], float, float]] = []
        for rank, (speed, own) in enumerate(zip(self.rank_speeds, self.rank_limits, strict=True)):
            usable = min(limit, own)
            if kinds and kinds[-1][1:] == (speed, usable):
                kinds[-1][0].append(rank)
            else:
                kinds.append(([rank], speed, usable))
        parts = [
            f"rank{'s' if len(ranks) > 1 else ''} {_ranges(tuple(ranks))} speed {speed:.3g}, "
            f"{format_bytes(usable)}"
            for ranks, speed, usable in kinds
        ]
        layers = ", ".join(str(self.num_layers_of(rank)) for rank in range(self.num_ranks))
        peaks = ", ".join(format_bytes(memory.total) for memory in self.memory)
        return f"devices (a mix): {'; '.join(parts)}; layers per rank {layers}; peak per rank {peaks}"

    def num_layers_of(self, rank: int) -> int:
        """Layers held by pipeline rank `rank` (its stages in the family's placement)."""
        if self.order is not None:
            placement = self.order.placement
        else:
            placement = build(self.schedule, num_ranks=self.num_ranks, num_microbatches=1,
                              num_virtual=self.num_virtual).placement
        return sum(self.bounds[stage + 1] - self.bounds[stage]
                   for stage, owner in enumerate(placement) if owner == rank)

    @property
    def recompute_layers(self) -> tuple[int, ...]:
        """The layer indices `LayoutOptions(recompute=...)` takes for this candidate."""
        return tuple(
            layer for stage in self.recompute for layer in range(self.bounds[stage], self.bounds[stage + 1])
        )

    @property
    def recompute_text(self) -> str:
        if self.recompute_attention:
            stages = self._stages_text()
            return "attention core" + ("" if stages == "none" else f" + {stages}")
        return self._stages_text()

    def _stages_text(self) -> str:
        if not self.recompute:
            return "none"
        if len(self.recompute) == self.num_stages:
            return f"all {self.num_stages} stages"
        return f"stage{'s' if len(self.recompute) > 1 else ''} {_ranges(self.recompute)}"

    def describe(self) -> str:
        """'zb-v v=2, 16 micro-batches of 4, recompute none'; a searched order 'auto (vs zb-h2) v=1, ...'."""
        text = (
            f"{self.schedule_text} v={self.num_virtual}, {self.num_microbatches} micro-batches of "
            f"{self.microbatch_rows}, recompute {self.recompute_text}"
        )
        if self.shard == "full":
            freed = " freed between micro-batches" if self.free_between_microbatches else ""
            text += f", full sharding{freed}"
            if self.gather_lookahead:
                ahead = self.gather_lookahead
                text += f", gathers {ahead} action{'s' if ahead > 1 else ''} ahead"
        return text

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The schedule's keyword arguments of `pipefold.Pipeline` for this configuration (a searched
        order's `schedule` is its `Schedule`); with `layout_kwargs` it runs exactly this choice:
        `Pipeline(layers, loss_fn=..., **c.pipeline_kwargs(), layout=LayoutOptions(**c.layout_kwargs()))`."""
        return {
            "schedule": self.schedule if self.order is None else self.order,
            "num_microbatches": self.num_microbatches,
            "num_virtual": self.num_virtual,
        }

    def layout_kwargs(self) -> dict[str, Any]:
        """The `pipefold.runtime.LayoutOptions` fields of this configuration: partition and recompute."""
        return {
            "partition": list(self.partition.counts),
            "recompute": list(self.recompute_layers) if self.recompute else "none",
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "num_ranks": self.num_ranks,
            "num_virtual": self.num_virtual,
            "num_microbatches": self.num_microbatches,
            "microbatch_rows": self.microbatch_rows,
            "bounds": list(self.bounds),
            "recompute": list(self.recompute),
            "num_data_parallel": self.num_data_parallel,
            "num_tensor_parallel": self.num_tensor_parallel,
            "sharded_optimizer": self.sharded_optimizer,
            "sequence_parallel": self.sequence_parallel,
            "num_devices": self.num_devices,
            "step_time": self.step_time,
            "allreduce_s": self.allreduce_s,
            "tied_exchange_s": self.tied_exchange_s,
            "bubble_fraction": self.bubble_fraction,
            "peak_memory": self.peak_memory,
            "memory": [memory.to_json() for memory in self.memory],
            # A searched order's schedule is "auto" here; its actions are in "order" (once, not twice).
            # One flat mapping: Pipeline's schedule arguments and LayoutOptions' partition and recompute.
            "pipeline_kwargs": {**self.pipeline_kwargs(), **self.layout_kwargs(), "schedule": self.schedule},
            "order": None if self.order is None else schedule_to_json(self.order),
            "base_family": self.base_family,
            "placed": self.placed,
            "recompute_attention": self.recompute_attention,
            "rank_speeds": list(self.rank_speeds),
            "rank_limits": list(self.rank_limits),
            "shard": self.shard,
            "free_between_microbatches": self.free_between_microbatches,
            "gather_lookahead": self.gather_lookahead,
            "gather_exposed_s": self.gather_exposed_s,
            "held_slowdown": [list(pair) for pair in self.held_slowdown],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            schedule=str(data["schedule"]),
            num_ranks=int(data["num_ranks"]),
            num_virtual=int(data["num_virtual"]),
            num_microbatches=int(data["num_microbatches"]),
            microbatch_rows=int(data["microbatch_rows"]),
            bounds=tuple(int(b) for b in data["bounds"]),
            recompute=tuple(int(s) for s in data["recompute"]),
            step_time=float(data["step_time"]),
            bubble_fraction=float(data["bubble_fraction"]),
            memory=tuple(RankMemory.from_json(entry) for entry in data["memory"]),
            num_data_parallel=int(data.get("num_data_parallel", 1)),
            allreduce_s=float(data.get("allreduce_s", 0.0)),
            tied_exchange_s=float(data.get("tied_exchange_s", 0.0)),
            num_tensor_parallel=int(data.get("num_tensor_parallel", 1)),
            sharded_optimizer=bool(data.get("sharded_optimizer", False)),
            sequence_parallel=bool(data.get("sequence_parallel", False)),
            order=None if data.get("order") is None else schedule_from_json(data["order"]),
            base_family=None if data.get("base_family") is None else str(data["base_family"]),
            placed=str(data.get("placed", "")),
            recompute_attention=bool(data.get("recompute_attention", False)),
            rank_speeds=tuple(float(speed) for speed in data.get("rank_speeds", ())),
            rank_limits=tuple(int(limit) for limit in data.get("rank_limits", ())),
            shard=str(data.get("shard", "zero1" if data.get("sharded_optimizer") else "replicate")),
            free_between_microbatches=bool(data.get("free_between_microbatches", False)),
            gather_lookahead=int(data.get("gather_lookahead", 0)),
            gather_exposed_s=_optional_float(data.get("gather_exposed_s", 0.0)),
            held_slowdown=tuple((float(f), float(b)) for f, b in data.get("held_slowdown", ())),
        )


@dataclass(frozen=True)
class Verdict:
    """Why a schedule family, or one value of a setting, was or was not chosen."""

    subject: str
    """A family name ("zb-v"), or a setting and value ("num_microbatches=16")."""
    status: Status
    reason: str
    """One line a person reads: "4.2% slower than the choice at its best (...)"."""

    def to_json(self) -> dict[str, str]:
        return {"subject": self.subject, "status": self.status, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        status = str(data["status"])
        if status not in ("chosen", "slower", "over-memory", "pruned", "not-applicable", "not-searched"):
            raise ValueError(f"unknown verdict status {status!r}")
        return cls(str(data["subject"]), status, str(data["reason"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SearchedOrder:
    """The order `search_schedule` found for one configuration, simulated and priced."""

    schedule: Schedule
    """Named "auto"; runs with the configuration's partition, micro-batches and recompute."""
    family: str
    """The family of the configuration whose order it was compared with (the base)."""
    step_time: float
    """Predicted seconds per step, the configuration's gradient all-reduce included."""
    family_step_time: float
    """The base family order's step (over the memory limit where `family_fits` is False)."""
    bubble_fraction: float
    memory: tuple[RankMemory, ...]
    origin: str
    """Where the search started: a list-scheduler setting or a family."""
    family_fits: bool = True
    """Whether the base family's order fits the memory limit (a searched order can fit where it
    does not: docs/decisions.md, "Planner refinement")."""
    held_slowdown: tuple[tuple[float, float], ...] = ()
    """Per rank, as `Candidate.held_slowdown`: its order's activations priced (`pipefold.plan.held_cost`)."""

    @property
    def gain(self) -> float:
        """The base family's step over this one's (above 1: the searched order is faster)."""
        return self.family_step_time / self.step_time if self.step_time > 0 else 1.0

    @property
    def peak_memory(self) -> int:
        return max(memory.total for memory in self.memory)

    def explain(self) -> str:
        if not self.family_fits:
            return (
                f"searched order: fits where {self.family}'s order of this configuration does not; predicted "
                f"step {self.step_time:.4g} s, bubble {self.bubble_fraction:.1%}, from {self.origin}"
            )
        if self.gain <= 1.0:
            return (
                f"searched order: none faster than {self.family}'s for these costs "
                f"(best found {self.step_time:.4g} s, from {self.origin})"
            )
        return (
            f"searched order: predicted step {self.step_time:.4g} s, {self.gain:.3f}x {self.family}'s "
            f"{self.family_step_time:.4g} s, bubble {self.bubble_fraction:.1%}, from {self.origin}; "
            "`pipefold plan --save-schedule FILE` writes it, for "
            "Pipeline(schedule=pipefold.schedule.io.load(FILE)) with the same partition and micro-batches"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": schedule_to_json(self.schedule),
            "family": self.family,
            "step_time": self.step_time,
            "family_step_time": self.family_step_time,
            "gain": self.gain,
            "bubble_fraction": self.bubble_fraction,
            "memory": [memory.to_json() for memory in self.memory],
            "origin": self.origin,
            "family_fits": self.family_fits,
            "held_slowdown": [list(pair) for pair in self.held_slowdown],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchedOrder:
        return cls(
            schedule=schedule_from_json(data["schedule"]),
            family=str(data["family"]),
            step_time=float(data["step_time"]),
            family_step_time=float(data["family_step_time"]),
            bubble_fraction=float(data["bubble_fraction"]),
            memory=tuple(RankMemory.from_json(entry) for entry in data["memory"]),
            origin=str(data["origin"]),
            family_fits=bool(data.get("family_fits", True)),
            held_slowdown=tuple((float(f), float(b)) for f, b in data.get("held_slowdown", ())),
        )


@dataclass(frozen=True)
class Plan:
    """The chosen configuration, the runners-up, and why the rest lost."""

    choice: Candidate
    top: tuple[Candidate, ...]
    """The fastest configurations that fit, best first (the choice is `top[0]`)."""
    families: tuple[Verdict, ...]
    """One verdict per registered schedule family, in registry order."""
    settings: tuple[Verdict, ...]
    """For the chosen family: the other micro-batch counts, virtual stages and recompute choices."""
    num_ranks: int
    """Pipeline ranks pp of the choice."""
    global_batch: int
    """Samples per step over all replicas."""
    memory_limit: float
    """Bytes per rank; math.inf when there is no limit."""
    num_simulated: int
    """Simulations run."""
    num_pruned: int
    """Configurations skipped because a lower bound on their step time already lost."""
    source: str = ""
    """Where the costs came from."""
    degrees: tuple[Verdict, ...] = ()
    """One verdict per dp x pp (x tp) split searched ("dp=2 x pp=4", "dp=1 x pp=4 x tp=2"), dp then
    tp ascending; empty when one was pinned."""
    num_devices: int | None = None
    """The devices split into dp x pp (x tp) when the degree was searched; None when it was pinned."""
    searched: SearchedOrder | None = None
    """The order searched for the choice's configuration (docs/decisions.md, "Planner
    refinement"): where the choice is a searched order, that order; None when not searched
    (asynchronous family, unknown layout, search off)."""
    best_family: Candidate | None = None
    """Where the choice is a searched order: the fastest family candidate, the choice a plan
    without order search makes; None where the choice is a family."""
    num_order_searches: int = 0
    """Configurations whose order was searched (the family choice's first)."""
    num_order_pruned: int = 0
    """Configurations within the margin left unsearched because their step-time bound could not
    beat the best found."""
    num_order_unsearched: int = 0
    """Configurations within the margin left unsearched because the budget was spent."""

    @property
    def num_data_parallel(self) -> int:
        """Data-parallel replicas dp of the choice."""
        return self.choice.num_data_parallel

    @property
    def num_tensor_parallel(self) -> int:
        """Tensor-parallel ranks tp per stage of the choice."""
        return self.choice.num_tensor_parallel

    @property
    def step_time(self) -> float:
        return self.choice.step_time

    @property
    def saves_searched_order(self) -> bool:
        """Whether the schedule to run is a searched order: the choice is one, or the order searched
        for the family choice's configuration is faster than its family's (if within 1%)."""
        if self.choice.is_searched_order:
            return True
        return self.searched is not None and self.searched.gain > 1.0

    def schedule_to_run(self) -> Schedule:
        """What `pipefold plan --save-schedule` writes: the searched order where
        `saves_searched_order`, else the chosen family's order."""
        if self.choice.order is not None:
            return self.choice.order
        if self.searched is not None and self.searched.gain > 1.0:
            return self.searched.schedule
        choice = self.choice
        return build(choice.schedule, num_ranks=choice.num_ranks, num_microbatches=choice.num_microbatches,
                     num_virtual=choice.num_virtual)

    @property
    def bubble_fraction(self) -> float:
        return self.choice.bubble_fraction

    @property
    def peak_memory(self) -> tuple[int, ...]:
        """Per rank, the chosen configuration's predicted peak memory."""
        return tuple(memory.total for memory in self.choice.memory)

    def explain(self) -> str:
        """The choice and the reasons, as plain text lines."""
        choice = self.choice
        limit = "no limit" if math.isinf(self.memory_limit) else f"limit {format_bytes(self.memory_limit)}"
        with_degree = bool(self.degrees) or choice.num_data_parallel > 1 or choice.num_tensor_parallel > 1
        step = f"predicted step {choice.step_time:.4g} s"
        if choice.shard == "full":
            step += (
                f" (on {self.global_batch // choice.num_data_parallel} rows per replica, the weight gathers "
                f"and gradient reduce-scatters across {choice.num_data_parallel} replicas included)"
            )
        elif choice.num_data_parallel > 1:
            step += (
                f" (pipeline {choice.pipeline_s:.4g} s on "
                f"{self.global_batch // choice.num_data_parallel} rows per replica + gradient all-reduce "
                f"{choice.allreduce_s:.4g} s across {choice.num_data_parallel} replicas)"
            )
        if choice.tied_exchange_s:
            step += f", including a tied-gradient exchange of {choice.tied_exchange_s:.4g} s after the flush"
        lines = [
            f"choice: {choice.degree_text + ', ' if with_degree else ''}{choice.describe()}",
            f"  {step}, bubble {choice.bubble_fraction:.1%}, "
            f"peak memory {format_bytes(choice.peak_memory)} on rank {choice.peak_rank} ({limit})",
            f"  partition {choice.partition}",
            "  Pipeline(" + ", ".join(
                f"{k}={'pipefold.schedule.io.load(FILE)' if k == 'schedule' and choice.order else repr(v)}"
                for k, v in choice.pipeline_kwargs().items()
            ) + ", layout=LayoutOptions(" + ", ".join(
                f"{k}={v!r}" for k, v in choice.layout_kwargs().items()
            ) + "))" + ("  # FILE: pipefold plan --save-schedule FILE writes it" if choice.order else ""),
        ]
        peak = choice.memory[choice.peak_rank]
        if peak.update:
            where = "the update" if peak.update_total > peak.pipeline_total else "the pipeline's call"
            lines.append(
                f"  rank {choice.peak_rank}'s peak is in {where}: {format_bytes(peak.pipeline_total)} during "
                f"the pipeline's call, {format_bytes(peak.update_total)} during the update (its temporaries "
                f"{format_bytes(peak.update)}: the gradient norm's or AdamW's, pipefold.plan.update_memory)")
        if choice.rank_speeds:
            lines.append("  " + choice.devices_text(self.memory_limit))
        if choice.held_text():
            lines.append("  " + choice.held_text())
        if choice.sharded_optimizer:
            lines.append(
                f"  ZeRO-1: the optimizer state sharded over the {choice.num_data_parallel} replicas "
                "(pipefold.runtime.sharded_optimizer; pipefold train --zero)"
            )
        if choice.shard == "full":
            ahead = choice.gather_lookahead
            lines.append(
                f"  full sharding: weights, gradients and optimizer state sharded over the "
                f"{choice.num_data_parallel} replicas, each stage's weights gathered "
                + ("before each run of its actions and freed after it" if choice.free_between_microbatches
                   else "once per step")
                + (f" (each gather issued {ahead} action{'s' if ahead > 1 else ''} before its first use)"
                   if ahead else " (each gather issued right before its first use)")
                + ", its gradients reduce-scattered after its last backward, inside the pipeline time; "
                f"the gathers leave {exposed_text(choice.gather_exposed_s)} of the step exposed "
                "(ParallelOptions(shard='full'"
                + (", free_between_microbatches=True" if choice.free_between_microbatches else "")
                + (f", gather_lookahead={ahead}" if ahead else "")
                + "); pipefold train --shard full"
                + (" --free-between-microbatches" if choice.free_between_microbatches else "")
                + (f" --gather-lookahead {ahead}" if ahead else "") + ")"
            )
        if choice.num_tensor_parallel > 1:
            lines.append(
                f"  tensor parallel: each stage split over {choice.num_tensor_parallel} ranks: a mesh with "
                f"a 'tp' dim of {choice.num_tensor_parallel} and "
                "Pipeline(parallel=ParallelOptions(tensor_parallel=plan)) (pipefold "
                f"train --tensor-parallel {choice.num_tensor_parallel}); memory and times above are one tp "
                "rank's"
            )
        if choice.sequence_parallel:
            lines.append(
                "  sequence parallel: the norms, the residual stream and the stage boundaries split by "
                "position over the tp ranks (gpt_tensor_parallel_plan(sequence_parallel=True); pipefold "
                "train --sequence-parallel)"
            )
        if self.source:
            lines.append(f"  costs: {self.source}")
        if choice.is_searched_order and self.best_family is not None:
            lines.append(f"  {self._searched_choice_text(self.best_family)}")
        elif self.searched is not None:
            lines.append(f"  {self.searched.explain()}")
        width = max(len(verdict.subject) for verdict in (*self.degrees, *self.families, *self.settings))
        if self.degrees:
            tp = " x tp" if any(" x tp=" in v.subject for v in self.degrees) else ""
            devices = f"{self.num_devices} devices" if self.num_devices is not None else "the pinned pipeline"
            lines.append(f"dp x pp{tp} for {devices}:")
            lines += [f"  {v.subject:<{width}}  {v.status:<14}  {v.reason}" for v in self.degrees]
        lines.append(f"schedules at {choice.degree_text}:" if with_degree else "schedules:")
        lines += [f"  {v.subject:<{width}}  {v.status:<14}  {v.reason}" for v in self.families]
        if self.settings:
            if choice.is_searched_order:
                lines.append(
                    f"settings of {choice.base_family} (the family of the searched order's configuration):"
                )
            else:
                lines.append(f"settings of {choice.schedule}:")
            lines += [f"  {v.subject:<{width}}  {v.status:<14}  {v.reason}" for v in self.settings]
        lines.append(
            f"searched with {self.num_simulated} simulations; {self.num_pruned} configurations skipped "
            "by a lower bound on their step time"
        )
        if self.num_order_searches:
            lines.append(
                f"orders searched for {self.num_order_searches} configuration(s); "
                f"{self.num_order_pruned} more skipped by the bound, {self.num_order_unsearched} by the "
                "order-search budget (--order-search-total, --max-order-searches)"
            )
        return "\n".join(lines)

    def _searched_choice_text(self, family: Candidate) -> str:
        searched = self.searched
        gain = family.step_time / self.choice.step_time - 1 if self.choice.step_time > 0 else 0.0
        origin = f", found from {searched.origin}" if searched is not None else ""
        where = f"{family.degree_text}, " if family.degree_text != self.choice.degree_text else ""
        return (
            f"searched order chosen: {gain:.1%} faster than the fastest family candidate ({where}"
            f"{family.describe()}, {family.step_time:.4g} s){origin}; `pipefold plan --save-schedule FILE` "
            "writes it"
        )

    def to_json(self) -> dict[str, Any]:
        """Plain data; an unlimited memory is written as null (JSON has no infinity)."""
        return {
            "choice": self.choice.to_json(),
            "step_time": self.step_time,
            "bubble_fraction": self.bubble_fraction,
            "peak_memory": list(self.peak_memory),
            "top": [candidate.to_json() for candidate in self.top],
            "families": [verdict.to_json() for verdict in self.families],
            "settings": [verdict.to_json() for verdict in self.settings],
            "num_ranks": self.num_ranks,
            "num_data_parallel": self.num_data_parallel,
            "num_tensor_parallel": self.num_tensor_parallel,
            "num_devices": self.num_devices,
            "degrees": [verdict.to_json() for verdict in self.degrees],
            "global_batch": self.global_batch,
            "memory_limit": None if math.isinf(self.memory_limit) else self.memory_limit,
            "num_simulated": self.num_simulated,
            "num_pruned": self.num_pruned,
            "source": self.source,
            "searched": None if self.searched is None else self.searched.to_json(),
            "best_family": None if self.best_family is None else self.best_family.to_json(),
            "num_order_searches": self.num_order_searches,
            "num_order_pruned": self.num_order_pruned,
            "num_order_unsearched": self.num_order_unsearched,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        limit = data.get("memory_limit")
        searched = data.get("searched")
        best_family = data.get("best_family")
        return cls(
            choice=Candidate.from_json(data["choice"]),
            top=tuple(Candidate.from_json(entry) for entry in data["top"]),
            families=tuple(Verdict.from_json(entry) for entry in data["families"]),
            settings=tuple(Verdict.from_json(entry) for entry in data["settings"]),
            num_ranks=int(data["num_ranks"]),
            global_batch=int(data["global_batch"]),
            memory_limit=math.inf if limit is None else float(limit),
            num_simulated=int(data["num_simulated"]),
            num_pruned=int(data["num_pruned"]),
            source=str(data.get("source", "")),
            degrees=tuple(Verdict.from_json(entry) for entry in data.get("degrees", ())),
            num_devices=None if data.get("num_devices") is None else int(data["num_devices"]),
            searched=None if searched is None else SearchedOrder.from_json(searched),
            best_family=None if best_family is None else Candidate.from_json(best_family),
            num_order_searches=int(data.get("num_order_searches", 0)),
            num_order_pruned=int(data.get("num_order_pruned", 0)),
            num_order_unsearched=int(data.get("num_order_unsearched", 0)),
        )


def exposed_text(value: float | None) -> str:
    """'3.333 s', or 'an unpriced time' for None."""
    return "an unpriced time" if value is None else f"{value:.4g} s"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
