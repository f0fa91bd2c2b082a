"""Is a W away from its own I priced as it runs? Stored calibrations and launches repriced with and
without `ModelCosts.deferred_weight_grad`.

    .venv/bin/python benchmarks/deferred_price.py /tmp/istate/run4.json [more.json ...] [--min-share 0.9]

Each JSON is a stored `benchmarks/istate_price.py --json` run: calibrations (the `plan --profile`
layout: 1F1B at 8 and 4 micro-batches, 1f1b+split, GPipe, zb-h1) and rounds of `pipefold train`
launches of 1F1B, zb-h1, zb-h2, zb-v, dualpipe-v and interleaved-1f1b (the last three v=2
[3,1,1,3]). Each calibration is priced by this tree's `at_run_prices` ("W term": the deferred W
fitted from its zb-h1 block's W against its split block's) and again with that term set to 0
("before"). Per configuration: the planner's W (summed over the stages that ran W, each rank
slowed as the plan prices the order) over the launch's, and the planner's step over the
launch's, over the same round's 1F1B launch's ratio (the calibration's load out); medians over
calibrations x rounds (range). Pure code over stored measurements: nothing runs.

    .venv/bin/python benchmarks/deferred_price.py --fits '/tmp/*/cal*/calibration.json'

`--fits`: instead, every stored calibration file (a `plan --profile` run's `calibration.json`, kept
by `split_price.py`, `istate_price.py`, `split_rows.py`) with a "1f1b+split" split block and a
zb-h1 curve block, fitted as `plan --profile` fits it: per file the lowest core share of rank 0
over its 1F1B, curve and split blocks, `s(1)` (`held_state_forward`) and the deferred W's extra
(`deferred_weight_grad`), then their spread over all files, the quiet ones (every block >= 0.97 of
a core) and the quiet ones at 4 rows. The profile for the memory model: the file's folder's
`profile_{batch}.json` or `profile_costs.json`, else `--profile`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.held_curve import planned_profile  # noqa: E402
from benchmarks.istate_price import BASE, CONFIGURATIONS, _priced, priced_launch  # noqa: E402


def _ratios(costs_json: dict[str, Any], run: dict[str, Any], latency: float, work: Path
            ) -> tuple[float | None, float]:
    """The planner's W over the launch's (None: no W ran) and its step over the launch's."""
    model, _, step = priced_launch(costs_json, run, latency, work)
    measured_w = run["op_seconds"]["W"]
    stages = [s for s, value in enumerate(measured_w) if value and value == value]  # NaN: none ran
    w = sum(model.w[s] for s in stages) / sum(measured_w[s] for s in stages) if stages else None
    return w, step


def fits(pattern: str, fallback: Path) -> None:
    """`--fits`: see the module docstring."""
    import glob
    import os
    import time

    from pipefold.cli.plan_calibrate import _bounds, _held_block
    from pipefold.plan.calibrate import at_run_prices
    from pipefold.simulate import CostModel

    found = []
    for path in sorted(glob.glob(pattern)):
        measured = json.loads(Path(path).read_text())
        split = measured.get("split_phase", {})
        if "curve_phase" not in measured or split.get("schedule") != "1f1b+split":
            continue
        folder = Path(path).parent.parent
        candidates = (folder / f"profile_{measured['batch_size']}.json", folder / "profile_costs.json")
        profile = next((candidate for candidate in candidates if candidate.exists()), fallback)
        costs = planned_profile(profile)  # as plan --profile prices it
        first = measured["phases"][0]
        rows, bounds = int(first["microbatch_rows"]), _bounds(measured["partition"])
        others = [(CostModel.from_json(phase["costs"]), int(phase["microbatch_rows"]))
                  for phase in measured["phases"][1:]]
        _, calibration = at_run_prices(costs, CostModel.from_json(first["costs"]), bounds, rows, others,
                                       split=CostModel.from_json(split["costs"]),
                                       split_stages=split["split_stages"],
                                       held=_held_block(costs, measured, bounds, rows, len(bounds) - 1))
        blocks = (first, measured["curve_phase"], split)
        share = min(statistics.median(cpu / wall for cpu, wall in
                                      zip(block["kept_step_cpu_seconds"], block["kept_step_seconds"],
                                          strict=True))
                    for block in blocks)
        found.append((os.path.getmtime(path), path, rows, share, calibration.held_state_forward,
                      calibration.deferred_weight_grad, calibration.split_backward_share))
    print("| calibration | written (UTC) | rows | least core share | s(1) | deferred W extra | split share |")
    print("|---|---|---|---|---|---|---|")
    for written, path, rows, share, state, deferred, split_share in sorted(found):
        print(f"| {path} | {time.strftime('%H:%M', time.gmtime(written))} | {rows} | {share:.2f} "
              f"| {state:.3f} | {deferred:.3f} | {split_share:.3f} |")
    for label, chosen in (("all", found), ("quiet (>= 0.97)", [f for f in found if f[3] >= 0.97]),
                          ("quiet, 4 rows", [f for f in found if f[3] >= 0.97 and f[2] == 4])):
        if len(chosen) < 2:
            continue
        for index, name in ((4, "s(1)"), (5, "deferred W extra"), (6, "split share")):
            values = [entry[index] for entry in chosen]
            low, _, high = statistics.quantiles(values, n=4)
            print(f"{label} ({len(values)}): {name} median {statistics.median(values):.3f}, quartiles "
                  f"{low:.3f}-{high:.3f}, range {min(values):.3f}-{max(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", help="stored istate_price.py --json files")
    parser.add_argument("--fits", metavar="GLOB",
                        help="instead: fit every stored calibration file matching GLOB")
    parser.add_argument("--profile", type=Path, default=Path("/tmp/istate/profile_costs.json"),
                        help="--fits: the profile costs where a file's folder has none")
    parser.add_argument("--min-share", type=float, default=0.0,
                        help="keep launches whose rank 0 (and its round's 1F1B's) had this share of a core")
    args = parser.parse_args()
    if args.fits:
        fits(args.fits, args.profile)
        return
    work = Path(tempfile.mkdtemp(prefix="pipefold-deferred-price-"))
    for stored_path in args.runs:
        stored = json.loads(stored_path.read_text())
        costs = Path(stored["costs"])
        ways = []
        for path in stored["calibrations"]:
            found = _priced(costs, Path(path))["states"]
            before = dict(found["costs"])
            before.pop("deferred_weight_grad", None)
            ways.append({"W term": found["costs"], "before": before, "latency": found["latency"],
                         "extra": float(found["costs"].get("deferred_weight_grad", 0.0))})
        print(f"\n{stored_path}: deferred W extra per calibration "
              + ", ".join(f"{way['extra']:.3f}" for way in ways))
        print("| configuration | W: before | W: W term | step / 1F1B's: before | step: W term |")
        print("|---|---|---|---|---|")
        misses: dict[str, list[float]] = {"before": [], "W term": []}
        for label in CONFIGURATIONS:
            cells: dict[str, dict[str, list[float]]] = {"before": {"w": [], "step": []},
                                                         "W term": {"w": [], "step": []}}
            for way in ways:
                for runs in stored["rounds"]:
                    shares = (runs[label]["core_share"], runs[BASE]["core_share"]) if label in runs else ()
                    if not shares or min(shares) < args.min_share:
                        continue
                    for name in ("before", "W term"):
                        _, base_step = _ratios(way[name], runs[BASE], way["latency"], work)
                        w, step = _ratios(way[name], runs[label], way["latency"], work)
                        if w is not None:
                            cells[name]["w"].append(w)
                        cells[name]["step"].append(step / base_step)

            def cell(values: list[float]) -> str:
                if not values:
                    return "-"
                return f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})"

            print(f"| {label} | {cell(cells['before']['w'])} | {cell(cells['W term']['w'])} "
                  f"| {cell(cells['before']['step'])} | {cell(cells['W term']['step'])} |")
            if label != BASE:
                for name in misses:
                    if cells[name]["step"]:
                        misses[name].append(abs(statistics.median(cells[name]["step"]) - 1))
        print("mean |median step / 1F1B's - 1| over the others: "
              + ", ".join(f"{name} {statistics.fmean(values):.3f}"
                          for name, values in misses.items() if values))


if __name__ == "__main__":
    main()
