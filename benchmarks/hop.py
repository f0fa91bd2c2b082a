"""One message's hop between two ranks, in three parts, on the `tiny` workload's real runtime.

    .venv/bin/python benchmarks/hop.py --ranks 2 --schedules 1f1b gpipe [--code /tmp/base]

For every boundary message of the timed steps (same host, shared-memory channel):
  (a) the sender's compute end (its stage's forward or backward call returned) -> the message's
      flag set (`ShmChannel.send` returned),
  (b) flag set -> the receiver saw it (its wait returned and the copy out begins),
  (c) saw it -> the receiver's compute start (its stage's forward or backward call entered),
as medians (µs), for the messages the receiver waited for (its wait began before the flag was
set: the hop is then on the critical path; also split into forward messages, F, and gradients, B)
and for all. Stamps are `time.perf_counter()`, which
on Linux reads CLOCK_MONOTONIC, one clock for every process of the host. The compute calls are
wrapped (a Python call each, well under a microsecond): the stamps bracket the torch work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _instrument(log: dict[str, list[Any]]) -> Any:
    """Wrap the compute calls, the send and the receive's wait; returns the executor holder."""
    import pipefold.runtime.executor as executor_module
    from pipefold.runtime.stage import Stage
    from pipefold.runtime.transport import comm
    from pipefold.runtime.transport.shm import ShmChannel

    clock = time.perf_counter
    holder: dict[str, Any] = {"executor": None}

    def key() -> tuple[str, int, int]:
        action = holder["executor"].current
        return (action.op.name, action.stage, action.microbatch)

    forward = Stage.forward

    def stage_forward(self: Any, value: Any, microbatch: int) -> Any:
        start = clock()
        out = forward(self, value, microbatch)
        log["compute"].append((*key(), start, clock()))
        return out

    Stage.forward = stage_forward  # type: ignore[method-assign]

    def wrap_backward(name: str) -> None:
        original = getattr(executor_module, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            out = original(*args, **kwargs)
            log["compute"].append((*key(), start, clock()))
            return out

        setattr(executor_module, name, run)

    wrap_backward("backward_full")
    wrap_backward("backward_input")
    send = ShmChannel.send

    def channel_send(self: ShmChannel, tensors: Any) -> None:
        send(self, tensors)
        # The current action is the send, or the compute whose handler sends its output.
        op, stage, microbatch = key()
        log["flag"].append(("SEND_F" if op in ("F", "SEND_F") else "SEND_B", stage, microbatch, clock()))

    ShmChannel.send = channel_send  # type: ignore[method-assign]
    wait = comm._ShmReceive.wait

    def receive_wait(self: Any, watchdog: Any, what: str) -> None:
        entered = clock()
        read, read_bytes = self.channel.read, self.channel.read_bytes

        def stamp(*args: Any) -> None:
            log["seen"].append((*key(), entered, clock()))

        # The stamp is taken where the copy out starts: the wait returned.
        self.channel.read = lambda *a: (stamp(), read(*a))
        self.channel.read_bytes = lambda *a: (stamp(), read_bytes(*a))
        try:
            wait(self, watchdog, what)
        finally:
            del self.channel.read, self.channel.read_bytes

    comm._ShmReceive.wait = receive_wait  # type: ignore[method-assign]
    return holder


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.code)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload

    log: dict[str, list[Any]] = {"compute": [], "flag": [], "seen": []}
    holder = _instrument(log)
    rank = dist.get_rank()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    out: dict[str, Any] = {}
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=dist.get_world_size(),
                            num_microbatches=args.microbatches)
        holder["executor"] = side.pipe.executor
        for index in range(args.warmup + args.steps):
            dist.barrier()
            for entries in log.values():
                entries.clear()
            side.pipe.step(inputs, targets)
            if index >= args.warmup:
                out.setdefault(name, []).append({k: list(v) for k, v in log.items()})
        del side
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def report(directory: Path, num_ranks: int) -> list[str]:
    """The hop's parts per schedule from the ranks' logs in `directory`."""
    ranks = [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(num_ranks)]
    lines = []
    for name in ranks[0]:
        parts: dict[str, dict[str, list[float]]] = {"waited": {}, "waited F": {}, "waited B": {}, "all": {}}
        for step in range(len(ranks[0][name])):
            logs = [ranks[r][name][step] for r in range(num_ranks)]
            # Compute per (op, stage, mb): its first start and last end (one call each on these runs).
            compute: dict[tuple[str, int, int], tuple[float, float]] = {}
            for entry in (e for log in logs for e in log["compute"]):
                compute[(entry[0], entry[1], entry[2])] = (entry[3], entry[4])
            flags = {(e[0], e[1], e[2]): e[3] for log in logs for e in log["flag"]}
            for log in logs:
                for op, stage, mb, entered, seen in log["seen"]:
                    # The consumer F s waits for SEND_F s-1; B/I s for SEND_B s+1.
                    sent = ("SEND_F", stage - 1, mb) if op == "F" else ("SEND_B", stage + 1, mb)
                    producers = (
                        [("F", stage - 1, mb)] if op == "F" else [("B", stage + 1, mb), ("I", stage + 1, mb)]
                    )
                    flag = flags.get(sent)
                    produced = next((compute[p] for p in producers if p in compute), None)
                    started = compute.get((op, stage, mb))
                    if flag is None or produced is None or started is None:
                        continue
                    hop = {
                        "a": (flag - produced[1]) * 1e6,
                        "b": (seen - flag) * 1e6,
                        "c": (started[0] - seen) * 1e6,
                    }
                    direction = "F" if op == "F" else "B"
                    kinds = ("all", "waited", "waited " + direction) if entered < flag else ("all",)
                    for kind in kinds:
                        for part, value in hop.items():
                            parts[kind].setdefault(part, []).append(value)
        for kind in parts:
            p = parts[kind]
            count = len(p.get("a", []))
            lines.append(
                f"{name} {kind:8} n={count:5}: (a) compute end -> flag {_median(p.get('a', []))} µs, "
                f"(b) flag -> seen {_median(p.get('b', []))} µs, (c) seen -> compute start "
                f"{_median(p.get('c', []))} µs"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/hop.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT),
                        help="the checkout whose pipefold runs (e.g. a `git archive` of another commit)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    with tempfile.TemporaryDirectory() as directory:
        worker = ["--worker", "--out", directory, "--code", str(Path(args.code).resolve()),
                  "--microbatches", str(args.microbatches), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--schedules", *args.schedules]
        started = time.perf_counter()
        # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
        sys.path.insert(0, str(ROOT))
        from benchmarks.harness.ranks import launch_workers

        done = launch_workers(__file__, args.ranks, worker, code=Path(args.code).resolve(),
                              timeout=args.timeout)
        if done.returncode != 0:
            return done.returncode
        print("\n".join(report(Path(directory), args.ranks)))
        print(f"({time.perf_counter() - started:.0f} s; load {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
