"""What a schedule's order of F and B costs plain torch: the two floors of overhead.py, alone.

    .venv/bin/python benchmarks/floor_order.py --ranks 2 --schedules gpipe 1f1b interleaved-1f1b --steps 24

Launches the ranks once; on every rank, `overhead.py`'s two plain-torch floors of each
schedule (its `tiny` workload, M=64) run alternately step by step, with no pipeline beside
them: per stage every forward, then every backward ("stage order", the floor issue 31's
target is measured over), and the rank's F, B, I, W in the order of the schedule that runs
("schedule order"). Each step is timed in wall time (the slowest rank's, as overhead.py
takes it) and in each rank's thread CPU time (`time.thread_time`, torch on one thread),
which the other processes of a shared host inflate less than wall time. Prints µs per
compute action of each, and schedule order less stage order. gpipe's two orders are the
same actions: its difference is the measurement's own noise and the second floor's loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    from benchmarks.harness.workloads import workload
    from benchmarks.overhead import _PlainSide, _ScheduleOrderPlainSide
    from pipefold.runtime.arguments import resolve_schedule
    from pipefold.schedule.lower import fuse_adjacent_split_backward

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    layers = work.build_layers(0)
    results = {}
    for name in args.schedules:
        schedule_pair = pair(name)
        # The schedule a Pipeline runs (RuntimeOptions' default fuses adjacent I/W pairs).
        schedule = fuse_adjacent_split_backward(
            resolve_schedule(schedule_pair.schedule, num_ranks, args.microbatches, schedule_pair.num_virtual)
        )
        sides = [
            _PlainSide(work, layers, schedule_pair, rank=rank, num_ranks=num_ranks,
                       num_microbatches=args.microbatches),
            _ScheduleOrderPlainSide(work, layers, schedule_pair, schedule, rank=rank,
                                    num_microbatches=args.microbatches),
        ]
        wall: list[list[float]] = [[], []]
        cpu: list[list[float]] = [[], []]
        for index in range(args.warmup + args.steps):
            for k in (0, 1) if index % 2 else (1, 0):
                sides[k].zero_grad()
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.thread_time()
                sides[k].step(inputs, targets)
                if index >= args.warmup:
                    wall[k].append(time.perf_counter() - start)
                    cpu[k].append(time.thread_time() - start_cpu)
        gathered: list = [None] * num_ranks
        dist.all_gather_object(gathered, (wall, cpu))
        actions = max(sum(1 for a in row if a.op.value in ("F", "B", "I", "W")) for row in schedule.actions)
        per = 1e6 / actions
        results[name] = {
            "actions_per_rank": actions,
            "wall_us": [
                statistics.median(max(column) for column in zip(*(g[0][k] for g in gathered), strict=True))
                * per
                for k in (0, 1)
            ],
            "cpu_us": [[statistics.median(g[1][k]) * per for k in (0, 1)] for g in gathered],
        }
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/floor_order.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved-1f1b"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--microbatches", str(args.microbatches), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--schedules", *args.schedules]
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, args.ranks, worker, code=ROOT, timeout=args.timeout, capture=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(
            f"ranks failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    results = json.loads(lines[-1][len("RESULT "):])
    cpu_header = "".join(f" rank {r} CPU stage / schedule |" for r in range(args.ranks))
    print("| schedule | actions/rank | wall stage order | wall schedule order | wall difference |"
          + cpu_header + " CPU difference per rank |")
    print("|" + "---|" * (6 + args.ranks))
    for name, r in results.items():
        stage, ordered = r["wall_us"]
        cpu = "".join(f" {c[0]:.0f} / {c[1]:.0f} |" for c in r["cpu_us"])
        diffs = ", ".join(f"{c[1] - c[0]:+.0f}" for c in r["cpu_us"])
        print(f"| {name} | {r['actions_per_rank']} | {stage:.0f} | {ordered:.0f} | "
              f"{ordered - stage:+.0f} |{cpu} {diffs} |")
    print("\nµs per compute action; wall: the slowest rank's step, median of steps; "
          "CPU: each rank's thread CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
