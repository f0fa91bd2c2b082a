"""Per-action overhead: this checkout's runtime against another checkout's and torch, alternated.

    .venv/bin/python benchmarks/overhead.py --baseline /tmp/base --ranks 2 4 --rounds 3
    .venv/bin/python benchmarks/overhead.py --ranks 2 --schedules gpipe --profile   # cProfile per rank

The `tiny` workload (8 residual MLP blocks, d=8, one sample per micro-batch, M=64) makes
compute nearly free, so a step's time divided by the compute actions (F, B, I, W) of a rank
is the per-action cost of the runtime. Each round launches the ranks once per runtime (this
checkout, then `--baseline`, a checkout of another commit, e.g. `git archive <commit> | tar
-x -C /tmp/base`); inside a launch every schedule's pipefold pipeline and its
torch.distributed.pipelining counterpart run alternately, step by step. Rounds alternate the
runtimes, so a drifting machine hits them alike; the table reports medians over rounds of
per-round medians, and pipefold/torch ratios (each round's torch is timed beside it).

`--floor` also times, in the same ranks and alternation, every rank's stages run by plain
torch calls without messages: what the actions cost with no runtime at all. Two floors
(`--floor-order`, both by default): "plain torch", per stage every micro-batch's forward, then
every backward (the floor issue 31's target is measured over), and "plain torch in schedule
order", each rank's F, B, I, W in the order of the schedule that runs (what the schedule's
order alone costs plain torch: caches, allocator reuse, live activations). The table gives
each runtime's step less each floor of the same launch, per action. `--profile` runs cProfile
around pipefold's timed steps on every rank, prints each rank's top functions by own time and a
table of µs per action in the hot path's parts (cProfile inflates small Python calls: read it as
shares).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zb-v", "dualpipe-v")


class _PlainSide:
    """This rank's stages run by plain torch calls with no runtime: every micro-batch's
    forward (and loss on the last stage), then every backward, no messages. Run on all ranks
    at once, so it sees the same contention as the pipeline; its step is the compute floor."""

    label = "plain"

    def __init__(self, work, layers, schedule_pair, *, rank, num_ranks, num_microbatches):  # type: ignore[no-untyped-def]
        import copy

        import torch

        from benchmarks.harness.layout import stage_bounds

        placement = schedule_pair.placement(num_ranks)
        bounds = stage_bounds(len(placement))
        self._loss_fn = work.loss_fn
        self._num_microbatches = num_microbatches
        self._last = len(placement) - 1
        self._stages = [
            (stage, torch.nn.Sequential(*copy.deepcopy(layers[bounds[stage][0]:bounds[stage][1]])))
            for stage, owner in enumerate(placement) if owner == rank
        ]

    def zero_grad(self) -> None:
        for _, module in self._stages:
            module.zero_grad(set_to_none=True)

    def step(self, inputs, targets) -> None:  # type: ignore[no-untyped-def]
        import torch

        xs = inputs.chunk(self._num_microbatches)
        ys = targets.chunk(self._num_microbatches)
        for stage, module in self._stages:
            pending = []
            for x, y in zip(xs, ys, strict=True):
                leaf = x.detach().requires_grad_(stage > 0)
                out = module(leaf)
                pending.append(self._loss_fn(out, y) if stage == self._last else out)
            for value in pending:
                value.backward(None if stage == self._last else torch.ones_like(value))


class _ScheduleOrderPlainSide:
    """This rank's stages run by plain torch calls in the order of the rank's own actions in
    the schedule that runs (the pipeline's, I/W pairs it fuses included), no messages: F is
    the stage's forward (and the loss on the last stage), B its backward, I the input
    gradient (`torch.autograd.grad` w.r.t. the stage's input, graph kept; nothing on a first
    stage), W the weights' gradients (`torch.autograd.backward(..., inputs=weights)`, which
    accumulates into `.grad` as B does; it walks the graph again, as a plain user's split
    would). A non-last stage's backward takes ones_like its output as output gradient. The
    floor of `_PlainSide` with the schedule's order of F and B (caches, allocator reuse,
    live activations) instead of every forward, then every backward."""

    label = "plain-order"

    def __init__(self, work, layers, schedule_pair, schedule, *, rank, num_microbatches):  # type: ignore[no-untyped-def]
        import copy

        import torch

        from benchmarks.harness.layout import stage_bounds

        bounds = stage_bounds(len(schedule.placement))
        self._loss_fn = work.loss_fn
        self._num_microbatches = num_microbatches
        self._last = len(schedule.placement) - 1
        self._modules = {
            stage: torch.nn.Sequential(*copy.deepcopy(layers[bounds[stage][0]:bounds[stage][1]]))
            for stage, owner in enumerate(schedule.placement) if owner == rank
        }
        self._weights = {stage: list(module.parameters()) for stage, module in self._modules.items()}
        self._actions = [
            (action.op.value, action.stage, action.microbatch)
            for action in schedule.actions[rank] if action.op.value in ("F", "B", "I", "W")
        ]

    def zero_grad(self) -> None:
        for module in self._modules.values():
            module.zero_grad(set_to_none=True)

    def step(self, inputs, targets) -> None:  # type: ignore[no-untyped-def]
        import torch

        xs = inputs.chunk(self._num_microbatches)
        ys = targets.chunk(self._num_microbatches)
        last = self._last
        live: dict = {}
        for op, stage, microbatch in self._actions:
            key = (stage, microbatch)
            if op == "F":
                leaf = xs[microbatch].detach().requires_grad_(stage > 0)
                out = self._modules[stage](leaf)
                live[key] = (leaf, self._loss_fn(out, ys[microbatch]) if stage == last else out)
            elif op == "B":
                leaf, value = live.pop(key)
                value.backward(None if stage == last else torch.ones_like(value))
            elif op == "I":
                leaf, value = live[key]
                grad = None if stage == last else torch.ones_like(value)
                if stage > 0:
                    torch.autograd.grad(value, leaf, grad, retain_graph=True)
                live[key] = (leaf, value, grad)
            else:
                _, value, grad = live.pop(key)
                torch.autograd.backward(value, grad, inputs=self._weights[stage])


# cProfile categories of the executor loop's time: (file, function prefix, caller's function
# prefix or None); a category's own time is its cumulative time minus the categories it calls.
_PROFILE_FUNCTIONS: dict[str, tuple[str, str, str | None]] = {
    "wait (message not yet there)": ("failure.py", "wait_until", "wait"),
    "receive (copy out, completion)": ("executor.py", "_complete", None),
    "post receives (buffers, claim)": ("executor.py", "_recv_", None),
    "send (check, copy in, publish)": ("executor.py", "_send_", None),
    "autograd backward (torch engine)": ("graph.py", "_engine_run_backward", None),
    "backward entry (pipefold around the engine)": ("backward.py", "backward_", "_backward"),
    "layer forward (torch modules)": ("runtime/stage.py", "forward", None),
    "loss": ("functional.py", "mse_loss", None),
}
_NESTED = {
    "receive (copy out, completion)": ("wait (message not yet there)",),
    "backward entry (pipefold around the engine)": ("autograd backward (torch engine)",),
}
OTHER = "other pipefold (dispatch, tables, timeline events, hand-offs)"


def _categories(stats, steps: int, actions: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """µs per compute action of each category inside `Executor.run`, and the rest as OTHER."""
    cumulative: dict[str, float] = {}
    total = 0.0
    for (filename, _, function), (_, _, _, cum, callers) in stats.stats.items():
        if filename.endswith("executor.py") and function == "run":
            total += cum
        for label, (file_part, name_part, caller) in _PROFILE_FUNCTIONS.items():
            if not (filename.endswith(file_part) and function.startswith(name_part)):
                continue
            if caller is not None:
                cum = sum(entry[3] for (_, _, name), entry in callers.items() if name.startswith(caller))
            cumulative[label] = cumulative.get(label, 0.0) + cum
    own = dict(cumulative)
    for outer, inner in _NESTED.items():
        if outer in own:
            own[outer] -= sum(cumulative.get(k, 0.0) for k in inner)
    own[OTHER] = total - sum(own.values())
    own["executor loop, total"] = total
    return {k: v / steps / actions * 1e6 for k, v in own.items()}


# What a wait's polling calls (their number follows the wait's length, not the work per action).
_POLLS = ("wait_until", "sched_yield", "monotonic", "shm_exchange.py", "ready_check", "<lambda>",
          "builtins.all", "builtins.min", "time.sleep")


def _calls_per_action(stats, steps: int, actions: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Calls per compute action under cProfile (deterministic, unlike times), polls left out:
    every function's and C call's, and those of pipefold's own modules."""
    every = own = 0
    for (filename, _, function), (_, calls, _, _, _) in stats.stats.items():
        if any(p in filename or p in function for p in _POLLS):
            continue
        every += calls
        if "pipefold/runtime/" in filename:
            own += calls
    return every / steps / actions, own / steps / actions


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.root)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.torch_side import TorchSide
    from benchmarks.harness.workloads import workload
    from pipefold.schedule import lower

    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    results = {}
    for name in args.schedules:
        schedule_pair = pair(name)
        layers = work.build_layers(0)
        sides: list = [PipefoldSide(work, layers, schedule_pair, num_ranks=num_ranks,
                                    num_microbatches=args.microbatches)]
        if not args.no_torch and schedule_pair.peer_refusal(num_ranks, args.microbatches) is None:
            sides.append(TorchSide(work, layers, schedule_pair, rank=rank, num_ranks=num_ranks,
                                   num_microbatches=args.microbatches))
        if args.floor and "stage" in args.floor_order:
            sides.append(_PlainSide(work, layers, schedule_pair, rank=rank, num_ranks=num_ranks,
                                    num_microbatches=args.microbatches))
        if args.floor and "schedule" in args.floor_order:
            sides.append(_ScheduleOrderPlainSide(work, layers, schedule_pair, sides[0].pipe.schedule,
                                                 rank=rank, num_microbatches=args.microbatches))
        program = lower(sides[0].pipe.schedule)
        actions = max(
            sum(1 for action in row if action.op.is_compute and action.op.name != "STEP")
            for row in program.instructions
        )
        times: dict[str, list[float]] = {side.label: [] for side in sides}
        profiler = None
        for index in range(args.warmup + args.steps):
            for side in sides:
                side.zero_grad()
                dist.barrier()
                if index == args.warmup and args.profile and side.label == "pipefold":
                    import cProfile

                    profiler = cProfile.Profile()
                if profiler is not None and side.label == "pipefold":
                    profiler.enable()
                start = time.perf_counter()
                side.step(inputs, targets)
                elapsed = time.perf_counter() - start
                if profiler is not None and side.label == "pipefold":
                    profiler.disable()
                if index >= args.warmup:
                    times[side.label].append(elapsed)
        # The slowest rank's step is the step.
        medians = {}
        for label, values in times.items():
            gathered: list = [None] * num_ranks
            dist.all_gather_object(gathered, values)
            medians[label] = statistics.median(max(column) for column in zip(*gathered, strict=True))
        results[name] = {"actions_per_rank": actions, "step_s": medians}
        if profiler is not None:
            import io
            import pstats

            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(args.profile_top)
            text = out.getvalue()
            total_calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
            counted = _calls_per_action(stats, args.steps, actions)
            own = _categories(stats, args.steps, actions)
            gathered = [None] * num_ranks
            dist.all_gather_object(gathered, (text, total_calls, own, counted))
            results[name]["profile_us_per_action"] = [g[2] for g in gathered]
            results[name]["calls_per_action"] = [g[3] for g in gathered]
            if rank == 0:
                for r, (t, calls, _, (every, own_calls)) in enumerate(gathered):
                    print(f"=== {name} rank {r}: {calls / args.steps:.0f} Python calls per step; per compute "
                          f"action, polls left out: {every:.1f} calls, {own_calls:.1f} of pipefold's "
                          "functions", file=sys.stderr)
                    print(t, file=sys.stderr)
        del sides
    import pipefold

    results["_pipefold"] = pipefold.__file__
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _launch(root: str, num_ranks: int, args: argparse.Namespace) -> dict:
    worker = [
        "--worker", "--root", root, "--microbatches", str(args.microbatches),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--schedules", *args.schedules,
        *(["--profile", "--profile-top", str(args.profile_top)] if args.profile else []),
        *(["--no-torch"] if args.no_torch else []),
        *(["--floor", "--floor-order", *args.floor_order] if args.floor else []),
    ]
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, num_ranks, worker, code=root, timeout=args.timeout, capture=True)
    if args.profile:
        print(done.stderr, file=sys.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(
        f"ranks failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


_FLOOR_NAMES = {"plain": "plain torch", "plain-order": "plain torch in schedule order"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/overhead.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="a checkout of another commit to alternate with")
    parser.add_argument("--ranks", nargs="+", type=int, default=[2])
    parser.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES))
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--floor", action="store_true",
        help="also time every rank's stages by plain torch calls, no runtime (the compute floor)",
    )
    parser.add_argument(
        "--floor-order", nargs="+", choices=("stage", "schedule"), default=["stage", "schedule"],
        help="with --floor, which floors to time: 'stage' (per stage, every forward, then every "
        "backward: the floor the 50 µs target is measured over) and/or 'schedule' (each rank's "
        "F, B, I, W in the order of the schedule that runs); both by default",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write every round's numbers here")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    roots = {"new": str(ROOT)}
    if args.baseline:
        roots["base"] = str(Path(args.baseline).resolve())
    rounds: dict[int, list[dict[str, dict]]] = {n: [] for n in args.ranks}
    for index in range(args.rounds):
        for num_ranks in args.ranks:
            order = list(roots.items()) if index % 2 == 0 else list(reversed(roots.items()))
            this: dict[str, dict] = {}
            for label, root in order:
                this[label] = _launch(root, num_ranks, args)
                imported = this[label].pop("_pipefold")
                if not imported.startswith(root):
                    raise RuntimeError(f"the {label} ranks imported {imported}, not the pipefold of {root}")
            rounds[num_ranks].append(this)
            print(f"round {index + 1} ranks {num_ranks}: " + json.dumps(this), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rounds": rounds}, indent=1))
    header = "| schedule | ranks | actions/rank |" + "".join(
        f" {label} µs/action |" for label in roots
    ) + " torch µs/action |" + "".join(f" torch / {label} |" for label in roots)
    if "base" in roots:
        header += " base / new |"
    floors = [label for order, label in (("stage", "plain"), ("schedule", "plain-order"))
              if args.floor and order in args.floor_order]
    for floor in floors:
        header += f" {_FLOOR_NAMES[floor]} µs/action |" + "".join(
            f" {label} over {_FLOOR_NAMES[floor]} µs (each launch) |" for label in roots
        )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for num_ranks in args.ranks:
        for name in args.schedules:
            actions = rounds[num_ranks][0]["new"][name]["actions_per_rank"]
            per: dict[str, float] = {}
            ratios: dict[str, float] = {}
            torch_values = []
            for label in roots:
                values = [r[label][name]["step_s"]["pipefold"] for r in rounds[num_ranks]]
                per[label] = statistics.median(values) / actions * 1e6
                tv = [r[label][name]["step_s"].get("torch") for r in rounds[num_ranks]]
                if all(v is not None for v in tv):
                    torch_values += tv
                    ratios[label] = statistics.median(t / p for t, p in zip(tv, values, strict=True))
            row = f"| {name} | {num_ranks} | {actions} |" + "".join(f" {per[label]:.0f} |" for label in roots)
            row += f" {statistics.median(torch_values) / actions * 1e6:.0f} |" if torch_values else " - |"
            row += "".join(f" {ratios[label]:.2f} |" if label in ratios else " - |" for label in roots)
            if "base" in roots:
                pairs = [
                    r["base"][name]["step_s"]["pipefold"] / r["new"][name]["step_s"]["pipefold"]
                    for r in rounds[num_ranks]
                ]
                row += f" {statistics.median(pairs):.2f} |"
            for floor in floors:
                plain = [r["new"][name]["step_s"][floor] for r in rounds[num_ranks]]
                row += f" {statistics.median(plain) / actions * 1e6:.0f} |"
                for label in roots:
                    # The step less the floor timed in the same launch, per action.
                    over = [
                        (r[label][name]["step_s"]["pipefold"] - r[label][name]["step_s"][floor])
                        / actions * 1e6
                        for r in rounds[num_ranks]
                    ]
                    row += f" {statistics.median(over):.0f} ({', '.join(f'{v:.0f}' for v in over)}) |"
            print(row)
    for num_ranks in args.ranks:
        for name in args.schedules:
            for label in roots:
                profiles = [r[label][name].get("profile_us_per_action") for r in rounds[num_ranks]]
                if profiles[0] is None:
                    continue
                print(f"\n{label}, {name}, {num_ranks} ranks: µs per compute action under cProfile, per rank")
                print("| part |" + "".join(f" rank {r} |" for r in range(num_ranks)))
                print("|---|" + "---|" * num_ranks)
                for part in (*_PROFILE_FUNCTIONS, OTHER, "executor loop, total"):
                    cells = [
                        statistics.median(p[r].get(part, 0.0) for p in profiles) for r in range(num_ranks)
                    ]
                    print(f"| {part} |" + "".join(f" {c:.0f} |" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
