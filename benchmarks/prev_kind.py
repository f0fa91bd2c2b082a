"""Is an action slower after some kinds of action than after others? F after B, I, W or F.

Zero-bubble schedules (zb-h1, zb-h2, searched split orders) ran `pipefold train`'s forward
slower than 1F1B on the same stages, with no more activation memory held on the rank. Two ways
to measure it:

    .venv/bin/python benchmarks/prev_kind.py                                 # 1f1b zb-h1 zb-h2, 4 rounds
    .venv/bin/python benchmarks/prev_kind.py --rounds 6 --families 1f1b zb-h1 -- --precision fp32
    .venv/bin/python benchmarks/prev_kind.py --one-process --iterations 1500  # no pipeline, one core

1. Launches of `pipefold train` (its defaults: the built-in GPT on 2 ranks, 8 micro-batches;
   more train flags after `--`), one per family, alternated in rounds. Each launch keeps (a) the
   measured timelines of its last 10 steps (the ones train prices costs.json from) and (b) per
   call of the stage forward and of the three backward functions (`backward_full`, `_input`,
   `_weight`) its thread CPU seconds, from the 6th step on. Both are grouped by (rank, action,
   the compute action that ran before it on the rank). Wall durations include the time another
   process held the core (read rank 0's core share, printed per launch); thread CPU seconds leave
   it out, so under load they compare families where wall times cannot.
2. `--one-process`: no ranks, no messages, no executor. The default GPT's last stage (layers
   4:8, the tied head and the loss) on one core, through the runtime's own backward functions,
   running in blocks of 8 micro-batches, alternated: `FB` (1F1B's last rank: F(k) B(k)), `FIW`
   (zb-h1's last rank: F(k) I(k) W(k-1), one I state held at each F), `FIW2` (zb-h2's last rank:
   F(k) I(k) W(k-2), two held), `FIWs` (F(k) I(k) W(k): the split without a held state).
   Thread CPU medians of F and of the backward per micro-batch.

A benchmark, not a test: compare only rows of one invocation, and give the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_DUMP_ENV = "PIPEFOLD_PREV_KIND_DUMP"


def _worker(train_args: list[str]) -> int:
    """Run `pipefold train` as one rank (launched by `pipefold launch`). Rank 0 dumps the measured
    timelines train's report prices its costs from (its last steps) to $PIPEFOLD_PREV_KIND_DUMP;
    every rank dumps, per call of the stage forward and of the three backward functions, its op,
    wall and thread CPU seconds (`_calls`), to the same path with `.rank{N}` appended: CPU
    seconds leave out the time another process held the core."""
    import time

    import pipefold.job.report as report
    import pipefold.runtime.executor as executor
    from pipefold.cli.main import main
    from pipefold.runtime.stage import Stage

    dump = Path(os.environ[_DUMP_ENV])
    # What the report prices costs.json with (getattr/setattr: the module does not export them).
    measured = getattr(report, "measured_cost_model")  # noqa: B009
    calls: list[tuple[str, float, float]] = []

    def dumping(timelines: Any, *args: Any, **kwargs: Any) -> Any:
        steps = [
            [
                [[e.action.op.value, e.action.stage, e.action.microbatch, e.start, e.end] for e in events]
                for events in timeline.events
            ]
            for timeline in timelines
        ]
        dump.write_text(json.dumps(steps))
        return measured(timelines, *args, **kwargs)

    def timed(op: str, function: Any) -> Any:
        wall, cpu = time.perf_counter, time.thread_time

        def call(*args: Any, **kwargs: Any) -> Any:
            start, cpu_start = wall(), cpu()
            try:
                return function(*args, **kwargs)
            finally:
                calls.append((op, wall() - start, cpu() - cpu_start))

        return call

    # The names the executor calls them by (it imports the backward functions into its module).
    setattr(report, "measured_cost_model", dumping)  # noqa: B010
    for op, name in (("B", "backward_full"), ("I", "backward_input"), ("W", "backward_weight")):
        setattr(executor, name, timed(op, getattr(executor, name)))
    setattr(Stage, "forward", timed("F", Stage.forward))  # noqa: B010
    try:
        return main(["train", *train_args])
    finally:
        Path(f"{dump}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(calls))


def _events(step: Any) -> list[list[tuple[str, int, int, float, float]]]:
    """One step's events per rank as (op, stage, micro-batch, start, end), in start order."""
    ranks = []
    for rank_events in step:
        ranks.append(sorted(((e[0], e[1], e[2], e[3], e[4]) for e in rank_events), key=lambda e: e[3]))
    return ranks


def _launch(family: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    dump = out / "timelines.json"
    out.mkdir(parents=True, exist_ok=True)
    train = [
        "--steps", str(args.steps), "--out", str(out / "run"), "--schedule", family,
        "--device", "cpu", "--set", "sample_tokens=0", "--set", "eval_every=0", *args.train,
    ]
    env = dict(os.environ, **{_DUMP_ENV: str(dump)})
    load = Path("/proc/loadavg").read_text().split()[0]
    command = [PYTHON, "-m", "pipefold", "launch", "-n", str(args.ranks), "--",
               str(Path(__file__).resolve()), "--worker", "--", *train]
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    summary = json.loads((out / "run" / "summary.json").read_text())
    walls = summary["step_seconds"][args.warmup :]
    cpus = summary["step_cpu_seconds"][args.warmup :]
    steps = [_events(step) for step in json.loads(dump.read_text())]
    calls = []
    for rank in range(args.ranks):
        rank_calls = json.loads(Path(f"{dump}.rank{rank}").read_text())
        per_step = len(rank_calls) // args.steps  # the same program every step
        calls.append([tuple(call) for call in rank_calls[per_step * args.warmup :]])
    return {
        "step_s": statistics.median(walls),
        "core_share": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
        "load": load,
        "steps": steps,
        "calls": calls,
    }


Events = list[list[tuple[str, int, int, float, float]]]
"""One step's compute events per rank: (op, stage, micro-batch, start, end)."""


def group_by_previous(steps: list[Events]) -> dict[tuple[int, str, str], list[float]]:
    """Durations keyed by (rank, op, the op of the compute action before it on the rank; "-" for
    a step's first action)."""
    grouped: dict[tuple[int, str, str], list[float]] = {}
    for step in steps:
        for rank, events in enumerate(step):
            previous = "-"
            for op, _stage, _microbatch, start, end in events:
                grouped.setdefault((rank, op, previous), []).append(end - start)
                previous = op
    return grouped


def calls_by_previous(
    calls: list[list[tuple[str, float, float]]],
) -> dict[tuple[int, str, str], list[float]]:
    """Thread CPU seconds of each call keyed by (rank, op, the op of the call before it)."""
    grouped: dict[tuple[int, str, str], list[float]] = {}
    for rank, rank_calls in enumerate(calls):
        previous = "-"
        for op, _wall, cpu in rank_calls:
            grouped.setdefault((rank, op, previous), []).append(cpu)
            previous = op
    return grouped


def _summary(launches: list[dict[str, Any]], field: str) -> dict[tuple[int, str, str], dict[str, float]]:
    pooled: dict[tuple[int, str, str], list[float]] = {}
    per_round: dict[tuple[int, str, str], list[float]] = {}
    for launch in launches:
        grouped = (
            group_by_previous(launch["steps"]) if field == "steps" else calls_by_previous(launch["calls"])
        )
        for key, values in grouped.items():
            pooled.setdefault(key, []).extend(values)
            per_round.setdefault(key, []).append(statistics.median(values))
    return {
        key: {
            "median_ms": statistics.median(values) * 1e3,
            "n": len(values),
            "round_min_ms": min(per_round[key]) * 1e3,
            "round_max_ms": max(per_round[key]) * 1e3,
        }
        for key, values in pooled.items()
    }


def one_process(dtype_name: str, iterations: int, block: int = 8) -> dict[str, dict[str, float]]:
    """`--one-process`: thread CPU medians (ms) of F and of the backward per micro-batch in the
    loops `FB`, `FIW` and `FIWs` (see the module docstring), alternated in blocks of `block`."""
    import time

    import torch

    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.model.zoo.gpt import tied_head
    from pipefold.runtime.backward import (
        GroupCache,
        WeightGradState,
        backward_full,
        backward_input,
        backward_weight,
    )
    from pipefold.runtime.held_copies import casts_kept
    from pipefold.runtime.processes.allocator import keep_freed_memory

    torch.set_num_threads(1)  # as a rank runs
    keep_freed_memory()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    # `pipefold train`'s defaults: d_model 128, 4 heads, 4 blocks, 128 positions, 256 tokens;
    # partition [0:4 | 4:8], 4 rows per micro-batch (batch 32 over 8).
    modules = [spec.build() for spec in gpt_layers(256, 128, 4, 4, 128)]
    embedding, layers = modules[0], modules[4:7]
    params: list[torch.Tensor] = [p for layer in layers for p in layer.parameters()]
    params.append(embedding.get_parameter("weight"))
    cache = GroupCache()
    received = torch.randn(4, 128, 128).to(dtype)
    targets = torch.randint(0, 256, (4, 128))

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = received.detach().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not torch.float32):
            value = leaf
            for layer in layers:
                value = layer(value)
            logits = tied_head(embedding, value)
        return leaf, gpt_loss(logits.float(), targets)

    loops = ("FB", "FIW", "FIW2", "FIWs")
    found: dict[str, dict[str, list[float]]] = {loop: {"F": [], "backward": []} for loop in loops}
    pending: list[WeightGradState] = []  # I states whose W has not run, oldest first
    clock = time.thread_time
    with casts_kept():  # as a mixed-precision step holds autocast's weight casts
        for index in range(iterations):
            loop = loops[(index // block) % len(loops)]
            held = {"FIW": 1, "FIW2": 2}.get(loop, 0)  # W states held at each F
            while len(pending) > held:  # the block before left more W to run
                backward_weight(pending.pop(0))
            start = clock()
            leaf, loss = forward()
            middle = clock()
            if loop == "FB":
                backward_full([loss], [None], [leaf])
            else:
                _, state = backward_input([loss], [None], [leaf], params, cache=cache)
                pending.append(state)
                if len(pending) > held:
                    backward_weight(pending.pop(0))
            end = clock()
            # A block's first two micro-batches still meet the loop before (and the first blocks warm up).
            if index % block >= 2 and index >= 3 * block * len(loops):
                found[loop]["F"].append(middle - start)
                found[loop]["backward"].append(end - middle)
            if index % block == block - 1:
                for param in params:
                    param.grad = None  # a step's end
    return {
        loop: {kind: statistics.median(values) * 1e3 for kind, values in rows.items()}
        | {"n": len(rows["F"])}
        for loop, rows in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        rest = argv[1:]
        return _worker(rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=["1f1b", "zb-h1", "zb-h2"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="train steps per launch (the last 10 are kept)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the step time and the calls")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--one-process", action="store_true", help="the last stage's loops on one core")
    parser.add_argument("--iterations", type=int, default=1500, help="--one-process: micro-batches in all")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="--one-process: the compute dtype (train's auto is bf16 on this host)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("train", nargs="*", help="after --: more `pipefold train` flags")
    args = parser.parse_args(argv)
    if args.one_process:
        load = Path("/proc/loadavg").read_text().split()[0]
        rows = one_process(args.precision, args.iterations)
        base = rows["FB"]
        print(f"one process, {args.precision}, load {load} -> {Path('/proc/loadavg').read_text().split()[0]}")
        print("| loop | F ms | backward ms | F / FB's | backward / FB's | n |")
        print("|---|---|---|---|---|---|")
        for loop, row in rows.items():
            print(f"| {loop} | {row['F']:.3f} | {row['backward']:.3f} | {row['F'] / base['F']:.3f} "
                  f"| {row['backward'] / base['backward']:.3f} | {row['n']:.0f} |")
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    work = Path(tempfile.mkdtemp(prefix="pipefold-prevkind-"))
    print(f"work folder {work}", file=sys.stderr)
    launches: dict[str, list[dict[str, Any]]] = {}
    for index in range(args.rounds):
        for family in args.families:
            launch = _launch(family, args, work / f"r{index}_{family}")
            launches.setdefault(family, []).append(launch)
            print(
                f"round {index + 1} {family}: step {launch['step_s'] * 1e3:.1f} ms, "
                f"load {launch['load']}, core share {launch['core_share']:.2f}",
                file=sys.stderr,
            )
    result: dict[str, Any] = {}
    for family, runs in launches.items():
        steps = [run["step_s"] * 1e3 for run in runs]
        shares = ", ".join(f"{run['core_share']:.2f}" for run in runs)
        print(f"\n== {family}: step median {statistics.median(steps):.1f} ms "
              f"(rounds {', '.join(f'{s:.1f}' for s in steps)}; rank 0's core share {shares})")
        result[family] = {"step_ms": steps}
        for field, title in (("steps", "timeline wall ms"), ("calls", "call thread-CPU ms")):
            table = _summary(runs, field)
            print(f"| rank | action | after | n | {title}, median | round medians |")
            print("|---|---|---|---|---|---|")
            for (rank, op, previous), row in sorted(table.items()):
                print(f"| {rank} | {op} | {previous} | {row['n']} | {row['median_ms']:.3f} "
                      f"| {row['round_min_ms']:.3f}-{row['round_max_ms']:.3f} |")
            result[family][field] = {
                f"{rank} {op} after {previous}": row for (rank, op, previous), row in table.items()
            }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
