"""The step's edges: what `Pipeline.step` does outside the executor's loop, timed part by part.

    .venv/bin/python benchmarks/step_edges.py --baseline /tmp/base --schedules 1f1b gpipe --rounds 2

A step pays these once, whatever its micro-batches: at its start the batch's split into
micro-batches and the broadcast of its description from stage 0's rank (every other rank's first
action waits for it), the run's set-up; at its end the loss scaling on the last stage's rank, the
one gather of losses and timeline (step_gather.py) and the gradients' finish. On the `tiny`
workload (M=64, 128 compute actions a rank at 2 ranks) each 128 µs of them is 1 µs per action of
`overhead.py`'s table. The ranks wrap those functions (each wrap's own cost, well under a
microsecond, is inside its part) and report per rank the median over the timed steps of each
part's wall µs; a part's time includes waiting for another rank where it waits (the receivers'
broadcast, the gather). Launches alternate this checkout and `--baseline` (a checkout of another
commit), round by round; a function a checkout does not have is left out of its row.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (module, owner in it or "", function, label): the parts, in the order a step runs them.
PARTS = (
    ("pipefold.runtime.pipeline", "", "split_batch", "split the batch (with the broadcast)"),
    ("pipefold.runtime.transport.comm", "Collectives", "broadcast_object",
     "  of which: the description's broadcast"),
    ("pipefold.runtime.step_batch", "", "split", "  of which: the cut into micro-batches"),
    ("pipefold.runtime.executor", "Executor", "_reset", "run: tables made (start) and dropped (end)"),
    ("pipefold.runtime.transport.comm", "P2P", "begin_step", "run: channels' step start"),
    ("pipefold.runtime.executor", "", "scaled_losses", "run: the losses scaled (last stage)"),
    ("pipefold.runtime.recording", "StepRecorder", "gather", "the losses' and timeline's gather"),
    ("pipefold.runtime.step_gather", "", "pack_stamps", "  of which: the row packed"),
    ("pipefold.runtime.transport.comm", "Collectives", "all_gather", "  of which: the all-gather"),
    ("pipefold.runtime.step_gradients", "StepGradients", "finish", "the gradients' finish"),
    ("pipefold.runtime.executor", "Executor", "run", "Executor.run (the loop and its set-up and end)"),
    ("pipefold.runtime.pipeline", "Pipeline", "step", "Pipeline.step"),
)


def _wrap(totals: dict[str, float]) -> None:
    import importlib

    for module_name, owner_name, function_name, label in PARTS:
        module = importlib.import_module(module_name)
        owner: Any = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, function_name, None)
        if original is None:
            continue

        def timed(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, function_name, functools.wraps(original)(timed))


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload

    totals: dict[str, float] = {}
    _wrap(totals)
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    results: dict[str, Any] = {}
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=num_ranks,
                            num_microbatches=args.microbatches)
        samples: list[dict[str, float]] = []
        for index in range(args.warmup + args.steps):
            side.zero_grad()
            dist.barrier()
            totals.clear()
            side.pipe.step(inputs, targets)
            if index >= args.warmup:
                samples.append(dict(totals))
        medians = {label: statistics.median(s.get(label, 0.0) for s in samples) * 1e6 for label in samples[0]}
        gathered: list[Any] = [None] * num_ranks
        dist.all_gather_object(gathered, medians)
        results[name] = gathered
        del side
    if rank == 0:
        import pipefold

        print("RESULT " + json.dumps({"results": results, "pipefold": pipefold.__file__}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _launch(code: Path, args: argparse.Namespace) -> dict[str, Any]:
    worker = ["--worker", "--microbatches", str(args.microbatches), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--schedules", *args.schedules]
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, args.ranks, worker, code=code, timeout=args.timeout, capture=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(
        f"ranks failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/step_edges.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="a checkout of another commit to alternate with")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    codes = {"new": ROOT} | ({"base": Path(args.baseline).resolve()} if args.baseline else {})
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in codes}
    for round_index in range(args.rounds):
        for label, code in codes.items():
            result = _launch(code, args)
            runs[label].append(result["results"])
            print(f"round {round_index + 1} {label} ({result['pipefold']}), load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr)
    for name in args.schedules:
        print(f"\n## {name}, {args.ranks} ranks: wall µs per step, median over steps, each launch "
              + " / ".join(codes))
        header = " | ".join(f"rank {r}: " + " / ".join(codes) for r in range(args.ranks))
        print(f"| part | {header} |")
        print("|---" * (args.ranks + 1) + "|")
        for _, _, _, label in PARTS:
            cells = []
            for rank in range(args.ranks):
                per_code = []
                for code_label in codes:
                    values = [run[name][rank].get(label) for run in runs[code_label]]
                    per_code.append(", ".join("-" if v is None else f"{v:.0f}" for v in values))
                cells.append(" / ".join(per_code))
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
