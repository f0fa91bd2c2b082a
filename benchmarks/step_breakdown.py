"""Where `pipefold train`'s wall step goes: its loop's parts and the pipeline call's, timed per rank.

    .venv/bin/python benchmarks/step_breakdown.py                    # 2 ranks, the default model, 1f1b
    .venv/bin/python benchmarks/step_breakdown.py --steps 20 --set schedule.num_microbatches=32

Runs `pipefold train`'s loop (pipefold.job.loop.train) on the ranks with `time.perf_counter`
and `time.process_time` stamps around each part of a step, the same parts in the same order:
the batch split and shape agreement, the executor's run of the schedule (its timeline: the
pipeline's makespan, each rank's compute and waits), the losses' and measurements' all-gather,
the gradients' finish, the global gradient norm (an all-reduce), the optimizer step, zero_grad
and the lr scheduler. Per part: the median over the steps after `--warmup`, wall and CPU
(CPU time depends less on other processes on the host than wall time), and its share of the
wall step (`pipefold train`'s `seconds`: from before the pipeline call to after the scheduler).
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


Parts = dict[str, list[tuple[float, float]]]


def _stamped(name: str, into: Parts, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            into[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    return run


def worker(config: Any, out: str, warmup: int) -> None:
    import torch.distributed as dist

    import pipefold.runtime.pipeline as pipeline_module
    from pipefold.job.optim import accumulated_step
    from pipefold.job.setup import set_up

    job = set_up(config)
    pipe, optimizer, scheduler = job.pipe, job.optimizer, job.scheduler
    assert optimizer is not None and scheduler is not None
    parts: Parts = defaultdict(list)
    split = pipeline_module.split_batch
    pipeline_module.split_batch = _stamped("split batch (shape agreement)", parts, split)
    executor = pipe._executor
    executor.run = _stamped("executor run (the schedule)", parts, executor.run)  # type: ignore[method-assign]
    pipe._agree_losses = _stamped("losses + timeline all-gather", parts, pipe._agree_losses)  # type: ignore[method-assign]
    finish = pipeline_module.StepGradients.finish
    pipeline_module.StepGradients.finish = _stamped("gradients finish", parts, finish)  # type: ignore[method-assign]
    rows: list[dict[str, float]] = []
    for _ in range(config.steps):
        before_batch = time.perf_counter()
        batches = [job.next_batch() for _ in range(config.grad_accumulation)]
        batch_s = time.perf_counter() - before_batch
        for values in parts.values():
            values.clear()
        started, cpu_started = time.perf_counter(), time.process_time()
        marks = [("start", started, cpu_started)]

        def mark(name: str, marks: list[tuple[str, float, float]] = marks) -> None:
            marks.append((name, time.perf_counter(), time.process_time()))

        accumulated_step(pipe, batches)
        mark("pipe.step")
        pipe.clip_grad_norm_(config.clip_norm) if config.clip_norm else pipe.gradient_scope().total_norm()
        mark("grad norm (all-reduce)")
        optimizer.step()
        mark("optimizer step")
        optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        scheduler.step()
        mark("lr scheduler")
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        timeline = pipe.last_timeline
        assert timeline is not None
        row: dict[str, float] = {"wall step": wall, "cpu step": cpu, "next batch": batch_s,
                                 "makespan": timeline.makespan,
                                 "compute (this rank)": timeline.busy_time(job.rank),
                                 "waits (this rank)": timeline.wait_time(job.rank),
                                 "compute actions (this rank)": float(len(timeline.events[job.rank]))}
        for (_, t0, c0), (name, t1, c1) in zip(marks, marks[1:], strict=False):
            row[name] = t1 - t0
            row["cpu " + name] = c1 - c0
        for name, values in parts.items():
            row["  " + name] = sum(v[0] for v in values)
            row["  cpu " + name] = sum(v[1] for v in values)
        rows.append(row)
    kept = rows[warmup:]
    medians = {key: statistics.median(r[key] for r in kept) for key in kept[0]}
    Path(out, f"rank{job.rank}.json").write_text(json.dumps({"medians": medians, "rows": rows}))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as pipefold train --set (values are JSON where they parse)")
    args = parser.parse_args()
    from benchmarks import step_breakdown
    from pipefold.job.config import load_config
    from pipefold.runtime.processes.launch import spawn

    overrides: dict[str, Any] = {"steps": args.steps, "schedule.ranks": args.ranks, "device": "cpu",
                                 "sample_tokens": 0, "eval_every": 0}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    out = tempfile.mkdtemp(prefix="pipefold-breakdown-")
    config = load_config(overrides={**overrides, "out": out})
    result = spawn(step_breakdown.worker, config.schedule.num_processes, (config, out, args.warmup))
    if not result.ok:
        raise SystemExit(result.describe())
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text())["medians"] for r in range(args.ranks)]
    keys = list(ranks[0])
    print("| part | " + " | ".join(f"rank {r} ms" for r in range(args.ranks)) + " | share of wall step |")
    print("|---|" + "---|" * (args.ranks + 1))
    for key in keys:
        values = [ranks[r].get(key, 0.0) for r in range(args.ranks)]
        if "actions" in key:
            print(f"| {key} | " + " | ".join(f"{v:.0f}" for v in values) + " | |")
            continue
        share = statistics.fmean(v / ranks[r]["wall step"] for r, v in enumerate(values))
        print(f"| {key} | " + " | ".join(f"{v * 1e3:.2f}" for v in values) + f" | {share:.1%} |")


if __name__ == "__main__":
    main()
