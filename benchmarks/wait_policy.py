"""Busy-polling against sleeping waits, in the same two ranks, alternating.

    .venv/bin/python benchmarks/wait_policy.py                          # mlp, 1f1b and gpipe, M=8
    .venv/bin/python benchmarks/wait_policy.py --workload transformer --schedules 1f1b --steps 3

Two `Pipeline`s on the same layers run in the same 2 spawned ranks, one with
`RuntimeOptions(busy_wait=True)` and one with `busy_wait=False` (docs/decisions.md,
"busy polling"), `--steps` steps each per round, alternating for `--rounds`
rounds, so both see the same machine. Prints the median step (the slowest rank's wall
time) and each rank's median F and B per policy, and the sleeping / busy ratio (above 1:
busy polling is faster). Run it with a core per rank; where ranks share cores pipefold
never busy-polls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_POLICIES = {"busy": True, "sleeping": False}


def _rank(
    workload_name: str, schedule: str, num_microbatches: int, steps: int, rounds: int, out: Any
) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.harness.workloads import workload
    from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions
    from pipefold.runtime.processes.launch import init_process_group_from_env

    init_process_group_from_env()
    work = workload(workload_name)
    layers = work.build_layers()
    pipes = {
        name: Pipeline(
            layers,
            loss_fn=work.loss_fn,
            schedule=schedule,
            num_microbatches=num_microbatches,
            layout=LayoutOptions(device=torch.device("cpu")),
            runtime=RuntimeOptions(busy_wait=busy),
        )
        for name, busy in _POLICIES.items()
    }
    rank = dist.get_rank()
    inputs, targets = work.make_batch(0)
    walls: dict[str, list[float]] = {name: [] for name in pipes}
    actions: dict[str, dict[str, list[float]]] = {name: {"F": [], "B": []} for name in pipes}
    for pipe in pipes.values():  # warm-up
        for _ in range(2):
            pipe.step(inputs, targets)
    for _ in range(rounds):
        for name, pipe in pipes.items():
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                pipe.step(inputs, targets)
                wall = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                walls[name].append(float(wall))
                for event in pipe.last_timeline.events[rank]:
                    if event.action.op.name in actions[name]:
                        actions[name][event.action.op.name].append(event.end - event.start)
    summary = {
        name: {
            "step_s": statistics.median(walls[name]),
            **{op: statistics.median(values) for op, values in actions[name].items() if values},
        }
        for name in pipes
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


def _ms(seconds: float | None) -> str:
    """Milliseconds, or "-" where the rank ran no such action (a split backward runs I and W)."""
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def main() -> int:
    import multiprocessing as mp

    from pipefold.runtime.processes.launch import spawn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mlp", choices=["mlp", "transformer"])
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps per policy per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternations busy / sleeping")
    args = parser.parse_args()
    print("| workload | schedule | M | policy | step ms | rank 0 F / B ms | rank 1 F / B ms |")
    print("|---|---|---|---|---|---|---|")
    for schedule in args.schedules:
        out = mp.get_context("spawn").Queue()
        result = spawn(_rank, 2, (args.workload, schedule, args.microbatches, args.steps, args.rounds, out))
        if not result.ok:
            print(f"{schedule}: {result.describe()}", file=sys.stderr)
            return 1
        per_rank = out.get(timeout=60)
        for name in _POLICIES:
            cells = [" / ".join(_ms(per_rank[r][name].get(op)) for op in ("F", "B")) for r in range(2)]
            step_ms = per_rank[0][name]["step_s"] * 1e3
            row = [args.workload, schedule, str(args.microbatches), name, f"{step_ms:.1f}", *cells]
            print("| " + " | ".join(row) + " |")
        ratio = per_rank[0]["sleeping"]["step_s"] / per_rank[0]["busy"]["step_s"]
        print(f"| | | | sleeping / busy | {ratio:.3f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
