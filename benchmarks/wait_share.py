"""How often a rank waits for its peer, and the runtime's CPU work per action beside the waits.

    .venv/bin/python benchmarks/wait_share.py --ranks 2 --schedules gpipe 1f1b interleaved-1f1b --steps 8

Launches the ranks once; per schedule, pipefold's step and `overhead.py`'s two plain-torch
floors (stage order and schedule order, the `tiny` workload, M=64) run alternately step by step
on every rank. `Watchdog.wait_until` (a receive whose message is not there yet) is wrapped in
the ranks to count the waits and take their wall and thread CPU time (the runtime's code is
unchanged). Per rank it prints, per compute action: the share of receives that waited, the
wall time in those waits, pipefold's thread CPU time less the CPU the waits burnt (the
runtime's work and the compute it drives), each floor's thread CPU time, and the differences.
Thread CPU time (`time.thread_time`, torch on one thread) leaves out the time a rank is not on
a core, so under other processes' load it moves less than wall time (their cache misses still
reach it); a busy wait burns CPU, which is why it is taken out. If the 1F1B family's runtime
work over its schedule-order floor is the same as GPipe's, its larger wall excess comes from
the waits (the coupling of the ranks), not from work per action.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload
    from benchmarks.overhead import _PlainSide, _ScheduleOrderPlainSide
    from pipefold.runtime.failure import Watchdog
    from pipefold.schedule import lower

    waits = {"count": 0, "wall": 0.0, "cpu": 0.0}
    original = Watchdog.wait_until

    def wait_until(self, *a, **k):  # type: ignore[no-untyped-def]
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(self, *a, **k)
        finally:
            waits["count"] += 1
            waits["wall"] += time.perf_counter() - wall
            waits["cpu"] += time.thread_time() - cpu

    Watchdog.wait_until = wait_until  # type: ignore[method-assign]

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    results = {}
    for name in args.schedules:
        schedule_pair = pair(name)
        layers = work.build_layers(0)
        pipefold = PipefoldSide(work, layers, schedule_pair, num_ranks=num_ranks, num_microbatches=args.microbatches)
        schedule = pipefold.pipe.schedule
        sides = [
            pipefold,
            _PlainSide(work, layers, schedule_pair, rank=rank, num_ranks=num_ranks, num_microbatches=args.microbatches),
            _ScheduleOrderPlainSide(work, layers, schedule_pair, schedule, rank=rank,
                                    num_microbatches=args.microbatches),
        ]
        program = lower(schedule)
        row = program.instructions[rank]
        actions = sum(1 for action in row if action.op.is_compute and action.op.name != "STEP")
        receives = sum(1 for action in row if action.op.name.startswith("RECV"))
        samples: dict[str, list[tuple[float, float]]] = {side.label: [] for side in sides}
        wait_samples: list[tuple[int, float, float]] = []
        for index in range(args.warmup + args.steps):
            for side in sides:
                side.zero_grad()
                dist.barrier()
                waits.update(count=0, wall=0.0, cpu=0.0)
                wall, cpu = time.perf_counter(), time.thread_time()
                side.step(inputs, targets)
                cpu = time.thread_time() - cpu
                wall = time.perf_counter() - wall
                if index >= args.warmup:
                    samples[side.label].append((wall, cpu))
                    if side.label == "pipefold":
                        wait_samples.append((int(waits["count"]), waits["wall"], waits["cpu"]))
        gathered: list = [None] * num_ranks
        dist.all_gather_object(gathered, (samples, wait_samples, actions, receives))
        results[name] = gathered
        del sides, pipefold
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def summarize(results: dict) -> dict:  # type: ignore[type-arg]
    """Per schedule: the wall step per action and over each floor (the slowest rank's, as
    overhead.py takes it), and per rank the waits and the CPU time per compute action."""
    med = statistics.median
    out: dict = {}  # type: ignore[type-arg]
    for name, ranks in results.items():
        actions = max(entry[2] for entry in ranks)
        num_steps = len(ranks[0][0]["pipefold"])
        wall = {
            label: med(max(entry[0][label][i][0] for entry in ranks) for i in range(num_steps)) / actions * 1e6
            for label in ranks[0][0]
        }
        per_rank = []
        for samples, wait_samples, rank_actions, receives in ranks:
            per = 1e6 / rank_actions
            cpu = {label: med(s[1] for s in values) * per for label, values in samples.items()}
            # Per step, pipefold's CPU less the CPU its waits burnt, then the median.
            work = med(s[1] - w[2] for s, w in zip(samples["pipefold"], wait_samples, strict=True)) * per
            waited = med(w[0] for w in wait_samples)
            per_rank.append({
                "actions": rank_actions,
                "receives": receives,
                "waited": waited,
                "waited_share": waited / receives if receives else 0.0,
                "wait_wall_us": med(w[1] for w in wait_samples) * per,
                "wait_cpu_us": med(w[2] for w in wait_samples) * per,
                "work_cpu_us": work,
                "stage_floor_cpu_us": cpu["plain"],
                "schedule_floor_cpu_us": cpu["plain-order"],
                "work_over_stage_floor_us": work - cpu["plain"],
                "work_over_schedule_floor_us": work - cpu["plain-order"],
            })
        out[name] = {
            "wall_us": wall["pipefold"],
            "wall_over_stage_floor_us": wall["pipefold"] - wall["plain"],
            "wall_over_schedule_floor_us": wall["pipefold"] - wall["plain-order"],
            "ranks": per_rank,
        }
    return out


def _report(results: dict) -> None:  # type: ignore[type-arg]
    for name, entry in summarize(results).items():
        print(f"== {name}: wall µs/action pipefold {entry['wall_us']:.0f}, over stage-order floor "
              f"{entry['wall_over_stage_floor_us']:.0f}, over schedule-order floor "
              f"{entry['wall_over_schedule_floor_us']:.0f}")
        for rank, r in enumerate(entry["ranks"]):
            print(
                f"  rank {rank}: {r['actions']} actions, {r['receives']} receives, waited {r['waited']:.0f} "
                f"({r['waited_share']:.0%}); per action µs: waits wall {r['wait_wall_us']:.0f} "
                f"(CPU {r['wait_cpu_us']:.0f}); CPU: pipefold less waits {r['work_cpu_us']:.0f}, stage-order "
                f"floor {r['stage_floor_cpu_us']:.0f}, schedule-order floor {r['schedule_floor_cpu_us']:.0f}; "
                f"runtime's work over them {r['work_over_stage_floor_us']:.0f} / "
                f"{r['work_over_schedule_floor_us']:.0f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/wait_share.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved-1f1b"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--microbatches", str(args.microbatches), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--schedules", *args.schedules]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipefold", "launch", "-n", str(args.ranks), "--", __file__, *worker],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            results = json.loads(line[len("RESULT "):])
            _report(results)
            if args.json is not None:
                args.json.write_text(json.dumps(results))
            print(f"({time.perf_counter() - started:.0f} s)")
            return 0
    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    return done.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
