"""Sends from the compute handler against sends as their own actions, alternated step by step.

    .venv/bin/python benchmarks/hop_ab.py --ranks 2 --schedules 1f1b gpipe zb-h1 --steps 40

The `tiny` workload (M=64). In the same ranks and pipeline, steps 0 and 3 of every 4 run the
executor's dispatch as it is (each compute action sends its output from its own handler:
docs/decisions.md, "sends from the compute handler") and steps 1 and 2 its one-handler-per-action
dispatch (what `Executor.intercept` runs, and what the executor ran before), so a drifting or
loaded host hits both alike (no step counts activation bytes after the first). Prints per
schedule the median step time of each and the difference per compute action. Everything else on
the message path (no detach on shared memory, leaves made at post) is the same in both.
"""

from __future__ import annotations

import argparse
import os
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
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload
    from pipefold.runtime.memory import CountingTurns

    rank = dist.get_rank()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=dist.get_world_size(),
                            num_microbatches=args.microbatches)
        executor = side.pipe.executor
        # No step counts activation bytes (every `count_memory_every`-th would, always in the
        # same turn of the alternation), but the first of the batch shape, a warm-up step.
        side.pipe._counting = CountingTurns(1 << 30)
        fused = (executor._dispatch, executor._fused_codes)
        plain = (executor._plain_dispatch, ())
        times: dict[str, list[float]] = {"fused": [], "plain": []}
        for index in range(args.warmup + 2 * args.steps):
            # fused, plain, plain, fused, ...: a drift and any period-2 effect hit both alike.
            mode = "fused" if index % 4 in (0, 3) else "plain"
            executor._dispatch, executor._fused_codes = fused if mode == "fused" else plain
            dist.barrier()
            start = time.perf_counter()
            side.pipe.step(inputs, targets)
            if index >= args.warmup:
                times[mode].append(time.perf_counter() - start)
        executor._dispatch, executor._fused_codes = fused
        if rank == 0:
            actions = sum(1 for a in side.pipe.executor._plain_dispatch if a[2])
            fast, slow = statistics.median(times["fused"]), statistics.median(times["plain"])
            print(f"{name}: step {fast * 1e3:.2f} ms fused, {slow * 1e3:.2f} ms one handler per action; "
                  f"fused/plain {fast / slow:.3f}; {(slow - fast) / actions * 1e6:.1f} µs per compute action "
                  f"({actions} on rank 0)", flush=True)
        del side
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/hop_ab.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "zb-h1"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="steps of each kind")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--microbatches", str(args.microbatches), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--schedules", *args.schedules]
    started = time.perf_counter()
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, args.ranks, worker, code=ROOT, timeout=args.timeout)
    print(f"({time.perf_counter() - started:.0f} s; load {os.getloadavg()[0]:.2f})")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
