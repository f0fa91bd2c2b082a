"""The benchmark driver: baselines, profile, pipelined runs and the records that join them.

    document = run_benchmark(QUICK, RunOptions(), on_record=print_json_line)

Order of work: in this process, with the machine otherwise idle, the one-process
baselines and the per-layer profile of every (workload, M); then, per rank count, one
set of spawned ranks runs every configuration, both libraries alternating. Each
configuration's record joins its measurements with the baselines (efficiency) and the
simulator's prediction.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.machine import describe_machine
from benchmarks.harness.orchestrate import run_ranks
from benchmarks.harness.pairs import PAIRS, SOLO
from benchmarks.harness.predict import calibration_scale, predict
from benchmarks.harness.results import BenchConfig, ConfigResult, LayerCost, RunOptions
from benchmarks.harness.stats import summarize
from pipefold.errors import PipefoldError
from pipefold.schedule import build
from pipefold.schedule.io import from_json
from pipefold.simulate import Link

__all__ = ["FULL", "OVERHEAD", "QUICK", "Matrix", "run_benchmark"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Matrix:
    """The cross product of workloads x ranks x micro-batches x schedules to run."""

    workloads: tuple[str, ...]
    ranks: tuple[int, ...]
    microbatches: tuple[int, ...]
    schedules: tuple[str, ...]

    def configs(self, num_ranks: int) -> list[BenchConfig]:
        return [
            BenchConfig(workload, schedule, num_ranks, num_microbatches)
            for workload in self.workloads
            for num_microbatches in self.microbatches
            for schedule in self.schedules
        ]


FULL = Matrix(("mlp", "transformer"), (2, 4), (4, 8, 16), (*PAIRS, *SOLO))
QUICK = Matrix(("mlp",), (2,), (8,), ("gpipe", "1f1b", "zb-v"))
OVERHEAD = Matrix(("tiny",), (2,), (64,), ("gpipe", "1f1b"))
"""Per-action overhead: 64 one-sample micro-batches of a d=8 model, so compute is negligible."""


@dataclass
class Baselines:
    """One-process measurements of one workload, shared by all its configurations."""

    accumulate: dict[int, Any] = field(default_factory=dict)
    """M -> BaselineResult (1 thread, M accumulated micro-batches)."""
    full_batch: Any = None
    """BaselineResult (num_threads threads, no micro-batching)."""
    layer_costs: dict[int, list[LayerCost]] = field(default_factory=dict)
    """M -> per-layer costs on a micro-batch of batch/M samples."""


def measure_baselines(
    workload_name: str, microbatches: Sequence[int], options: RunOptions, full_batch_threads: int
) -> Baselines:
    # torch only here, where the baselines run: `python benchmarks/run.py --help` and bad
    # options are answered without importing it.
    import torch

    from benchmarks.harness.baseline import time_accumulation
    from benchmarks.harness.profile import profile_layers
    from benchmarks.harness.workloads import workload

    work = workload(workload_name)
    baselines = Baselines()
    steps = max(options.timed_steps // 2, 3)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for num_microbatches in microbatches:
            layers = work.build_layers(options.seed)
            logger.info("baseline %s M=%d (one process, 1 thread)", workload_name, num_microbatches)
            baselines.accumulate[num_microbatches] = time_accumulation(
                work, layers, num_microbatches, timed_steps=steps, gate=options.gate, seed=options.seed
            )
            baselines.layer_costs[num_microbatches] = profile_layers(
                work, layers, max(work.batch_size // num_microbatches, 1), seed=options.seed
            )
        baselines.full_batch = time_accumulation(
            work,
            work.build_layers(options.seed),
            1,
            num_threads=full_batch_threads,
            timed_steps=steps,
            gate=options.gate,
            seed=options.seed,
        )
    finally:
        torch.set_num_threads(previous_threads)
    return baselines


def _median(samples: Sequence[float]) -> float | None:
    return summarize(samples).median if samples else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def build_record(
    result: ConfigResult,
    baselines: Baselines,
    link: dict[str, float] | None = None,
    peer: str = "torch",
) -> dict[str, Any]:
    """One flat JSON-able record per configuration (also the `--quick` JSON line).

    `link` is the measured link between the ranks (see benchmarks.harness.link); without it
    the prediction assumes free communication.
    """
    from pipefold.runtime.processes.cores import shared_cores  # pipefold.runtime imports torch

    config = result.config
    schedule_pair = config.pair
    sides = result.sides
    medians = {label: _median(side.samples_s) for label, side in sides.items()}
    parent_single = baselines.accumulate[config.num_microbatches].median_s
    # Prefer the baseline timed inside the alternation: it saw the machine the pipelines saw.
    interleaved = _median(sides["one-process"].samples_s) if "one-process" in sides else None
    single = interleaved if interleaved is not None else parent_single
    full = baselines.full_batch.median_s

    def efficiency(step_s: float | None) -> float | None:
        return _ratio(single, None if step_s is None else config.num_ranks * step_s)

    predicted: float | None = None
    predicted_bubble: float | None = None
    predicted_activation: list[int] | None = None
    predicted_timeline: dict[str, Any] | None = None
    num_actions: int | None = None
    costs = baselines.layer_costs[config.num_microbatches]
    searched_json = sides["pipefold"].schedule if "pipefold" in sides else None
    try:
        searched = None if searched_json is None else from_json(searched_json)
        if schedule_pair.torch_class is None and searched is None:
            raise PipefoldError(f"{config.key}: the searched schedule was not recorded")
        timeline = predict(
            schedule_pair,
            config.num_ranks,
            config.num_microbatches,
            costs,
            scale=calibration_scale(costs, config.num_microbatches, single),
            link=None if link is None else Link(link["latency_s"], link["bandwidth_bytes_per_s"]),
            # Every rank computes on 1 thread; more ranks than cores take turns on them.
            num_cores=shared_cores(config.num_ranks, threads_per_rank=1),
            schedule=searched,
        )
        predicted = timeline.makespan
        predicted_bubble = timeline.bubble_fraction
        predicted_activation = list(timeline.activation_bytes_peak)
        predicted_timeline = timeline.to_json()
        schedule = searched if searched is not None else build(
            schedule_pair.schedule,
            num_ranks=config.num_ranks,
            num_microbatches=config.num_microbatches,
            num_virtual=schedule_pair.num_virtual,
        )
        num_actions = max(len(row) for row in schedule.actions)
    except PipefoldError as error:
        logger.info("no prediction for %s: %s", config.key, error)
    pipefold_s = medians.get("pipefold")
    peer_s = medians.get(peer)
    calibrated = sides["pipefold"].calibrated_prediction_s if "pipefold" in sides else None
    record: dict[str, Any] = {
        "workload": config.workload,
        "schedule": config.schedule,
        "peer_schedule": schedule_pair.torch_class,
        # What a searched row ran: "auto", or the family that won the measured trial.
        "searched_schedule": None if searched_json is None else searched_json.get("name"),
        "ranks": config.num_ranks,
        "microbatches": config.num_microbatches,
        "num_virtual": schedule_pair.num_virtual,
        "pipefold_step_s": pipefold_s,
        "peer_step_s": peer_s,
        "ratio": _ratio(peer_s, pipefold_s),
        "efficiency": efficiency(pipefold_s),
        "peer_efficiency": efficiency(peer_s),
        "predicted_step_s": predicted,
        "prediction_error": None if predicted is None or not pipefold_s else predicted / pipefold_s - 1.0,
        "calibrated_predicted_step_s": calibrated,
        "calibrated_prediction_error": (
            None if calibrated is None or not pipefold_s else calibrated / pipefold_s - 1.0
        ),
        "predicted_bubble": predicted_bubble,
        "single_process_s": single,
        "single_process_source": "interleaved" if interleaved is not None else "before",
        "single_process_before_s": parent_single,
        "full_batch_s": full,
        "pipefold_spread": summarize(sides["pipefold"].samples_s).spread if pipefold_s else None,
        "peer_spread": summarize(sides[peer].samples_s).spread if peer_s else None,
        "actions_per_rank": num_actions,
        "pipefold_per_action_s": _ratio(pipefold_s, num_actions),
        "peer_per_action_s": _ratio(peer_s, num_actions),
        "predicted_activation_bytes_peak": predicted_activation,
        "skipped": result.skipped,
        "predicted_timeline": predicted_timeline,
        "sides": {label: side.to_json() for label, side in sides.items()},
    }
    if "deepspeed" in sides:
        record["deepspeed_step_s"] = medians["deepspeed"]
        record["deepspeed_ratio"] = _ratio(medians["deepspeed"], pipefold_s)
        record["deepspeed_efficiency"] = efficiency(medians["deepspeed"])
    return record


def _microbatches_of(matrices: Sequence[Matrix], workload_name: str) -> list[int]:
    return sorted({m for mx in matrices if workload_name in mx.workloads for m in mx.microbatches})


def run_benchmark(
    matrices: Sequence[Matrix],
    options: RunOptions,
    *,
    full_batch_threads: int = 2,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run every matrix; returns the results document (what results/*.json hold)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    baselines: dict[str, Baselines] = {}
    for matrix in matrices:
        for workload_name in matrix.workloads:
            if workload_name not in baselines:
                baselines[workload_name] = measure_baselines(
                    workload_name,
                    _microbatches_of(matrices, workload_name),
                    options,
                    full_batch_threads,
                )
    records: list[dict[str, Any]] = []
    links: dict[int, dict[str, float]] = {}

    def collect(result: ConfigResult) -> None:
        config = result.config
        record = build_record(result, baselines[config.workload], links.get(config.num_ranks))
        records.append(record)
        if on_record is not None:
            on_record(record)

    rank_counts = sorted({num_ranks for matrix in matrices for num_ranks in matrix.ranks})
    for num_ranks in rank_counts:
        configs = [c for matrix in matrices if num_ranks in matrix.ranks for c in matrix.configs(num_ranks)]
        logger.info("running %d configurations on %d ranks", len(configs), num_ranks)

        def keep_link(link: dict[str, float], num_ranks: int = num_ranks) -> None:
            links[num_ranks] = link

        run_ranks(num_ranks, configs, options, collect, keep_link)
    return {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "options": {
            "warmup_steps": options.warmup_steps,
            "timed_steps": options.timed_steps,
            "libraries": list(options.libraries),
            "quiet_threshold": options.gate.threshold,
            "quiet_max_retries": options.gate.max_retries,
            "seed": options.seed,
            "full_batch_threads": full_batch_threads,
        },
        "baselines": {
            name: {
                "accumulate": {str(m): b.to_json() for m, b in base.accumulate.items()},
                "full_batch": base.full_batch.to_json(),
                "layer_costs": {
                    str(m): [cost.to_json() for cost in costs] for m, costs in base.layer_costs.items()
                },
            }
            for name, base in baselines.items()
        },
        "links": {str(num_ranks): link for num_ranks, link in links.items()},
        "records": records,
    }
