"""`tune_schedule`: measure the model's costs on its ranks, then search a schedule for them.

    tuned = tune_schedule(layers, loss_fn=F.cross_entropy, inputs=x, targets=y, num_microbatches=8)
    pipe = Pipeline(layers, loss_fn=F.cross_entropy, schedule=tuned.schedule, num_microbatches=8)
    summary = tuned.summary()     # searched schedule, its predicted step, the trial; log or print it

Every rank calls it with the same arguments, like `Pipeline`.

Design notes: docs/decisions.md, "schedules from measured costs".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed as dist
from torch import nn

from pipefold.errors import ConfigError, PipefoldError, ScheduleError
from pipefold.model import LayerLike
from pipefold.plan import probe_schedule, search_schedule
from pipefold.plan.probe import PROBE_FAMILIES, probe_base
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.options import LayoutOptions, ParallelOptions, RuntimeOptions, TransportOptions
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.pipeline import LossFn, Pipeline
from pipefold.schedule import Placement, Schedule, build
from pipefold.schedule.io import from_json, to_json
from pipefold.simulate import CostModel, simulate

__all__ = ["TunedSchedule", "tune_schedule"]


@dataclass(frozen=True)
class TunedSchedule:
    """What `tune_schedule` found, and from what."""

    schedule: Schedule
    """What won: the searched schedule (named "auto") or, where the measured trial found it
    faster, the family it was tried against; pass it to `Pipeline(schedule=...)`."""
    costs: CostModel
    """The cost model measured in the probe (rank 0's view, sent to every rank)."""
    probe: Schedule
    """The schedule the probe steps ran."""
    predicted_step_s: float
    """The simulated step of `schedule` under `costs`."""
    probe_predicted_step_s: float
    """The simulated step of the probe's base family under `costs`, for comparison."""
    probe_step_s: tuple[float, ...]
    """Rank 0's wall time of each probe step kept for the costs."""
    trials: tuple[tuple[str, float], ...] = ()
    """(schedule name, rank 0's median trial step in seconds) per candidate tried; () if none."""
    trial_rounds: int = 0
    """Timed rounds the trial ran (at most `num_trial_steps`; fewer when it was clear early)."""

    def summary(self) -> str:
        gain = self.probe_predicted_step_s / self.predicted_step_s if self.predicted_step_s > 0 else 1.0
        trial = ""
        if self.trials:
            tried = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in self.trials)
            rounds = f"{self.trial_rounds} round{'s' if self.trial_rounds != 1 else ''}"
            trial = f"; measured trial ({rounds}): {tried}, kept {self.schedule.name!r}"
        return (
            f"auto schedule for {self.schedule.num_ranks} ranks x {self.schedule.num_microbatches} "
            f"micro-batches ({self.schedule.num_stages} stages): predicted step "
            f"{self.predicted_step_s * 1e3:.1f} ms, {gain:.2f}x the probe family "
            f"{self.probe.name.removesuffix('+probe')!r} ({self.probe_predicted_step_s * 1e3:.1f} ms) "
            f"under the same measured costs{trial}"
        )


@dataclass(frozen=True)
class _Options:
    """The option groups every pipeline of the tuning is built with."""

    layout: LayoutOptions
    parallel: ParallelOptions
    runtime: RuntimeOptions
    transport: TransportOptions

    def pipeline(
        self, layers: nn.Sequential | Sequence[LayerLike], loss_fn: LossFn, schedule: Schedule
    ) -> Pipeline:
        return Pipeline(
            layers, loss_fn=loss_fn, schedule=schedule, layout=self.layout, parallel=self.parallel,
            runtime=self.runtime, transport=self.transport,
        )


def tune_schedule(
    layers: nn.Sequential | Sequence[LayerLike],
    *,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    num_microbatches: int,
    placement: Placement = "contiguous",
    num_virtual: int | None = None,
    num_probe_steps: int = 3,
    time_budget_s: float = 1.0,
    memory_limit: int | None = None,
    num_trial_steps: int = 6,
    num_trial_families: int = 2,
    layout: LayoutOptions | None = None,
    parallel: ParallelOptions | None = None,
    runtime: RuntimeOptions | None = None,
    transport: TransportOptions | None = None,
) -> TunedSchedule:
    """Probe, measure and search (see docs/decisions.md, "schedules from measured costs").

    `layout`, `parallel`, `runtime` and `transport` go to every probe `Pipeline` (the probe
    keeps I and W apart whatever `runtime.fuse_backward` says); give the same ones to the
    `Pipeline` that runs the result. `num_virtual`: stages per
    rank (default 1 for contiguous, 2 for looped and V). `memory_limit`: the most
    activation bytes a rank may hold, as `find_schedule` takes it (default 1F1B's peak).
    `num_trial_steps`: the most timed steps per candidate in the trial (0: keep the search's
    pick); `num_trial_families`: how many of the fastest fitting families it is tried against.
    """
    if placement not in PROBE_FAMILIES:
        raise ConfigError(f"placement = {placement!r}; use one of {', '.join(PROBE_FAMILIES)}")
    if isinstance(num_trial_steps, bool) or not isinstance(num_trial_steps, int) or num_trial_steps < 0:
        raise ConfigError(f"num_trial_steps = {num_trial_steps!r}; give 0 (no trial) or more steps")
    if (
        isinstance(num_trial_families, bool)
        or not isinstance(num_trial_families, int)
        or num_trial_families < 1
    ):
        raise ConfigError(
            f"num_trial_families = {num_trial_families!r}; give 1 or more (num_trial_steps=0 skips the trial)"
        )
    if not isinstance(num_probe_steps, int) or num_probe_steps < 1:
        raise ConfigError(
            f"num_probe_steps = {num_probe_steps!r}; give at least 1 step (3 leaves one warm-up)"
        )
    options = _Options(
        layout or LayoutOptions(), parallel or ParallelOptions(), runtime or RuntimeOptions(),
        transport or TransportOptions(),
    )
    if options.parallel.optimizer is not None:
        raise ConfigError(
            "ParallelOptions.optimizer is given: tune_schedule searches flush schedules, which leave the "
            "update to the caller; drop it"
        )
    if not options.runtime.record_timeline:
        raise ConfigError(
            "RuntimeOptions.record_timeline=False: tune_schedule measures the probe's timelines; drop it"
        )
    virtual = num_virtual if num_virtual is not None else (1 if placement == "contiguous" else 2)
    probe_pipe = _probe_pipeline(layers, loss_fn, placement, num_microbatches, virtual, options)
    timelines, walls = [], []
    for _ in range(num_probe_steps):
        walls.append(_timed_step(probe_pipe, inputs, targets))
        timelines.append(probe_pipe.last_timeline)
    _drop_gradients(probe_pipe)
    keep = slice(1, None) if num_probe_steps > 1 else slice(None)
    timelines, walls = timelines[keep], walls[keep]
    probe = probe_pipe.schedule
    payload: Any = None
    if probe_pipe.rank == 0:
        payload = _search(
            timelines, walls, probe, virtual, placement, num_microbatches, time_budget_s, memory_limit,
            num_trial_families,
        )
    payload = _broadcast(probe_pipe, payload)
    if isinstance(payload, str):
        raise ScheduleError(f"tune_schedule: the search on rank 0 failed: {payload}")
    schedule_json, costs, predicted, probe_predicted, rivals_json = payload
    schedule = from_json(schedule_json)
    trials: tuple[tuple[str, float], ...] = ()
    rounds = 0
    if num_trial_steps > 0 and rivals_json:
        candidates = [schedule, *(from_json(rival) for rival in rivals_json)]
        medians, rounds = _trial(
            candidates, layers, loss_fn, inputs, targets, num_trial_steps, options, probe_pipe
        )
        # Rank 0's clock decides for everyone, like the search.
        winner = _broadcast(probe_pipe, min(range(len(candidates)), key=medians.__getitem__))
        trials = tuple((c.name, s) for c, s in zip(candidates, medians, strict=True))
        schedule = candidates[winner]
        predicted = simulate(schedule, costs).makespan
    return TunedSchedule(
        schedule=schedule,
        costs=costs,
        probe=probe,
        predicted_step_s=predicted,
        probe_predicted_step_s=probe_predicted,
        probe_step_s=tuple(walls),
        trials=trials,
        trial_rounds=rounds,
    )


def _trial(
    candidates: list[Schedule],
    layers: nn.Sequential | Sequence[LayerLike],
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    max_rounds: int,
    options: _Options,
    decider: Pipeline,
) -> tuple[list[float], int]:
    """This rank's median step per candidate and the rounds run: one untimed step each, then
    rounds that alternate the candidates (a drift of the machine hits them alike) until rank 0
    sees a clear leader (`_separated`) or `max_rounds` are done."""
    pipes = [options.pipeline(layers, loss_fn, candidate) for candidate in candidates]
    for pipe in pipes:
        _timed_step(pipe, inputs, targets)
    samples: list[list[float]] = [[] for _ in pipes]
    rounds = 0
    while rounds < max_rounds:
        for pipe, times in zip(pipes, samples, strict=True):
            times.append(_timed_step(pipe, inputs, targets))
        rounds += 1
        if 2 <= rounds < max_rounds:
            # Every rank must stop after the same round, so rank 0's samples decide.
            stop = _separated(samples) if decider.rank == 0 else None
            if _broadcast(decider, stop):
                break
    for pipe in pipes:
        _drop_gradients(pipe)
    return [statistics.median(times) for times in samples], rounds


def _separated(samples: list[list[float]]) -> bool:
    """Whether every step of the candidate with the shortest median beat every step of each other."""
    leader = min(range(len(samples)), key=lambda index: statistics.median(samples[index]))
    slowest_of_leader = max(samples[leader])
    return all(min(times) > slowest_of_leader for index, times in enumerate(samples) if index != leader)


def _timed_step(pipe: Pipeline, inputs: Any, targets: Any) -> float:
    start = time.perf_counter()
    pipe.step(inputs, targets)
    return time.perf_counter() - start


def _drop_gradients(pipe: Pipeline) -> None:
    """Tuning steps are not training steps: leave no gradient behind."""
    for parameter in pipe.parameters():
        parameter.grad = None


def _probe_pipeline(
    layers: nn.Sequential | Sequence[LayerLike],
    loss_fn: LossFn,
    placement: Placement,
    num_microbatches: int,
    num_virtual: int,
    options: _Options,
) -> Pipeline:
    # A first Pipeline on the family itself would build stages twice; the family's schedule
    # only needs the rank count, which the group gives.
    num_ranks = ParallelDims.of(options.parallel).num_ranks
    base = probe_base(
        placement, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual
    )
    # Keep the probe's adjacent I, W apart: their costs are what it measures.
    probing = replace(options, runtime=replace(options.runtime, fuse_backward=False))
    return probing.pipeline(layers, loss_fn, probe_schedule(base))


def _search(
    timelines: list[Any],
    walls: list[float],
    probe: Schedule,
    num_virtual: int,
    placement: Placement,
    num_microbatches: int,
    time_budget_s: float,
    memory_limit: int | None,
    num_rivals: int,
) -> Any:
    """Rank 0: (schedule JSON, costs, predicted, probe family predicted, rival families' JSON),
    or the error text. The rivals are the `num_rivals` fastest families of the same layout
    within the memory limit, leaving out any whose order is the searched one."""
    try:
        costs = measured_cost_model(timelines, probe, step_times=walls)
        search = search_schedule(
            costs,
            num_ranks=probe.num_ranks,
            num_microbatches=num_microbatches,
            num_virtual=num_virtual,
            placement=placement,
            memory_limit=memory_limit,
            time_budget_s=time_budget_s,
        )
        found = search.schedule
        rivals_json: list[dict[str, Any]] = []
        for rival in (c for c in search.baselines if c.fits and c.placement == found.placement):
            if len(rivals_json) == num_rivals:
                break
            built = build(
                rival.name,
                num_ranks=probe.num_ranks,
                num_microbatches=num_microbatches,
                num_virtual=found.num_stages // probe.num_ranks,
            )
            if built.actions != found.actions:
                rivals_json.append(to_json(built))
        base = probe_base(
            placement, num_ranks=probe.num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual
        )
        return (
            to_json(found),
            costs,
            simulate(found, costs).makespan,
            simulate(base, costs).makespan,
            rivals_json,
        )
    except PipefoldError as error:
        return f"{type(error).__name__}: {error}"


def _broadcast(pipe: Pipeline, payload: Any) -> Any:
    """Rank 0's `payload` on every rank: over the pipeline's group, then from replica 0 to
    the other data-parallel replicas and from tp rank 0 to its tensor-parallel peers. Each
    pipeline's rank 0 decides on its own measurements, and replicas or tp peers that ran
    different schedules would deadlock (tp) or be refused (dp), so the decision of the
    first pipeline (dp 0, tp 0) is everyone's."""
    box = [payload]
    groups = [pipe.process_group, pipe.data_parallel_group, pipe.tensor_parallel_group]
    for group in groups:
        if group is not None:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
