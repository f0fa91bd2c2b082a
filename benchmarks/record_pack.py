"""A step's recording cost in one process: this checkout's stamps and row against another's.

    .venv/bin/python benchmarks/record_pack.py --baseline /tmp/base    # e.g. git archive <commit>

What the executor and recorder do per step to record a 1f1b rank 0's 128 compute actions and
64 waits (M=64, 2 ranks): the baseline as a checkout before stamps did it (an `Event` or
`Wait` per action, then `step_gather.pack`), this checkout as it does it
(`step_gather.pack_stamps` on (action, start, end) tuples). Alternated; prints median µs per
step and per compute action, base / new, and checks that both give the same row.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import timeit
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load(root: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, root / "pipefold/runtime/step_gather.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(root)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/record_pack.py", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of another commit")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from pipefold.schedule import build, lower
    from pipefold.timeline import Event, Wait

    new, base = _load(ROOT, "step_gather_new"), _load(args.baseline, "step_gather_base")
    program = lower(build("1f1b", num_ranks=2, num_microbatches=64))
    actions = [a for a in program.instructions[0] if a.op.is_compute]
    slots, losses = len(program.instructions[0]), torch.zeros(64)
    events = [(a, 0.001 * i, 0.001 * i + 0.0005) for i, a in enumerate(actions)]
    waits = events[:64]

    def before() -> object:
        built = base.RankRecord(
            tuple(Event(0, a, s, e) for a, s, e in events), tuple(Wait(0, a, s, e) for a, s, e in waits),
            0, 1, 0.0, 1,
        )
        return base.pack(built, losses, slots)

    def now() -> object:
        return new.pack_stamps(
            events, waits, activation_bytes_peak=0, weight_versions_peak=1, origin=0.0, host=1,
            losses=losses, num_slots=slots,
        )

    if not torch.equal(before(), now()):  # type: ignore[arg-type]
        raise SystemExit("the rows differ")
    times: dict[str, list[float]] = {"base": [], "new": []}
    for _ in range(args.rounds):
        times["base"].append(min(timeit.repeat(before, number=20, repeat=3)) / 20)
        times["new"].append(min(timeit.repeat(now, number=20, repeat=3)) / 20)
    for label, values in times.items():
        step = statistics.median(values) * 1e6
        print(f"{label}: {step:.0f} µs per step, {step / len(actions):.2f} µs per compute action")
    print("base / new: "
          f"{statistics.median(b / n for b, n in zip(times['base'], times['new'], strict=True)):.1f}")
    print("rows equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
