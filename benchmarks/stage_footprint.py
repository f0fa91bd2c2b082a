"""Why does `pipefold plan --profile` price configurations with more, smaller stages too cheaply?
Two questions, each answered by `pipefold train` runs alternated in rounds (2 ranks, the default
model and batch, fp32, 8 micro-batches):

    .venv/bin/python benchmarks/stage_footprint.py                      # 3 rounds of 6 runs
    .venv/bin/python benchmarks/stage_footprint.py --rounds 5 --json /tmp/footprint.json

1. Does a stage pay a cost per action whatever its layer count (its call, its input and output
   handling)? Interleaved 1F1B (v=2) on partitions [2,1,2,3] and [2,2,1,3]: each run holds a
   middle stage of one transformer block and one of two, both fed by a message from the other
   rank. Within one run (the same minute of the host), the two-block stage's F (and B) over the
   one-block stage's is 2 where a stage's cost is its layers' and below 2 by a per-stage part X:
   ratio = (X + 2 b) / (X + b), so X = b (2 - ratio) / (ratio - 1) with b the one-block stage's
   cost less X. The two partitions swap which rank holds which stage; the geometric mean of their
   ratios takes out a rank running faster than the other. The rank holding the two-block stage
   holds more activations too, which (question 2) slows it a little: X reads a little low.
2. Does a rank's action cost depend on the activation memory it holds? 1F1B and GPipe on the
   same two stages [4,4], and interleaved 1F1B and looped-BFS (v=2) on the same four [3,1,1,3]:
   the same layers, calls and messages, the second of each pair holding more micro-batches'
   activations at once (the run's `activations_peak` per rank). Per round, the second's summed
   stage F (and B) over the first's of the adjacent run, and the extra per MB of the ranks'
   mean peak: where the two pairs agree, a cost growing with the bytes held.

Reported per question: the per-round ratios and their median, with the load average. A
benchmark, not a test: the ranks share the host's cores with whatever else runs.
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

RUNS: dict[str, list[str]] = {
    "il_2123": ["--schedule", "interleaved-1f1b", "--virtual", "2", "--partition", "2,1,2,3"],
    "il_2213": ["--schedule", "interleaved-1f1b", "--virtual", "2", "--partition", "2,2,1,3"],
    "1f1b_44": ["--schedule", "1f1b", "--partition", "4,4"],
    "gpipe_44": ["--schedule", "gpipe", "--partition", "4,4"],
    "il_3113": ["--schedule", "interleaved-1f1b", "--virtual", "2", "--partition", "3,1,1,3"],
    "bfs_3113": ["--schedule", "looped-bfs", "--virtual", "2", "--partition", "3,1,1,3"],
}
# Per interleaved run: (the two-block stage, the one-block stage).
PAIRS = {"il_2123": (2, 1), "il_2213": (1, 2)}
# Same stages, the second holding more activations: (the first, the second).
HELD = (("1f1b_44", "gpipe_44"), ("il_3113", "bfs_3113"))


def _train(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    command = [PYTHON, "-m", "pipefold", "train", "--steps", str(args.steps), "--batch-size", "32",
               "--ranks", "2", "--microbatches", "8", "--out", str(out), "--device", "cpu",
               "--precision", "fp32", "--set", "sample_tokens=0", "--set", "eval_every=0", *RUNS[name]]
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    costs = json.loads((out / "costs.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"f": costs["f"], "b": costs["b"],
            "activations_peak": [rank["activations_peak"] for rank in summary["memory"]],
            "step_s": statistics.median(summary["step_seconds"][2:])}


def _stage_part(ratio: float, one_block_s: float) -> float:
    """X from the two-block / one-block ratio and the one-block stage's seconds: (X + 2b) / (X + b)
    = ratio with X + b = `one_block_s` gives b = (ratio - 1)(X + b), so X = (X + b)(2 - ratio)."""
    return one_block_s * (2 - ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first 2 are left out)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="print the report of an earlier run's --json file, running nothing")
    args = parser.parse_args()
    if args.report is not None:
        earlier = json.loads(args.report.read_text())
        _report(earlier["runs"], earlier["load_1min"], earlier["rounds"], earlier["steps"])
        return
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNS}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="pipefold-footprint-") as folder:
        for round_index in range(args.rounds):
            for name in RUNS:
                run = _train(name, args, Path(folder) / f"r{round_index}_{name}")
                results[name].append(run)
                print(f"round {round_index + 1} {name}: step {run['step_s'] * 1e3:.0f} ms", file=sys.stderr)
            load.append(os.getloadavg()[0])
    report = _report(results, load, args.rounds, args.steps)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def _report(results: dict[str, list[dict[str, Any]]], load: list[float], rounds: int,
            steps: int) -> dict[str, Any]:
    """Print both answers; return them with the runs (what --json writes)."""
    report: dict[str, Any] = {"rounds": rounds, "steps": steps, "load_1min": load}
    print(f"load average (1 min) at the start and after each round: {' '.join(f'{x:.2f}' for x in load)}")
    print("1. two-block / one-block middle stage, one run (2 = no per-stage part):")
    per_stage: dict[str, Any] = {}
    for kind in ("f", "b"):
        medians = {}
        for name, (two, one) in PAIRS.items():
            ratios = [run[kind][two] / run[kind][one] for run in results[name]]
            medians[name] = statistics.median(ratios)
            per_stage[f"{kind}_{name}"] = ratios
            listed = " ".join(f"{x:.2f}" for x in ratios)
            print(f"   {kind.upper()} {name}: {listed}; median {medians[name]:.3f}")
        # The two partitions swap the ranks of the two stages: their geometric mean takes out a
        # rank that ran faster than the other (its factor divides one ratio, multiplies the other).
        both = statistics.geometric_mean(medians.values())
        one_block = statistics.median(
            run[kind][one] for name, (_, one) in PAIRS.items() for run in results[name])
        part = _stage_part(both, one_block)
        per_stage[kind] = both
        per_stage[f"{kind}_part_s"] = part
        print(f"   {kind.upper()} geometric mean of the two: {both:.3f}: a per-stage part of "
              f"{part * 1e3:+.2f} ms per "
              f"{kind.upper()} ({part / one_block:+.0%} of a one-block stage's {one_block * 1e3:.2f} ms)")
    report["per_stage"] = per_stage
    print("2. the same stages, more activation memory held: the second over the first, summed over "
          "stages, adjacent runs; the extra per MB of the ranks' mean activations_peak beyond the first's:")
    held: dict[str, Any] = {}
    for first_name, second_name in HELD:
        first_runs, second_runs = results.get(first_name, []), results.get(second_name, [])
        if not first_runs or not second_runs:  # a --report of a file from before the pair
            continue
        peaks = [statistics.fmean(runs[0]["activations_peak"]) for runs in (first_runs, second_runs)]
        extra_mb = (peaks[1] - peaks[0]) / 1e6
        pair: dict[str, Any] = {"mean_peak_bytes": peaks}
        print(f"   {second_name} / {first_name} (mean peak {peaks[0] / 1e6:.0f} -> {peaks[1] / 1e6:.0f} MB):")
        for kind in ("f", "b"):
            ratios = [sum(second[kind]) / sum(first[kind])
                      for first, second in zip(first_runs, second_runs, strict=True)]
            median = statistics.median(ratios)
            per_mb = (median - 1) / extra_mb if extra_mb > 0 else float("nan")
            pair[kind] = ratios
            pair[f"{kind}_per_mb"] = per_mb
            listed = " ".join(f"{x:.2f}" for x in ratios)
            print(f"   {kind.upper()}: {listed}; median {median:.3f}, {per_mb:+.2%} per MB")
        held[f"{second_name}/{first_name}"] = pair
    report["held"] = held
    report["runs"] = results
    return report


if __name__ == "__main__":
    main()
