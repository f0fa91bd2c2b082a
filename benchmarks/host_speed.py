"""Does this host run faster after idling than under sustained load? The question behind
`plan --profile`'s forecast: its calibration run prices the host of its own minute.

    .venv/bin/python benchmarks/host_speed.py                     # 60 s idle, then 4 runs of 30 steps
    .venv/bin/python benchmarks/host_speed.py --idle 120 --runs 6 --json /tmp/host_speed.json

1. Sleeps `--idle` seconds (nothing of ours runs; the load average before and after is said).
2. Runs `pipefold train` at the calibration run's configuration (the defaults on `--ranks`, fp32,
   the flags and kept steps of `benchmarks/planner.py`'s rounds) `--runs` times back to back,
   `--steps` steps each.
3. Per run: the median kept step, the medians of its first and last third of kept steps (a run
   that slows as the host heats or its credit drains reads last > first), CPU seconds per step
   (rank 0) and the seconds since the idle ended. Then the first run over the later runs' median:
   above 1 the host ran slower after idling, below 1 faster (a burst the calibration run, right
   after a pause, would price and the runs after it would not get).

A benchmark, not a test: other work on the host moves every number; repeat it and compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.planner import _train  # noqa: E402


def thirds(steps: list[float]) -> tuple[float, float]:
    """The medians of the first and the last third of `steps` (at least one step each)."""
    size = max(1, len(steps) // 3)
    return statistics.median(steps[:size]), statistics.median(steps[-size:])


def after_idle_ratio(medians: list[float]) -> float | None:
    """The first run's median step over the median of the later runs' medians (None with one run):
    below 1, the host ran faster right after idling than under the sustained load after it."""
    if len(medians) < 2:
        return None
    return medians[0] / statistics.median(medians[1:])


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idling first (default 60)")
    parser.add_argument("--runs", type=int, default=4, help="back-to-back runs after it (default 4)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default 2)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps <= args.warmup + 2:
        parser.error(f"--steps {args.steps}: give more than --warmup + 2 = {args.warmup + 2}")

    work = Path(tempfile.mkdtemp(prefix="pipefold-host-speed-"))
    print(f"idling {args.idle:.0f} s (load average {_load()})", file=sys.stderr)
    time.sleep(args.idle)
    print(f"idle done (load average {_load()})", file=sys.stderr)
    resumed = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for index in range(args.runs):
        began = time.perf_counter() - resumed
        result = _train(["--ranks", str(args.ranks)], args, work / f"run{index}")
        first, last = thirds(result["steps_s"])
        runs.append({"began_s": began, "median_s": result["step_s"], "first_third_s": first,
                     "last_third_s": last, "core_share": result["core_share"], "load": _load(),
                     "steps_s": result["steps_s"]})
        print(f"run {index + 1}: {result['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    print(f"{args.runs} back-to-back runs of {args.steps} steps ({args.warmup} left out per run) after "
          f"{args.idle:.0f} s idle:")
    print("| run | began s after the idle | median step ms | first third ms | last third ms | core share "
          "| load average after |")
    print("|---|---|---|---|---|---|---|")
    for index, run in enumerate(runs, start=1):
        print(f"| {index} | {run['began_s']:.0f} | {run['median_s'] * 1e3:.0f} | "
              f"{run['first_third_s'] * 1e3:.0f} | {run['last_third_s'] * 1e3:.0f} | "
              f"{run['core_share']:.2f} | {run['load']} |")
    ratio = after_idle_ratio([run["median_s"] for run in runs])
    if ratio is not None:
        print(f"first run after the idle over the later runs: {ratio:.2f} (below 1: faster after idling)")
    if args.json is not None:
        args.json.write_text(json.dumps({"idle_s": args.idle, "steps": args.steps, "warmup": args.warmup,
                                         "runs": runs, "after_idle_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
