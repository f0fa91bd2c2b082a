"""What capping the calibration run's small micro-batches saves, and whether they price the same.

    .venv/bin/python benchmarks/calibration_sizes.py                      # batch 32, 2 alternated pairs
    .venv/bin/python benchmarks/calibration_sizes.py --batch-size 128 --pairs 2

Runs the calibration run exactly as `pipefold plan --profile --ranks R --batch-size B` starts it
(`pipefold.cli.plan_calibrate.calibration_command`: the default GPT; at a batch of 128, 8, 4, 2, 32
and 32x1 micro-batches, the one-row size on the batch's first 32 rows, the pipeline built for 32:
"capped") and the same run with every count on the whole batch (`calibration_microbatches`'
counts; at 128, 8, 4, 2, 32 and 128 micro-batches, the pipeline built for 128: "uncapped", as
before the cap), alternated `--pairs` times in ABBA order (uncapped first in even pairs, capped
first in odd ones: two runs of the same command, at a batch of 32, read the second's one-row F
3% lower in both of two ABAB pairs). Per run: the 1-minute load
average before it, its wall seconds, per size the median kept step, and the fewest rows' F and B
per stage as the run measured them (`measured_cost_model`): at a measured size the calibration's
price passes through the measured F and B (`ModelCosts.row_scales`), so the one-row price is
these less the runtime's fixed seconds per layer, the same in both. Since a loaded host slows a
whole run, each run's one-row F and B are also given over its own reference size's ("rel") and
over the line fitted through its sizes (`fit_stage_line`, the calibration's fit; "scale": what
`row_scales` holds at one row, less the runtime's seconds per layer): within-run figures, which a
slower host moves less than the times. Where the cap does not bite
(a batch of 32 on 2 ranks) both commands are the same, and the pair measures the host's noise.
A benchmark, not a test: the host's other load moves every number; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipefold.cli.main import build_parser  # noqa: E402
from pipefold.cli.plan_calibrate import (  # noqa: E402
    DEFAULT_STEPS,
    calibration_command,
    calibration_microbatches,
)
from pipefold.job.calibration_size import parse_sizes  # noqa: E402
from pipefold.plan.stage_line import fit_stage_line  # noqa: E402


def _uncapped(words: list[str], batch_size: int) -> list[str]:
    """`words` with every count of `calibration_microbatches` on the whole batch, the pipeline built
    for the most of them (the calibration run before the cap)."""
    words = list(words)
    at = words.index("--microbatches") + 1
    reference = parse_sizes(words[at])[0].num_microbatches
    counts = calibration_microbatches(reference, batch_size)
    words[at] = ",".join(map(str, counts))
    train = words.index("--")
    words[words.index("--microbatches", train) + 1] = str(max(counts))
    return words


def _ms(values: list[float]) -> str:
    return "/".join(f"{value * 1e3:.3f}" for value in values)


def _run(words: list[str], folder: Path, label: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{label} calibration run failed: {done.stderr[-2000:]}")
    if "warn" in done.stderr.lower():
        print(f"{label}: the run warned: {done.stderr.strip()[-1000:]}", flush=True)
    result = json.loads((folder / "calibration.json").read_text())
    phases = result["phases"]
    fewest = min(phases, key=lambda phase: phase["microbatch_rows"])
    reference = phases[0]["costs"]
    one = fewest["costs"]
    points = [(p["microbatch_rows"], p["costs"]["f"], p["costs"]["b"]) for p in phases]
    lines = [fit_stage_line([(rows, f[stage], b[stage]) for rows, f, b in points])
             for stage in range(len(reference["f"]))]
    rows = fewest["microbatch_rows"]
    return {"load": load, "wall": wall,
            "rel_f": statistics.fmean(x / r for x, r in zip(one["f"], reference["f"], strict=True)),
            "rel_b": statistics.fmean(x / r for x, r in zip(one["b"], reference["b"], strict=True)),
            "scale_f": statistics.fmean(x / (line.fixed_s + line.forward_s_per_row * rows)
                                        for x, line in zip(fewest["costs"]["f"], lines, strict=True)),
            "scale_b": statistics.fmean(x / (line.fixed_s + line.backward_s_per_row * rows)
                                        for x, line in zip(fewest["costs"]["b"], lines, strict=True)),
            "steps": {f"{p['num_microbatches']}x{p['microbatch_rows']}": round(
                1e3 * statistics.median(p["kept_step_seconds"]), 1) for p in phases},
            "rows": fewest["microbatch_rows"], "f": fewest["costs"]["f"], "b": fewest["costs"]["b"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    plan_args = build_parser().parse_args(
        ["plan", "--profile", "--ranks", str(args.ranks), "--batch-size", str(args.batch_size),
         "--device", "cpu"])
    ratios: list[tuple[float, float]] = []
    for pair in range(args.pairs):
        runs = {}
        for label in ("uncapped", "capped") if pair % 2 == 0 else ("capped", "uncapped"):
            with tempfile.TemporaryDirectory(prefix="pipefold-calibration-sizes-") as folder:
                words = calibration_command(plan_args, args.ranks, DEFAULT_STEPS, Path(folder), hf=False)
                if label == "uncapped":
                    words = _uncapped(words, args.batch_size)
                if pair == 0:
                    print(f"{label}: --microbatches {words[words.index('--microbatches') + 1]}", flush=True)
                run = runs[label] = _run(words, Path(folder), label)
            print(f"pair {pair} {label}: load {run['load']:.2f}, {run['wall']:.1f} s, median kept step ms "
                  f"per size (count x rows) {run['steps']}; at {run['rows']} row(s) F {_ms(run['f'])} ms, "
                  f"B {_ms(run['b'])} ms per stage; over the reference's F {run['rel_f']:.3f} B "
                  f"{run['rel_b']:.3f}; scale F {run['scale_f']:.3f} B {run['scale_b']:.3f}", flush=True)
        capped, uncapped = runs["capped"], runs["uncapped"]
        f_ratio = statistics.fmean(c / u for c, u in zip(capped["f"], uncapped["f"], strict=True))
        b_ratio = statistics.fmean(c / u for c, u in zip(capped["b"], uncapped["b"], strict=True))
        rel = [capped[key] / uncapped[key] for key in ("rel_f", "rel_b", "scale_f", "scale_b")]
        ratios.append((f_ratio, b_ratio, *rel))
        print(f"pair {pair}: capped / uncapped wall {capped['wall'] / uncapped['wall']:.2f}; fewest rows' F "
              f"{f_ratio:.3f}, B {b_ratio:.3f} (stages' mean); over the reference's F {rel[0]:.3f} "
              f"B {rel[1]:.3f}; "
              f"scale F {rel[2]:.3f} B {rel[3]:.3f}", flush=True)
    names = ("F", "B", "F over the reference's", "B over the reference's", "scale F", "scale B")
    print("median over pairs, capped / uncapped: " + ", ".join(
        f"{name} {statistics.median(r[index] for r in ratios):.3f}" for index, name in enumerate(names)),
        flush=True)


if __name__ == "__main__":
    main()
