"""How much a busy neighbour core slows one rank's own work: the machine's efficiency ceiling.

    .venv/bin/python benchmarks/contention.py                       # mlp and transformer, M=8
    .venv/bin/python benchmarks/contention.py --workloads mlp --microbatches 16 --rounds 5

Pipeline efficiency compares a pipeline with ONE process doing all the work alone. But
in a pipeline every rank computes while the others compute too, and on a small VM the
cores share caches, memory bandwidth and (on the host) possibly physical cores. This
script measures that effect without any pipeline: one process pinned to CPU 0 runs the
forward and backward of half the workload's layers (one pipeline stage's work at 2
ranks) over M micro-batches, alone and then while a second process pinned to CPU 1
runs the same work, in alternating rounds. The ratio alone / with-neighbour is the most
any 2-rank pipeline can reach on this machine before its bubble, whatever the library.

Needs Linux (sched_setaffinity) and at least 2 CPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stage_work(workload_name: str, num_microbatches: int) -> tuple[object, object]:
    """(module, micro-batches) of the first half of the workload's layers."""
    from torch import nn

    from benchmarks.harness.workloads import workload

    work = workload(workload_name)
    layers = work.build_layers()
    stage = nn.Sequential(*layers[: len(layers) // 2])
    inputs, _ = work.make_batch()
    return stage, list(inputs.tensor_split(num_microbatches))


def _run_for(stage: object, pieces: list[object], seconds: float) -> list[float]:
    """Time one "step" (forward + backward of every micro-batch) repeatedly for `seconds`."""
    import torch

    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for piece in pieces:
            out = stage(piece)  # type: ignore[operator]
            torch.autograd.backward(out.float().square().mean())
        samples.append(time.perf_counter() - start)
    return samples


def _neighbour(workload_name: str, num_microbatches: int, cpu: int, start: object, stop: object) -> None:
    import torch

    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    stage, pieces = _stage_work(workload_name, num_microbatches)
    _run_for(stage, pieces, 0.5)  # warm up before saying ready
    start.set()  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        _run_for(stage, pieces, 0.2)


def measure(workload_name: str, num_microbatches: int, rounds: int, seconds: float) -> tuple[float, float]:
    import torch

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage, pieces = _stage_work(workload_name, num_microbatches)
    _run_for(stage, pieces, 0.5)
    alone: list[float] = []
    shared: list[float] = []
    context = mp.get_context("spawn")
    for _ in range(rounds):
        alone += _run_for(stage, pieces, seconds)
        ready, stop = context.Event(), context.Event()
        neighbour = context.Process(
            target=_neighbour, args=(workload_name, num_microbatches, 1, ready, stop), daemon=True
        )
        neighbour.start()
        ready.wait(timeout=120)
        shared += _run_for(stage, pieces, seconds)
        stop.set()
        neighbour.join(timeout=30)
    return statistics.median(alone), statistics.median(shared)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternations alone / with neighbour")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per phase of a round")
    args = parser.parse_args()
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        print("needs Linux with at least 2 CPUs", file=sys.stderr)
        return 2
    print("| workload | M | alone s/step | with neighbour s/step | alone / with neighbour |")
    print("|---|---|---|---|---|")
    for name in args.workloads:
        alone, shared = measure(name, args.microbatches, args.rounds, args.seconds)
        print(f"| {name} | {args.microbatches} | {alone:.4f} | {shared:.4f} | {alone / shared:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
