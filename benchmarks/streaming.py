"""Streaming PipeDream / PipeDream-2BW against 1F1B with a flush, in the same ranks, alternating.

    .venv/bin/python benchmarks/streaming.py                         # mlp, 2 ranks, M=4
    .venv/bin/python benchmarks/streaming.py --workload transformer --ranks 4 --steps 8 --rounds 3

Three `Pipeline`s on the same layers (same seed) run in the same spawned ranks: `1f1b` (one
`step` per batch, then the optimizer, the pipeline drains every step), `pipedream` and
`pipedream-2bw` (`train(batches, steps=--steps)`: one stream, drained once per call). Each
round runs `--steps` steps of each in turn on the same batches, `--rounds` rounds, so all
see the same machine. Per schedule it prints tokens (rows for the MLP) per second over the
timed rounds, the measured bubble (1 - compute time summed over ranks / (ranks x wall time),
inter-step gaps included) and the loss of the last step, after the same number of tokens.
SGD with the same learning rate everywhere; the async schedules' losses differ from 1F1B's
by their staleness, not by a bug (tests/runtime/test_runtime_behaviour.py checks them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEDULES = ("1f1b", "pipedream", "pipedream-2bw")


def _rank(
    workload_name: str, num_ranks: int, num_microbatches: int, steps: int, rounds: int, lr: float, out: Any
) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.harness.workloads import workload
    from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, TransportOptions
    from pipefold.runtime.processes.launch import init_process_group_from_env

    init_process_group_from_env()
    work = workload(workload_name)

    def sgd(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)

    pipes = {
        name: Pipeline(
            work.build_layers(seed=0),
            loss_fn=work.loss_fn,
            schedule=name,
            num_microbatches=num_microbatches,
            layout=LayoutOptions(device=torch.device("cpu")),
            parallel=ParallelOptions(optimizer=None if name == "1f1b" else sgd),
            # A stream's whole traffic goes through the shared-memory channel when it fits.
            transport=TransportOptions(shared_memory_bytes=1 << 28),
        )
        for name in SCHEDULES
    }
    flush_optimizer = sgd(pipes["1f1b"].parameters())
    batches = [work.make_batch(seed) for seed in range(steps)]
    rows = batches[0][0].numel() if work.kind == "transformer" else batches[0][0].shape[0]
    rank = dist.get_rank()

    def run(name: str) -> tuple[float, float, float]:
        """(wall s, compute s summed over ranks, last loss) of `steps` steps."""
        pipe = pipes[name]
        dist.barrier()
        start = time.perf_counter()
        busy = 0.0
        if name == "1f1b":
            for inputs, targets in batches:
                loss = pipe.step(inputs, targets)
                flush_optimizer.step()
                flush_optimizer.zero_grad()
                timeline = pipe.last_timeline
                busy += sum(timeline.busy_time(r) for r in range(timeline.num_ranks))
        else:
            loss = pipe.train(iter(batches), steps=steps)[-1]
            timeline = pipe.last_timeline
            busy = sum(timeline.busy_time(r) for r in range(timeline.num_ranks))
        wall = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        return float(wall), busy, loss

    for name in SCHEDULES:  # warm-up: tracing, allocator, the stream's program
        run(name)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SCHEDULES}
    for _ in range(rounds):
        for name in SCHEDULES:
            results[name].append(run(name))
    if rank == 0:
        summary = {}
        for name, runs in results.items():
            wall = sum(r[0] for r in runs)
            summary[name] = {
                "tokens_per_s": rows * steps * len(runs) / wall,
                "bubble": 1 - sum(r[1] for r in runs) / (num_ranks * wall),
                "step_ms": statistics.median(r[0] for r in runs) / steps * 1e3,
                "loss": runs[-1][2],
            }
        out.put(summary)
    dist.destroy_process_group()


def main() -> int:
    import multiprocessing as mp

    from pipefold.runtime.processes.launch import spawn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mlp", choices=["mlp", "transformer", "tiny"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per schedule per round (one stream)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the three schedules")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    out = mp.get_context("spawn").Queue()
    result = spawn(
        _rank,
        args.ranks,
        (args.workload, args.ranks, args.microbatches, args.steps, args.rounds, args.lr, out),
    )
    if not result.ok:
        print(result.describe(), file=sys.stderr)
        return 1
    summary = out.get(timeout=60)
    unit = "tokens/s" if args.workload == "transformer" else "rows/s"
    header = f"workload | ranks | M | steps/round | schedule | {unit} | step ms | measured bubble | last loss"
    print(f"| {header} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SCHEDULES:
        s = summary[name]
        print(
            f"| {args.workload} | {args.ranks} | {args.microbatches} | {args.steps} | {name} | "
            f"{s['tokens_per_s']:.0f} | {s['step_ms']:.1f} | {s['bubble']:.3f} | {s['loss']:.4f} |"
        )
    base = summary["1f1b"]["tokens_per_s"]
    for name in SCHEDULES[1:]:
        print(f"| | | | | {name} / 1f1b | {summary[name]['tokens_per_s'] / base:.2f} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
