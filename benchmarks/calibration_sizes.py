"""What measuring the small micro-batches adds to `pipefold plan --profile`'s calibration run.

    .venv/bin/python benchmarks/calibration_sizes.py            # 2 alternated pairs, 2 ranks
    .venv/bin/python benchmarks/calibration_sizes.py --pairs 4

Runs the calibration run exactly as `pipefold plan --profile --ranks R` starts it
(`pipefold.cli.plan_calibrate.calibration_command`: the default GPT, batch 32, 8, 4, 2, 16 and 32
micro-batches, the pipeline built for 32) and the former one (8, 4 and 2, built for 8), alternated
(former, new) `--pairs` times. Per run: its wall seconds and, per micro-batch count, the median
kept step (the reference count's step should not move with the count the pipeline is built for).
A benchmark, not a test: the host's other load moves every number; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipefold.cli.main import build_parser  # noqa: E402
from pipefold.cli.plan_calibrate import DEFAULT_STEPS, calibration_command  # noqa: E402


def _former(words: list[str]) -> list[str]:
    """`words` measuring only the profile's rows and more (8, 4, 2; the pipeline built for 8)."""
    words = list(words)
    words[words.index("--microbatches") + 1] = "8,4,2"
    train = words.index("--")
    words[words.index("--microbatches", train) + 1] = "8"
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    plan_args = build_parser().parse_args(
        ["plan", "--profile", "--ranks", str(args.ranks), "--device", "cpu"])
    for _ in range(args.pairs):
        for label in ("former", "new"):
            with tempfile.TemporaryDirectory(prefix="pipefold-calibration-sizes-") as folder:
                words = calibration_command(plan_args, args.ranks, DEFAULT_STEPS, Path(folder), hf=False)
                if label == "former":
                    words = _former(words)
                started = time.perf_counter()
                done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - started
                if done.returncode != 0:
                    sys.exit(f"{label} calibration run failed: {done.stderr[-2000:]}")
                result = json.loads((Path(folder) / "calibration.json").read_text())
                steps = {phase["num_microbatches"]: round(1e3 * statistics.median(phase["kept_step_seconds"]))
                         for phase in result["phases"]}
                print(f"{label}: {wall:.1f} s, median kept step ms per micro-batch count {steps}", flush=True)


if __name__ == "__main__":
    main()
