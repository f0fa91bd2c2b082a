"""The split backward's own cost on a tiny stage, in one process: this checkout against another.

    .venv/bin/python benchmarks/backward_entry.py --baseline /tmp/base    # e.g. git archive <commit>

One stage of the per-action probe's `tiny` workload (4 residual MLP blocks, d=8, one sample),
so autograd's arithmetic is nearly free and what remains is the Python around it: `I`
(`backward_input`: plan the parameter groups, run the engine to the input), `W`
(`backward_weight`) and, for scale, `B` (`backward_full`) and autograd's engine called as `B`
calls it with nothing around it (the floor a split schedule's `I` + `W` is measured against).
`--recompute` checkpoints each block and keeps `W` on autograd's path, as the runtime runs a
recomputed stage. Each repeat runs a fresh forward (not timed) and then one call; the checkouts'
`pipefold/runtime/backward.py` alternate call by call, so a drifting machine hits both alike.
Prints median µs per call and base / new.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _stub_engine(roots: object, grads: object, keep: object, create: object, inputs: tuple[object, ...],
                 **kwargs: object) -> tuple[None, ...]:
    """autograd's engine entry as the backward calls it, doing nothing: no gradient for any input."""
    return (None,) * len(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/backward_entry.py", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument(
        "--first", action="store_true",
        help="a first stage: its input needs no gradient, so I has nothing to compute",
    )
    parser.add_argument(
        "--recompute", action="store_true",
        help="each block under its own non-reentrant checkpoint and W on autograd's path (direct=False), "
        "as the runtime runs a recomputed stage: I and W each rerun the blocks' forwards",
    )
    parser.add_argument(
        "--keep-heap", action="store_true",
        help="keep freed memory in the process's heap as a CPU pipeline does "
        "(pipefold.runtime.processes.allocator), instead of glibc's default trimming",
    )
    parser.add_argument(
        "--between-mib", type=int, default=0,
        help="write this many MiB between I and W (not timed), as the actions a schedule runs between "
        "them do: zero-bubble schedules defer W, and an I its W follows directly runs as B",
    )
    parser.add_argument(
        "--cpu-time", action="store_true",
        help="time with the thread's CPU clock (time.thread_time) instead of the wall clock: on a host "
        "shared with other work it does not count the time the process waits for a core",
    )
    parser.add_argument(
        "--python-only", action="store_true",
        help="replace autograd's engine entry in both checkouts by a stub that hands back no gradient, "
        "so I and B time only the Python around the engine (W is not timed: its direct path needs the "
        "gradients)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.utils.checkpoint

    from pipefold.model.zoo import ResidualMLP
    from pipefold.runtime.processes.allocator import keep_freed_memory

    if args.keep_heap and not keep_freed_memory():
        raise SystemExit("--keep-heap: this platform's allocator cannot be told to keep freed memory")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    relative = Path("pipefold/runtime/backward.py")
    modules = {"new": _load(ROOT / relative, "backward_new")}
    if args.baseline is not None:
        # The baseline's backward.py imports its own backward_groups.py and backward_plan.py
        # (where it has them): lend it those modules while it loads, then give this checkout's back.
        names = ("backward_groups", "backward_plan")
        ours = {name: sys.modules.get(f"pipefold.runtime.{name}") for name in names}
        try:
            for name in names:
                path = args.baseline / f"pipefold/runtime/{name}.py"
                if path.exists():
                    sys.modules[f"pipefold.runtime.{name}"] = _load(path, f"{name}_base")
            modules["base"] = _load(args.baseline / relative, "backward_base")
        finally:
            for name, module in ours.items():
                if module is not None:
                    sys.modules[f"pipefold.runtime.{name}"] = module
    if args.python_only:
        for module in modules.values():
            module.__dict__["_engine_run_backward"] = _stub_engine
    blocks = torch.nn.Sequential(*[ResidualMLP(args.width) for _ in range(4)])

    def stage(h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if args.recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h

    options = {"direct": False} if args.recompute else {}
    between = torch.empty(args.between_mib << 18) if args.between_mib > 0 else None
    params = tuple(blocks.parameters())  # as the executor passes a stage's
    x = torch.randn(1, args.width)
    grad = torch.randn(1, args.width)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    times: dict[str, dict[str, list[float]]] = {
        label: {"I": [], "W": [], "B": [], "I+W": []} for label in modules
    }
    # The floor of B: autograd's engine called as backward_full calls it, with nothing around it.
    floor: list[float] = []
    engine = torch.autograd.graph._engine_run_backward
    # What the executor passes where the checkout has it: one group cache per stage.
    caches = {
        label: {"cache": module.GroupCache()} if hasattr(module, "GroupCache") else {}
        for label, module in modules.items()
    }
    wants_grad = not args.first
    for repeat in range(args.repeats):
        # Each checkout goes first every other repeat: the one after the engine's floor call
        # would otherwise always pay for what that call left behind.
        order = list(modules.items())
        if repeat % 2:
            order.reverse()
        for label, module in order:
            leaf = x.detach().requires_grad_(wants_grad)
            out = stage(leaf)
            start = clock()
            _, state = module.backward_input((out,), (grad,), (leaf,), params, **caches[label], **options)
            middle = clock()
            if between is not None:
                between.fill_(float(repeat))
                resumed = clock()
                start += resumed - middle  # I + W without the writes between them
                middle = resumed
            if not args.python_only:
                module.backward_weight(state)
            end = clock()
            leaf = x.detach().requires_grad_(wants_grad)
            out = stage(leaf)
            full_start = clock()
            module.backward_full((out,), (grad,), (leaf,))
            full_end = clock()
            if repeat >= args.repeats // 10:  # the first tenth warms up
                times[label]["I"].append(middle - start)
                times[label]["W"].append(end - middle)
                times[label]["B"].append(full_end - full_start)
                times[label]["I+W"].append(end - start)
        leaf = x.detach().requires_grad_(wants_grad)
        out = stage(leaf)
        engine_start = clock()
        engine((out,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)
        engine_end = clock()
        if repeat >= args.repeats // 10:
            floor.append(engine_end - engine_start)
    for label, parts in times.items():
        cells = ", ".join(f"{part} {statistics.median(values) * 1e6:.1f}" for part, values in parts.items())
        print(f"{label}: µs per call: {cells}")
    print(f"autograd's engine alone (the floor of B): {statistics.median(floor) * 1e6:.1f} µs per call")
    if "base" in times:
        for part in ("I", "W", "B", "I+W"):
            ratio = statistics.median(times["base"][part]) / statistics.median(times["new"][part])
            print(f"{part}: base / new {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
