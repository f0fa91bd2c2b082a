"""The executor's own cost per compute action, in one process: this checkout against another.

    .venv/bin/python benchmarks/action_overhead.py --baseline /tmp/base --rounds 3
    .venv/bin/python benchmarks/action_overhead.py --profile zb-h1     # cProfile, by part

A one-rank `Pipeline` (no messages, so no transport and no waits) runs one rank's share of
`benchmarks/overhead.py`'s `tiny` workload at 2 ranks: 4 residual MLP blocks, d=8, one sample
per micro-batch, M=64; one stage for gpipe, 1f1b and zb-h1, two stages of 2 blocks for the
schedules with two stages per rank (zb-v, interleaved-1f1b). Its step is timed against the
same stages called by plain torch (every micro-batch's forward, then every backward, as
overhead.py's `--floor` does), alternated step by step; the difference divided by the rank's
compute actions (F, B, I, W) is what the executor adds per action: dispatch, the stage's and the
backward's entry, recording, the loss. Steps are timed in this thread's CPU time
(`time.thread_time`, torch on one thread), which the other processes of a shared host do not
inflate as they inflate wall time. Each checkout runs in its own subprocess (its directory
first on `sys.path`, checked through `pipefold.__file__`), and rounds alternate the checkouts,
so a drifting host hits both alike. "Over plain" is the median over rounds of each round's
median difference between a pipeline step and the plain step right after it (a pair sees
nearly the same host); the step columns are medians too. The split backward stays split (no fusing of an
adjacent I and W), as on the ranks of a 2-rank zero-bubble schedule.

`--breakdown` times each compute op's handler (median µs per call, through the executor's
`intercept`) against plain torch's forward and backward of the same stage, and the time per
action outside the handlers (the dispatch loop, its timeline stamps, the step's setup and finish).
`--count` counts, per compute action of one step, Python function calls, C calls and aten ops
(the engine's included) of the pipeline and of plain torch: deterministic, for a host too loaded
to time. `--counting` times what counting activation bytes (one step in
`RuntimeOptions.count_memory_every`) adds per action, a counting pipeline against one that
never counts, alternated. `--profile SCHEDULE` runs cProfile around this checkout's timed
steps and prints µs per action in the hot path's parts and the top functions by own time
(cProfile inflates small Python calls: read it as shares).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("gpipe", "1f1b", "zb-h1", "zb-v", "interleaved-1f1b")
_VIRTUAL = {"zb-v": 2, "interleaved-1f1b": 2, "looped-bfs": 2, "dualpipe-v": 2}
NUM_BLOCKS = 4
WIDTH = 8

# cProfile parts of one action: (label, file suffix, function name); a part's own time is its
# cumulative time less the parts it calls.
_PARTS = (
    ("stage forward (layers)", "runtime/stage.py", "forward"),
    ("loss", "functional.py", "mse_loss"),
    ("backward B", "runtime/backward.py", "backward_full"),
    ("backward I", "runtime/backward.py", "backward_input"),
    ("backward W", "runtime/backward.py", "backward_weight"),
    ("autograd engine", "runtime/backward.py", "_run_engine"),
    ("graph walk (I)", "runtime/backward_plan.py", "graph_shape"),
    ("executor loop", "runtime/executor.py", "run"),
)


def _pipeline(name: str, layers: list[Any], num_microbatches: int) -> Any:
    """A one-rank pipeline of `name` whose split backward stays split (one rank would otherwise
    fuse every adjacent I and W into a B, which a rank of a 2-rank zero-bubble schedule does not)."""
    import torch

    from pipefold.runtime.options import RuntimeOptions
    from pipefold.runtime.pipeline import Pipeline

    return Pipeline(layers, loss_fn=torch.nn.functional.mse_loss, schedule=name,
                    num_microbatches=num_microbatches, num_virtual=_VIRTUAL.get(name),
                    runtime=RuntimeOptions(fuse_backward=False))


def _worker(schedules: list[str], num_microbatches: int, steps: int) -> dict[str, dict[str, float]]:
    """In this process: per schedule, µs per compute action of the pipeline, of plain torch and
    the difference, and the rank's compute actions."""
    import torch

    import pipefold

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {"_": {"file": pipefold.__file__}}  # type: ignore[dict-item]
    for name in schedules:
        results[name] = _time_schedule(name, num_microbatches, steps)
    return results


def _time_schedule(name: str, num_microbatches: int, steps: int) -> dict[str, float]:
    import copy
    import time

    import torch
    from torch import nn

    from pipefold.model.zoo import ResidualMLP
    from pipefold.schedule import Op, lower

    loss_fn = torch.nn.functional.mse_loss
    torch.manual_seed(0)
    layers = [ResidualMLP(WIDTH) for _ in range(NUM_BLOCKS)]
    plain_layers = copy.deepcopy(layers)
    pipe = _pipeline(name, layers, num_microbatches)
    num_stages = pipe.schedule.num_stages
    per_stage = NUM_BLOCKS // num_stages
    plain = [nn.Sequential(*plain_layers[s * per_stage:(s + 1) * per_stage]) for s in range(num_stages)]
    compute = {Op.F, Op.B, Op.I, Op.W}
    num_actions = sum(a.op in compute for a in lower(pipe.schedule).instructions[0])
    inputs = torch.randn(num_microbatches, WIDTH)
    targets = torch.randn(num_microbatches, WIDTH)
    xs, ys = inputs.chunk(num_microbatches), targets.chunk(num_microbatches)

    def run_plain() -> None:
        for stage, module in enumerate(plain):
            pending = []
            for x, y in zip(xs, ys, strict=True):
                out = module(x.detach().requires_grad_(stage > 0))
                pending.append(loss_fn(out, y) if stage == num_stages - 1 else out)
            for value in pending:
                value.backward(None if stage == num_stages - 1 else torch.ones_like(value))
            module.zero_grad(set_to_none=True)

    def run_pipe() -> None:
        pipe.step(inputs, targets)
        for stage in pipe.stages:
            for param in stage.parameters:
                param.grad = None

    pipe_times: list[float] = []
    plain_times: list[float] = []
    for step in range(steps + 2):
        for run, times in ((run_pipe, pipe_times), (run_plain, plain_times)):
            start = time.thread_time()
            run()
            if step >= 2:  # the first steps build tables and caches
                times.append(time.thread_time() - start)
    # Each step against the plain step right after it (the host's speed drifts less within a
    # pair than over the run), the median over pairs.
    pipe_s, plain_s = statistics.median(pipe_times), statistics.median(plain_times)
    over_s = statistics.median(p - q for p, q in zip(pipe_times, plain_times, strict=True))
    return {
        "pipe_us": pipe_s / num_actions * 1e6,
        "plain_us": plain_s / num_actions * 1e6,
        "over_us": over_s / num_actions * 1e6,
        "num_actions": num_actions,
    }


def _profile(name: str, num_microbatches: int, steps: int) -> None:
    import cProfile
    import pstats

    import torch

    from pipefold.model.zoo import ResidualMLP
    from pipefold.schedule import Op, lower

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [ResidualMLP(WIDTH) for _ in range(NUM_BLOCKS)]
    pipe = _pipeline(name, layers, num_microbatches)
    compute = {Op.F, Op.B, Op.I, Op.W}
    num_actions = sum(a.op in compute for a in lower(pipe.schedule).instructions[0])
    inputs, targets = torch.randn(num_microbatches, WIDTH), torch.randn(num_microbatches, WIDTH)
    for _ in range(2):
        pipe.step(inputs, targets)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        pipe.step(inputs, targets)
    profiler.disable()
    stats = pstats.Stats(profiler)
    per = 1e6 / (steps * num_actions)
    raw = stats.stats  # type: ignore[attr-defined]
    cumulative: dict[str, float] = {}
    for label, suffix, function in _PARTS:
        cumulative[label] = sum(
            entry[3] for (file, _, func), entry in raw.items() if file.endswith(suffix) and func == function
        )
    total = sum(entry[2] for entry in raw.values())
    print(f"{name}: {num_actions} compute actions a step, {steps} steps; µs per action (cProfile, inflated)")
    print(f"  all profiled time: {total * per:.1f}")
    for label, value in cumulative.items():
        print(f"  {label:<28} cumulative {value * per:7.1f}")
    print("top functions by own time (µs per action):")
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:45]
    for (file, line, func), entry in rows:
        short = "/".join(Path(file).parts[-2:]) if file != "~" else "~"
        calls = entry[1] / (steps * num_actions)
        where = f"{short}:{line} {func}"
        print(f"  {entry[2] * per:7.2f} own {entry[3] * per:7.2f} cum  calls/action {calls:5.2f}  {where}")


def _breakdown(name: str, num_microbatches: int, steps: int) -> dict[str, float]:
    """Median µs per call of each compute op's handler (the executor's `intercept` wraps them)
    against plain torch's same work, and µs per action outside the handlers (the loop, its
    timeline stamps, the step's setup and finish), from `steps` steps of this checkout."""
    import copy
    import time

    import torch
    from torch import nn

    from pipefold.model.zoo import ResidualMLP
    from pipefold.schedule import Op

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [ResidualMLP(WIDTH) for _ in range(NUM_BLOCKS)]
    plain_layers = copy.deepcopy(layers)
    pipe = _pipeline(name, layers, num_microbatches)
    num_stages = pipe.schedule.num_stages
    per_stage = NUM_BLOCKS // num_stages
    plain = [nn.Sequential(*plain_layers[s * per_stage:(s + 1) * per_stage]) for s in range(num_stages)]
    clock = time.perf_counter
    samples: dict[str, list[float]] = {}
    inside = [0.0]

    def wrap(action: Any, handler: Any) -> Any:
        label = action.op.name
        if action.op in (Op.F, Op.B, Op.I, Op.W):
            label += " (last stage)" if action.stage == num_stages - 1 else " (other stages)"
        found = samples.setdefault(label, [])

        def timed(action: Any) -> None:
            start = clock()
            handler(action)
            spent = clock() - start
            found.append(spent)
            inside[0] += spent

        return timed

    inputs, targets = torch.randn(num_microbatches, WIDTH), torch.randn(num_microbatches, WIDTH)
    for _ in range(2):
        pipe.step(inputs, targets)
    pipe.executor.intercept(wrap)
    totals = []
    for _ in range(steps):
        inside[0] = 0.0
        start = clock()
        pipe.step(inputs, targets)
        totals.append(clock() - start - inside[0])
    num_actions = sum(len(v) for v in samples.values()) / steps
    result = {f"pipefold {k}": statistics.median(v) * 1e6 for k, v in sorted(samples.items())}
    result["outside the handlers, per action"] = statistics.median(totals) / num_actions * 1e6
    forward, backward = [], []
    for _ in range(steps):
        for stage, module in enumerate(plain):
            pending = []
            for x, y in zip(inputs.chunk(num_microbatches), targets.chunk(num_microbatches), strict=True):
                start = clock()
                out = module(x.detach().requires_grad_(stage > 0))
                value = torch.nn.functional.mse_loss(out, y) if stage == num_stages - 1 else out
                forward.append((stage, clock() - start))
                pending.append(value)
            for value in pending:
                start = clock()
                value.backward(None if stage == num_stages - 1 else torch.ones_like(value))
                backward.append((stage, clock() - start))
    for label, found_times in (("F", forward), ("B", backward)):
        for stage in range(num_stages):
            where = "last stage" if stage == num_stages - 1 else "other stages"
            values = [t for s, t in found_times if s == stage]
            result[f"plain torch {label} ({where})"] = statistics.median(values) * 1e6
    return result


def _counts(schedules: list[str], num_microbatches: int, steps: int) -> dict[str, dict[str, float]]:
    """Per schedule, per compute action of one step: Python function calls, calls of C functions
    from Python, and aten ops dispatched (torch's engine included), for the pipeline and for plain
    torch's same work. Deterministic, so they compare checkouts on a host too loaded to time."""
    import copy
    import sys as system

    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    import pipefold
    from pipefold.model.zoo import ResidualMLP
    from pipefold.schedule import Op, lower

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.count += 1
            return func(*args, **(kwargs or {}))

    def count(run: Any) -> tuple[int, int, int]:
        found = {"call": 0, "c_call": 0}

        def tally(frame: Any, event: str, arg: Any) -> None:
            if event in found:
                found[event] += 1

        system.setprofile(tally)
        try:
            run()
        finally:
            system.setprofile(None)
        with Ops() as ops:
            run()
        return found["call"], found["c_call"], ops.count

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {"_": {"file": pipefold.__file__}}  # type: ignore[dict-item]
    for name in schedules:
        torch.manual_seed(0)
        layers = [ResidualMLP(WIDTH) for _ in range(NUM_BLOCKS)]
        plain_layers = copy.deepcopy(layers)
        pipe = _pipeline(name, layers, num_microbatches)
        num_stages = pipe.schedule.num_stages
        per_stage = NUM_BLOCKS // num_stages
        plain = [nn.Sequential(*plain_layers[s * per_stage:(s + 1) * per_stage]) for s in range(num_stages)]
        num_actions = sum(a.op in (Op.F, Op.B, Op.I, Op.W) for a in lower(pipe.schedule).instructions[0])
        inputs, targets = torch.randn(num_microbatches, WIDTH), torch.randn(num_microbatches, WIDTH)
        xs, ys = inputs.chunk(num_microbatches), targets.chunk(num_microbatches)

        def run_plain(plain: list[nn.Module] = plain, num_stages: int = num_stages) -> None:
            for stage, module in enumerate(plain):
                pending = []
                for x, y in zip(xs, ys, strict=True):  # noqa: B023 (run before the loop moves on)
                    out = module(x.detach().requires_grad_(stage > 0))
                    pending.append(torch.nn.functional.mse_loss(out, y) if stage == num_stages - 1 else out)
                for value in pending:
                    value.backward(None if stage == num_stages - 1 else torch.ones_like(value))

        for _ in range(2):
            pipe.step(inputs, targets)
        found = count(lambda: pipe.step(inputs, targets))  # noqa: B023
        floor = count(run_plain)
        results[name] = {
            "python calls": found[0] / num_actions, "C calls": found[1] / num_actions,
            "aten ops": found[2] / num_actions, "plain python calls": floor[0] / num_actions,
            "plain C calls": floor[1] / num_actions, "plain aten ops": floor[2] / num_actions,
        }
    return results


def _counting(schedules: list[str], num_microbatches: int, steps: int) -> dict[str, dict[str, float]]:
    """Per schedule: µs per compute action that counting activation bytes adds to a step (the
    saved-tensor hooks of one step in `RuntimeOptions.count_memory_every`), a counting pipeline
    against a non-counting one, alternated step by step, median of paired differences."""
    import time

    import torch

    import pipefold
    from pipefold.model.zoo import ResidualMLP
    from pipefold.runtime.options import RuntimeOptions
    from pipefold.runtime.pipeline import Pipeline
    from pipefold.schedule import Op, lower

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {"_": {"file": pipefold.__file__}}  # type: ignore[dict-item]
    for name in schedules:
        pipes = []
        for every in (1, 1 << 30):
            torch.manual_seed(0)
            pipes.append(Pipeline(
                [ResidualMLP(WIDTH) for _ in range(NUM_BLOCKS)], loss_fn=torch.nn.functional.mse_loss,
                schedule=name, num_microbatches=num_microbatches, num_virtual=_VIRTUAL.get(name),
                runtime=RuntimeOptions(fuse_backward=False, count_memory_every=every),
            ))
        num_actions = sum(a.op in (Op.F, Op.B, Op.I, Op.W) for a in lower(pipes[0].schedule).instructions[0])
        inputs, targets = torch.randn(num_microbatches, WIDTH), torch.randn(num_microbatches, WIDTH)
        times: list[list[float]] = [[], []]
        for step in range(steps + 2):
            for pipe, found in zip(pipes, times, strict=True):
                start = time.thread_time()
                pipe.step(inputs, targets)
                if step >= 2:
                    found.append(time.thread_time() - start)
        extra = statistics.median(p - q for p, q in zip(times[0], times[1], strict=True))
        results[name] = {"counted step, extra µs per action": extra / num_actions * 1e6}
    return results


def _breakdowns(schedules: list[str], num_microbatches: int, steps: int) -> dict[str, dict[str, float]]:
    import pipefold

    results: dict[str, dict[str, float]] = {"_": {"file": pipefold.__file__}}  # type: ignore[dict-item]
    for name in schedules:
        results[name] = _breakdown(name, num_microbatches, steps)
    return results


def _run_checkout(
    directory: Path, schedules: list[str], num_microbatches: int, steps: int, function: str = "_worker"
) -> dict[str, dict[str, float]]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        f"from action_overhead import {function} as run;"
        "print(json.dumps(run(sys.argv[3].split(','), int(sys.argv[4]), int(sys.argv[5]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(directory), str(ROOT / "benchmarks"), ",".join(schedules),
         str(num_microbatches), str(steps)],
        cwd=directory, capture_output=True, text=True, check=False,
        env={"PYTHONPATH": str(directory), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        raise SystemExit(f"{directory}: {done.stderr[-3000:]}")
    result: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    where = Path(str(result.pop("_")["file"])).resolve()
    if not where.is_relative_to(directory.resolve()):
        raise SystemExit(f"{directory}: imported pipefold from {where}, not from the checkout")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. git archive <commit>)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per schedule and round")
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--profile", metavar="SCHEDULE", help="cProfile this checkout's steps instead")
    parser.add_argument("--count", action="store_true",
                        help="Python calls, C calls and aten ops per compute action (deterministic)")
    parser.add_argument("--counting", action="store_true",
                        help="what a step that counts activation bytes adds, per action and checkout")
    parser.add_argument("--breakdown", action="store_true",
                        help="each op's handler against plain torch's same work, per schedule and checkout")
    args = parser.parse_args()
    if args.profile:
        sys.path.insert(0, str(ROOT))
        _profile(args.profile, args.microbatches, args.steps)
        return
    if args.count:
        counted = {"now": _run_checkout(ROOT, args.schedules, args.microbatches, 1, "_counts")}
        if args.baseline is not None:
            counted["base"] = _run_checkout(args.baseline, args.schedules, args.microbatches, 1, "_counts")
        labels = list(counted["now"][args.schedules[0]])
        print("| schedule | checkout | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for name in args.schedules:
            for label, found in counted.items():
                print(f"| {name} | {label} | " + " | ".join(f"{found[name][k]:.1f}" for k in labels) + " |")
        return
    if args.counting:
        label_dirs = [("now", ROOT)] + ([("base", args.baseline)] if args.baseline is not None else [])
        extra: dict[str, dict[str, list[float]]] = {label: {} for label, _ in label_dirs}
        for index in range(args.rounds):
            for label, directory in label_dirs[::-1] if index % 2 else label_dirs:
                result = _run_checkout(
                    directory, args.schedules, args.microbatches, args.steps, "_counting"
                )
                for name in args.schedules:
                    extra[label].setdefault(name, []).extend(result[name].values())
        print("| schedule | " + " | ".join(f"{k}: counted step, extra µs/action" for k in extra) + " |")
        print("|---|" + "---|" * len(extra))
        for name in args.schedules:
            cells = " | ".join(f"{statistics.median(extra[k][name]):.1f}" for k in extra)
            print(f"| {name} | {cells} |")
        return
    if args.breakdown:
        found = {"now": _run_checkout(ROOT, args.schedules, args.microbatches, args.steps, "_breakdowns")}
        if args.baseline is not None:
            found["base"] = _run_checkout(args.baseline, args.schedules, args.microbatches, args.steps,
                                          "_breakdowns")
        for name in args.schedules:
            print(f"\n{name}: median µs per call\n")
            print("| part | " + " | ".join(found) + " |")
            print("|---|" + "---|" * len(found))
            for label in found["now"][name]:
                cells = " | ".join(f"{found[k][name].get(label, float('nan')):.1f}" for k in found)
                print(f"| {label} | {cells} |")
        return
    checkouts = {"now": ROOT}
    if args.baseline is not None:
        checkouts["base"] = args.baseline
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {label: [] for label in checkouts}
    for index in range(args.rounds):
        order = list(checkouts.items())
        if index % 2:
            order.reverse()
        for label, directory in order:
            rounds[label].append(_run_checkout(directory, args.schedules, args.microbatches, args.steps))
            print(f"round {index + 1} {label}: " + ", ".join(
                f"{s} {rounds[label][-1][s]['over_us']:.0f}" for s in args.schedules), file=sys.stderr)

    def median(label: str, schedule: str, key: str) -> float:
        return statistics.median(r[schedule][key] for r in rounds[label])

    header = "| schedule | actions | plain µs/action | now µs/action | now over plain |"
    if "base" in rounds:
        header += " base µs/action | base over plain | base / now (over plain) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for schedule in args.schedules:
        row = (f"| {schedule} | {int(median('now', schedule, 'num_actions'))} | "
               f"{median('now', schedule, 'plain_us'):.0f} | {median('now', schedule, 'pipe_us'):.0f} | "
               f"{median('now', schedule, 'over_us'):.1f} |")
        if "base" in rounds:
            now, base = median("now", schedule, "over_us"), median("base", schedule, "over_us")
            row += f" {median('base', schedule, 'pipe_us'):.0f} | {base:.1f} | {base / now:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
