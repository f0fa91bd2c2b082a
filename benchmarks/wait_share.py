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

`--breakdown` also times every handler (`Executor.intercept`, about 2 µs an action more): the
CPU split into compute handlers (F, B, I, W, with the receive's completion they run), message
handlers and the rest, and per compute op the CPU of a call that waited for its message against
one that did not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed_handlers(by_op: dict[str, list[float]], waits: dict[str, float]):  # type: ignore[no-untyped-def]
    """An `Executor.intercept` wrapper that adds each handler's thread CPU time, less the CPU of
    the waits inside it, to `by_op[key]` ([seconds, calls]; the key is the op's name, with "~"
    after it where the handler waited for its message): two clock reads per action, about 1 µs
    each."""
    def wrapper(action, handler):  # type: ignore[no-untyped-def]
        name = action.op.name
        clock = time.thread_time

        def timed(action):  # type: ignore[no-untyped-def]
            count, waited, start = waits["count"], waits["cpu"], clock()
            handler(action)
            spent = (clock() - start) - (waits["cpu"] - waited)
            entry = by_op.setdefault(name + "~" if waits["count"] != count else name, [0.0, 0])
            entry[0] += spent
            entry[1] += 1

        return timed

    return wrapper


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
        pipefold = PipefoldSide(work, layers, schedule_pair, num_ranks=num_ranks,
                                num_microbatches=args.microbatches)
        by_op: dict[str, list[float]] = {}
        if args.breakdown:
            pipefold.pipe.executor.intercept(_timed_handlers(by_op, waits))
        schedule = pipefold.pipe.schedule
        sides = [
            pipefold,
            _PlainSide(work, layers, schedule_pair, rank=rank, num_ranks=num_ranks,
                       num_microbatches=args.microbatches),
            _ScheduleOrderPlainSide(work, layers, schedule_pair, schedule, rank=rank,
                                    num_microbatches=args.microbatches),
        ]
        program = lower(schedule)
        row = program.instructions[rank]
        actions = sum(1 for action in row if action.op.is_compute and action.op.name != "STEP")
        receives = sum(1 for action in row if action.op.name.startswith("RECV"))
        samples: dict[str, list[tuple[float, float]]] = {side.label: [] for side in sides}
        wait_samples: list[tuple[int, float, float]] = []
        op_samples: list[dict[str, list[float]]] = []
        for index in range(args.warmup + args.steps):
            for side in sides:
                side.zero_grad()
                dist.barrier()
                waits.update(count=0, wall=0.0, cpu=0.0)
                by_op.clear()
                wall, cpu = time.perf_counter(), time.thread_time()
                side.step(inputs, targets)
                cpu = time.thread_time() - cpu
                wall = time.perf_counter() - wall
                if index >= args.warmup:
                    samples[side.label].append((wall, cpu))
                    if side.label == "pipefold":
                        wait_samples.append((int(waits["count"]), waits["wall"], waits["cpu"]))
                        op_samples.append({k: list(v) for k, v in by_op.items()})
        gathered: list = [None] * num_ranks
        dist.all_gather_object(gathered, (samples, wait_samples, actions, receives, op_samples))
        results[name] = gathered
        del sides, pipefold
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _per_call(entry: list[float] | None) -> tuple[float, int]:
    """(µs per call, calls) of a [seconds, calls] total; (0, 0) for none."""
    if not entry or not entry[1]:
        return 0.0, 0
    return entry[0] / entry[1] * 1e6, int(entry[1])


def summarize(results: dict) -> dict:  # type: ignore[type-arg]
    """Per schedule: the wall step per action and over each floor (the slowest rank's, as
    overhead.py takes it), and per rank the waits and the CPU time per compute action."""
    med = statistics.median
    out: dict = {}  # type: ignore[type-arg]
    for name, ranks in results.items():
        actions = max(entry[2] for entry in ranks)
        num_steps = len(ranks[0][0]["pipefold"])
        wall = {
            label: med(max(entry[0][label][i][0] for entry in ranks) for i in range(num_steps))
            / actions * 1e6
            for label in ranks[0][0]
        }
        per_rank = []
        for samples, wait_samples, rank_actions, receives, *rest in ranks:
            per = 1e6 / rank_actions
            cpu = {label: med(s[1] for s in values) * per for label, values in samples.items()}
            # Per step, pipefold's CPU less the CPU its waits burnt, then the median.
            work = med(s[1] - w[2] for s, w in zip(samples["pipefold"], wait_samples, strict=True)) * per
            waited = med(w[0] for w in wait_samples)
            op_samples = rest[0] if rest else []
            parts: dict[str, float] = {}
            if op_samples and op_samples[0]:
                compute = ("F", "B", "I", "W")
                # Per step: compute handlers, message handlers, and the rest of pipefold's CPU
                # (the loop, the step's start and end), each less the waits inside it.
                steps = [
                    (sum(v[0] for k, v in ops.items() if k.rstrip("~") in compute),
                     sum(v[0] for k, v in ops.items() if k.rstrip("~") not in compute),
                     s[1] - w[2])
                    for ops, s, w in zip(op_samples, samples["pipefold"], wait_samples, strict=True)
                ]
                # A compute handler's CPU per call, by whether it waited for its message (all
                # steps pooled): where a waiting rank gave its core away, the caches it comes
                # back to are another process's.
                pooled: dict[str, list[float]] = {}
                for ops in op_samples:
                    for key, (spent, calls) in ops.items():
                        if key.rstrip("~") in compute:
                            total = pooled.setdefault(key, [0.0, 0])
                            total[0] += spent
                            total[1] += calls
                parts = {
                    # op -> (µs per call that waited, calls; µs per call that did not, calls)
                    "compute_by_wait": {
                        op: [*_per_call(pooled.get(op + "~")), *_per_call(pooled.get(op))]
                        for op in compute if op in pooled or op + "~" in pooled
                    },
                    "compute_handlers_cpu_us": med(c for c, _, _ in steps) * per,
                    "message_handlers_cpu_us": med(m for _, m, _ in steps) * per,
                    "rest_cpu_us": med(t - c - m for c, m, t in steps) * per,
                }
            per_rank.append({
                **parts,
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
                f"floor {r['stage_floor_cpu_us']:.0f}, schedule-order floor "
                f"{r['schedule_floor_cpu_us']:.0f}; "
                f"runtime's work over them {r['work_over_stage_floor_us']:.0f} / "
                f"{r['work_over_schedule_floor_us']:.0f}"
            )
            if "compute_handlers_cpu_us" in r:
                print(
                    f"    CPU per action µs, waits out: compute handlers {r['compute_handlers_cpu_us']:.0f} "
                    "(over the schedule-order floor "
                    f"{r['compute_handlers_cpu_us'] - r['schedule_floor_cpu_us']:.0f}), "
                    f"message handlers {r['message_handlers_cpu_us']:.0f}, the rest {r['rest_cpu_us']:.0f}; "
                    "µs per handler call that waited / did not (calls): " + ", ".join(
                        f"{op} {w:.0f} / {n:.0f} ({nw} / {nn})"
                        for op, (w, nw, n, nn) in r["compute_by_wait"].items()
                    )
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
    parser.add_argument("--breakdown", action="store_true",
                        help="also time every handler (Executor.intercept): pipefold's CPU split into "
                        "compute handlers, message handlers and the rest (adds ~2 µs an action)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--microbatches", str(args.microbatches), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--schedules", *args.schedules,
              *(["--breakdown"] if args.breakdown else [])]
    started = time.perf_counter()
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, args.ranks, worker, code=ROOT, timeout=args.timeout, capture=True)
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
