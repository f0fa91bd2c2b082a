"""Calls the runtime makes per action, counted (not timed): deterministic on a loaded host.

    .venv/bin/python benchmarks/action_calls.py --ranks 2 --schedules gpipe 1f1b
    .venv/bin/python benchmarks/action_calls.py --schedules 1f1b --functions 40   # every function

Launches the ranks once (`pipefold launch`, the `tiny` workload of `overhead.py`, M=64);
per schedule, after warm-up steps, one step of `Pipeline.step` runs under `sys.setprofile`
and every Python call and C call inside the executor's loop is charged to the action running
(`Executor.current`). Calls are split into: the runtime's own Python functions, C calls the
runtime makes (builtins, torch methods such as `.detach`), the compute entries (a module
call, the loss function, the autograd engine), and what those entries run: torch's own work
("inside compute", left out of the runtime's count) and the runtime's hooks autograd calls back
(saved-tensor hooks), which count. Calls while a receive polls for a message that is not
there yet (`Watchdog.wait_until`) depend on timing, so they are counted apart and left out.
The table gives, per op, calls per action (averaged over that op's actions in the step), and
the headline: runtime calls per compute action (F, B, I, W; messages charged to them).

The step's edges, the calls of `Pipeline.step` outside the executor's loop (the batch's split
and the broadcast of its description, the run's set-up, the loss and timeline gather, the
gradients' finish: what a step pays once, whatever its micro-batches), are counted apart, per
step, in the row `EDGES` (not in the headline); `--code DIR` counts another checkout's (e.g.
`git archive <commit> | tar -x -C DIR`) with this script's counting.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

RUNTIME = "runtime"
"""A Python function of pipefold's or a C call made from one, outside compute."""
COMPUTE = "compute entry"
INSIDE = "inside compute"
HOOK = "runtime hook inside compute"
POLL = "polls (timing-dependent, left out)"
EDGES = "EDGES"
"""The label of calls outside the executor's loop: the step's start and end (per step)."""

# Python functions whose whole call is torch's compute (a module call, autograd's engine).
_COMPUTE_FUNCTIONS = frozenset({"_wrapped_call_impl", "_call_impl", "_engine_run_backward"})
# C functions that are compute (the engine called directly, as `_run_engine` does).
_COMPUTE_C = frozenset({"run_backward"})
# `ready_check` builds the poll of a message not there yet: called only when the receive waits.
_POLL_FUNCTIONS = frozenset({"wait_until", "ready_check"})


def c_name(function: Any) -> str:
    """`module.qualname` of a C function or method (`TensorBase.detach`, `builtins.len`)."""
    qualname = getattr(function, "__qualname__", None) or getattr(function, "__name__", "?")
    module = getattr(function, "__module__", None)
    if module is None:
        owner = getattr(function, "__self__", None)
        module = type(owner).__module__ if owner is not None else "?"
    return f"{module}.{qualname}"


def code_name(code: CodeType) -> str:
    """`file:function` of a Python function, the file relative to its package."""
    filename = code.co_filename
    for marker in ("/pipefold/", "/torch/", "/benchmarks/"):
        index = filename.rfind(marker)
        if index >= 0:
            filename = filename[index + 1:]
            break
    return f"{filename}:{code.co_qualname}"


class CallCounter:
    """A `sys.setprofile` function charging each call to `label()` (None: not counted).

    `counts[label][(category, name)]` is the number of calls. A call opens a region when it
    is a compute entry (its nested calls are INSIDE, or HOOK where the function, or a C call's
    caller, is in `runtime_files`) or a poll (its nested calls are POLL); regions end when the frame that
    opened them returns.
    """

    def __init__(
        self,
        label: Callable[[], str | None],
        *,
        runtime_files: tuple[str, ...] = ("/pipefold/runtime/",),
        compute_codes: frozenset[CodeType] = frozenset(),
    ) -> None:
        self._label = label
        self._runtime_files = runtime_files
        self._compute_codes = compute_codes
        self.counts: dict[str, collections.Counter[tuple[str, str]]] = collections.defaultdict(
            collections.Counter
        )
        self._depth = 0
        self._region: str | None = None
        self._region_depth = 0
        self._region_c: Any = None
        """The C function that opened the region, where one did (the engine's `run_backward`)."""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "return":
            if self._region is not None and self._depth == self._region_depth:
                self._region = None
            self._depth -= 1
            return
        if event in ("c_return", "c_exception"):
            if self._region_c is not None and arg is self._region_c and self._depth == self._region_depth:
                self._region = self._region_c = None
            return
        if event not in ("call", "c_call"):
            return
        if event == "call":
            self._depth += 1
        label = self._label()
        if label is None:
            return
        if event == "call":
            code = frame.f_code
            name = code_name(code)
            runtime = any(part in code.co_filename for part in self._runtime_files)
        else:
            name = c_name(arg)
            # A C call's frame is its caller's: the runtime's hook calling a builtin is the hook's.
            runtime = any(part in frame.f_code.co_filename for part in self._runtime_files)
        region = self._region
        if region == POLL:
            category = POLL
        elif region == COMPUTE:
            category = HOOK if runtime else INSIDE
        elif event == "call" and (code.co_name in _COMPUTE_FUNCTIONS or code in self._compute_codes):
            category = COMPUTE
            self._region, self._region_depth = COMPUTE, self._depth
        elif event == "call" and code.co_name in _POLL_FUNCTIONS:
            category = POLL
            self._region, self._region_depth = POLL, self._depth
        elif event == "c_call" and getattr(arg, "__name__", "") in _COMPUTE_C:
            category = COMPUTE
            self._region, self._region_depth, self._region_c = COMPUTE, self._depth, arg
        else:
            category = RUNTIME
        self.counts[label][(category, name)] += 1


def per_action(
    counts: dict[str, collections.Counter[tuple[str, str]]], actions: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Calls per action of each op, by category: `counts[op]` over `actions[op]` actions."""
    table: dict[str, dict[str, float]] = {}
    for op, counter in counts.items():
        number = actions.get(op, 0)
        if number == 0:
            continue
        totals: collections.Counter[str] = collections.Counter()
        for (category, _), calls in counter.items():
            totals[category] += calls
        table[op] = {category: calls / number for category, calls in totals.items()}
    return table


def runtime_per_compute_action(
    counts: dict[str, collections.Counter[tuple[str, str]]], num_compute: int
) -> float:
    """The runtime's calls (its own, its C calls, its hooks, the compute entries themselves)
    over the step's compute actions, every op's charged: the headline count."""
    kept = (RUNTIME, COMPUTE, HOOK)
    total = sum(
        calls for counter in counts.values() for (category, _), calls in counter.items() if category in kept
    )
    return total / num_compute


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload

    rank = dist.get_rank()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    results: dict[str, Any] = {}
    loss_code = getattr(work.loss_fn, "__code__", None)
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=dist.get_world_size(),
                            num_microbatches=args.microbatches)
        for _ in range(args.warmup):
            side.zero_grad()
            side.step(inputs, targets)
        executor = side.pipe._executor
        instructions = [action for handler, action, timed, code in executor._dispatch]
        actions = collections.Counter(action.op.name for action in instructions)

        def label(executor: Any = executor) -> str | None:
            current = executor.current
            return EDGES if current is None else current.op.name

        counter = CallCounter(label, compute_codes=frozenset({loss_code}) if loss_code else frozenset())
        side.zero_grad()
        dist.barrier()
        sys.setprofile(counter)
        try:
            side.pipe.step(inputs, targets)
        finally:
            sys.setprofile(None)
        num_compute = sum(n for op, n in actions.items() if op in ("F", "B", "I", "W"))
        edges = counter.counts.pop(EDGES, collections.Counter())
        actions[EDGES] = 1  # per step
        functions: collections.Counter[str] = collections.Counter()
        for op, calls in (*counter.counts.items(), (EDGES, edges)):
            for (category, function), number in calls.items():
                if category in (RUNTIME, COMPUTE, HOOK):
                    functions[f"{op} {category}: {function}"] += number
        row = {
            "actions": dict(actions),
            "per_action": {
                **per_action(counter.counts, dict(actions)), **per_action({EDGES: edges}, {EDGES: 1})
            },
            "runtime_per_compute_action": runtime_per_compute_action(counter.counts, num_compute),
            "functions": [(f, n / actions[f.split()[0]]) for f, n in functions.most_common(args.functions)],
        }
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        results[name] = gathered
        del side
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _print(results: dict[str, Any]) -> None:
    categories = (RUNTIME, COMPUTE, HOOK, INSIDE, POLL)
    for name, ranks in results.items():
        for rank, row in enumerate(ranks):
            print(f"\n## {name} rank {rank}: {row['runtime_per_compute_action']:.1f} runtime calls per "
                  "compute action (messages charged to the compute actions)")
            print("| op | actions | " + " | ".join(categories) + " |")
            print("|---" * (len(categories) + 2) + "|")
            for op, values in row["per_action"].items():
                cells = " | ".join(f"{values.get(c, 0.0):.1f}" for c in categories)
                print(f"| {op} | {row['actions'][op]} | {cells} |")
            if row["functions"]:
                print("\ncalls per action of the op, by function:")
                for function, number in row["functions"]:
                    print(f"  {number:6.2f}  {function}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/action_calls.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--functions", type=int, default=0, help="list this many functions per rank")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--code", help="count this checkout's runtime instead (its pipefold and harness)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--microbatches", str(args.microbatches), "--warmup", str(args.warmup),
              "--functions", str(args.functions), "--schedules", *args.schedules]
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    code = Path(args.code).resolve() if args.code else ROOT
    # The ranks import `code`'s pipefold and harness (its directory first on their path); this
    # script's own counting runs there.
    done = launch_workers(__file__, args.ranks, worker, code=code, timeout=args.timeout, capture=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            results = json.loads(line[len("RESULT "):])
            print(json.dumps(results) if args.json else "", end="")
            if not args.json:
                _print(results)
            return 0
    print(f"ranks failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
