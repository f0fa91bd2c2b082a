"""Where a pipeline step's time goes on the hot path, sampled with py-spy.

    .venv/bin/python benchmarks/hot_path.py                          # tiny workload, gpipe, M=64
    .venv/bin/python benchmarks/hot_path.py --workload mlp --schedule 1f1b --microbatches 8
    .venv/bin/python benchmarks/hot_path.py --json                   # one JSON object instead

Two ranks (spawned by `pipefold launch`) run `Pipeline.step` on a benchmark workload
while py-spy samples both processes (`py-spy record --subprocesses --format raw`).
Only samples inside `Executor.run` (the per-action loop) count. Each is charged to the
first category its stack matches, most specific first, so the table answers: of the
time the executor loop runs, how much is torch computing, how much is waiting for a
neighbour, and how much is pipefold's own bookkeeping (what a faster runtime could
remove). The `tiny` workload (d=8, one sample per micro-batch) makes compute nearly
free, so it shows the per-action costs at their largest.

Needs py-spy (`pip install py-spy`, or `pip install -e .[bench]`) and ptrace rights
over child processes (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (category, substrings of a frame; the first category with a frame matching any wins).
# Order matters: a wait inside a backward's communication must count as waiting, and a
# saved-tensor hook inside a layer's forward as activation counting.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting for a neighbour's message", ("Executor._complete", "Executor._wait_sends")),
    ("activation counting (saved-tensor hooks)", ("ActivationCounter.",)),
    ("sending and posting receives", ("Executor._send_", "Executor._recv_")),
    ("autograd engine (backward kernels)", ("_engine_run_backward",)),
    # The direct W's kernels (addmm_, layer-norm backward) run in C under these frames.
    ("weight gradients computed directly (W's linear / layer-norm kernels)", ("_accumulate_direct",)),
    ("split-backward planning (I: graph walk)", ("_plan_groups", "_groups_are_disjoint")),
    ("loss function", ("mse_loss", "cross_entropy")),
    ("layer forward (torch modules)", ("Stage.forward", "Stage._run")),
)
OTHER = "pipefold bookkeeping (executor loop, tables, timeline events)"


def _worker(args: argparse.Namespace) -> None:
    """One rank: run the workload's pipeline for `args.steps` steps."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pipefold_side import uniform_partition
    from benchmarks.harness.workloads import workload
    from pipefold.runtime import LayoutOptions, Pipeline
    from pipefold.schedule.registry import family

    work = workload(args.workload)
    num_virtual = family(args.schedule).default_virtual if args.virtual is None else args.virtual
    pipe = Pipeline(
        work.build_layers(), loss_fn=work.loss_fn, schedule=args.schedule,
        num_microbatches=args.microbatches, num_virtual=num_virtual,
        layout=LayoutOptions(
            partition=uniform_partition(dist.get_world_size() * num_virtual), device=torch.device("cpu")
        ),
    )
    inputs, targets = work.make_batch(0)
    for _ in range(args.steps):
        pipe.step(inputs, targets)
    dist.barrier()
    dist.destroy_process_group()


def categorize(
    raw_lines: list[str],
) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples inside `Executor.run`, how many fall in each category, and the innermost
    frames of the bookkeeping ones (where pipefold's own time goes, line by line)."""
    counts: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_lines:
        stack, _, number = line.rstrip("\n").rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = stack.split(";")
        inside = [index for index, frame in enumerate(frames) if frame.startswith("Executor.run (")]
        if not inside:
            continue
        below = frames[inside[0] + 1:]
        samples = int(number)
        total += samples
        for category, needles in CATEGORIES:
            if any(needle in frame for frame in below for needle in needles):
                counts[category] += samples
                break
        else:
            counts[OTHER] += samples
            own[below[-1] if below else frames[inside[0]]] += samples
    return total, counts, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny", help="tiny (default), mlp or transformer")
    parser.add_argument("--schedule", default="gpipe")
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--virtual", type=int, help="stages per rank (default: the family's)")
    parser.add_argument("--steps", type=int, default=40, help="steps per rank (default 40)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--detail", type=int, default=8,
                        help="list this many innermost frames of the bookkeeping share (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("hot_path.py: error: py-spy is not installed; pip install py-spy (or pip install -e .[bench])",
              file=sys.stderr)
        return 2
    worker_args = [
        "--worker", "--workload", args.workload, "--schedule", args.schedule,
        "--microbatches", str(args.microbatches), "--steps", str(args.steps),
        *(["--virtual", str(args.virtual)] if args.virtual is not None else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.raw"
        command = [
            py_spy, "record", "--subprocesses", "--format", "raw", "--rate", str(args.rate),
            "--output", str(raw), "--",
            sys.executable, "-m", "pipefold", "launch", "-n", "2", "--",
            str(Path(__file__).resolve()), *worker_args,
        ]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not raw.exists():
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"hot_path.py: error: py-spy or the ranks failed (exit {done.returncode})", file=sys.stderr)
            return 1
        total, counts, own = categorize(raw.read_text().splitlines())
    if total == 0:
        print("hot_path.py: error: no samples inside Executor.run; is py-spy allowed to trace children?",
              file=sys.stderr)
        return 1
    shares = {category: counts[category] / total for category, _ in (*CATEGORIES, (OTHER, ()))}
    if args.json:
        print(json.dumps({
            "workload": args.workload, "schedule": args.schedule, "microbatches": args.microbatches,
            "ranks": 2, "samples": total, "shares": shares,
            "bookkeeping_frames": {frame: samples / total for frame, samples in own.most_common(args.detail)},
        }))
        return 0
    print(f"{args.workload}, {args.schedule}, M={args.microbatches}, 2 ranks: "
          f"{total} samples inside Executor.run")
    print("| where | share of the executor loop |")
    print("|---|---|")
    for category, share in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"| {category} | {share:.1%} |")
    if args.detail:
        print(f"\nbookkeeping, innermost frames (top {args.detail}):")
        for frame, samples in own.most_common(args.detail):
            print(f"  {samples / total:6.2%}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
