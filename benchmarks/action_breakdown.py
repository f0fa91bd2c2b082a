"""Where a step's time goes on each rank, read off the measured timeline of the `tiny` workload.

    .venv/bin/python benchmarks/action_breakdown.py --ranks 2 --schedules gpipe 1f1b

For each schedule and rank, over the timed steps: the median duration of each compute op
(F, B, I, W: the torch work and the handler around it), the time in waits per action (a
consumer waiting for its message), the gaps between consecutive compute events less the waits, per action
(the message actions and the loop between them), and, for every wait longer than 30 µs, the exposed
latency of its message: from the sender's compute end to the waiting rank's wait end (one
clock: the ranks share a host). A schedule whose actions are slower than plain torch's (see
`benchmarks/overhead.py --floor`) shows here whether the compute events themselves grew, the
waits did, or the gaps did.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(len(ordered) * q), len(ordered) - 1)]  # noqa: E731
    return f"n={len(ordered)} p10 {pick(0.1):.0f} median {pick(0.5):.0f} p90 {pick(0.9):.0f}"


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload
    from pipefold.schedule import Op

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=num_ranks,
                            num_microbatches=args.microbatches)
        timelines = []
        for index in range(args.warmup + args.steps):
            dist.barrier()
            side.pipe.step(inputs, targets)
            if index >= args.warmup and rank == 0:
                timelines.append(side.pipe.last_timeline)
        if rank == 0:
            print(f"== {name} ({num_ranks} ranks, M={args.microbatches}, {args.steps} steps)")
            exposed: list[float] = []
            per_rank = []
            for r in range(num_ranks):
                durations: dict[str, list[float]] = {}
                waits_per_action, gaps_per_action = [], []
                for timeline in timelines:
                    ends = {(e.action.op, e.action.stage, e.action.microbatch): e.end
                            for row in timeline.events for e in row}
                    events = timeline.events[r]
                    waits = timeline.waits[r] if timeline.waits else ()
                    for event in events:
                        duration = (event.end - event.start) * 1e6
                        durations.setdefault(event.action.op.name, []).append(duration)
                    waits_per_action.append(sum(w.end - w.start for w in waits) / len(events) * 1e6)
                    # A consumer's event starts when its wait ends: the gaps hold the waits.
                    gaps = sum(b.start - a.end for a, b in zip(events, events[1:], strict=False))
                    gaps -= sum(w.end - w.start for w in waits)
                    gaps_per_action.append(gaps / len(events) * 1e6)
                    for wait in waits:
                        action = wait.waiting_for
                        if wait.end - wait.start <= 30e-6:
                            continue
                        if action.op is Op.F:
                            source = [(Op.F, action.stage - 1, action.microbatch)]
                        else:
                            source = [(op, action.stage + 1, action.microbatch) for op in (Op.B, Op.I)]
                        sent = [ends[key] for key in source if key in ends]
                        if sent:
                            exposed.append((wait.end - sent[0]) * 1e6)
                ops = ", ".join(f"{op} {statistics.median(v):.0f}" for op, v in sorted(durations.items()))
                per_rank.append(
                    f"  rank {r}: median µs per event {ops}; "
                    f"waits {statistics.median(waits_per_action):.0f} µs/action; "
                    f"gaps {statistics.median(gaps_per_action):.0f} µs/action"
                )
            print("\n".join(per_rank))
            print(f"  exposed message latency µs (sender's compute end -> wait end): {_quantiles(exposed)}",
                  flush=True)
        del side
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/action_breakdown.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
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
    print(f"({time.perf_counter() - started:.0f} s)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
