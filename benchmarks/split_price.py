"""Is the split backward priced as the split orders run it? Both calibration layouts priced from
the same calibration runs, against the same launches.

    .venv/bin/python benchmarks/split_price.py                       # 2 calibrations, 4 rounds
    .venv/bin/python benchmarks/split_price.py --calibrations 3 --rounds 6 --json /tmp/split_price.json

`pipefold plan --profile`'s calibration prices each I and W of a split order from a short block
of the run: before, zb-h1 (whose later ranks defer W and hold more activations, which slows them
on a CPU host, so its I and W carried a held slowdown the held curve's B factor priced only in
part); now "1f1b+split" (1F1B with each B run as I then W, 1F1B's bytes), with zb-h1 kept as a
block of its own for the held curve. A calibration run of the new layout measures all three
blocks, so each run is priced both ways (`pipefold.plan.calibrate.at_run_prices`): "zb-h1" (the
zb-h1 block as the split block, as calibrations before did) and "1f1b+split" (this one), the
same load and the same 1F1B block under both.

Then rounds of `pipefold train` launches of 1F1B, zb-h1 and zb-h2 on the calibration's stages
[4,4] (8 micro-batches of 4 rows), alternated. Per round, family and split stage (on 2 ranks the
last: the first stage's pair runs fused), the priced I and W over the measured, each taken
relative to 1F1B's B on that stage (priced over the same round's 1F1B launch's measured), so
the host's load in the calibration and in the round both cancel. 1.00: priced as measured.
A benchmark, not a test: the ranks share the host's cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable
FAMILIES = ("1f1b", "zb-h1", "zb-h2")
TRAIN = ["--batch-size", "32", "--ranks", "2", "--microbatches", "8", "--partition", "4,4", "--device", "cpu",
         "--precision", "fp32", "--set", "sample_tokens=0", "--set", "eval_every=0"]


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _calibrate(folder: Path) -> Path:
    folder.mkdir()
    result = folder / "calibration.json"
    subprocess.run([PYTHON, "-m", "pipefold.cli.calibration_run", "--result", str(result), "--microbatches",
                    "8,4", "--phase-steps", "12", "--split", "1f1b+split", "--held", "gpipe", "--curve", "zb-h1",
                    "--", "--out", str(folder / "run"), *TRAIN], cwd=ROOT, capture_output=True, text=True, check=True)
    return result


def _train(family: str, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    load = _load()
    subprocess.run([PYTHON, "-m", "pipefold", "train", "--steps", str(steps), "--out", str(out), "--schedule",
                    family, *TRAIN], cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads((out / "summary.json").read_text())
    costs = json.loads((out / "costs.json").read_text())
    walls, cpus = summary["step_seconds"][warmup:], summary["step_cpu_seconds"][warmup:]
    return {"load": load, "core_share": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
            "i": costs["i"], "w": costs["w"], "b": costs["b"]}


def _priced(costs_path: Path, calibration: Path) -> dict[str, Any]:
    """Per layout, per family, per stage: the priced I, W and B (the family's held factors in)."""
    from dataclasses import replace

    from pipefold.cli.plan_calibrate import _bounds, _held_block
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import at_run_prices, first_stage_backward
    from pipefold.plan.held_cost import order_held_bytes, with_held_cost
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import CostModel, Link

    costs = ModelCosts.from_json(costs_path)
    measured = json.loads(calibration.read_text())
    first = measured["phases"][0]
    rows = int(first["microbatch_rows"])
    bounds = _bounds(measured["partition"])
    run = CostModel.from_json(first["costs"])
    ranks = len(bounds) - 1
    held = _held_block(costs, measured, bounds, rows, ranks)
    assert held is not None and held.curve is not None
    new, new_cal = at_run_prices(costs, run, bounds, rows, split=CostModel.from_json(measured["split_phase"]["costs"]),
                                 split_stages=measured["split_phase"]["split_stages"], held=held)
    # As a calibration before the curve block: the zb-h1 block is the split block (and the curve's).
    zb = measured["curve_phase"]
    old_held = replace(held, split_bytes=held.curve_bytes, curve=None, curve_bytes=())
    old, old_cal = at_run_prices(costs, run, bounds, rows, split=CostModel.from_json(zb["costs"]),
                                 split_stages=zb["split_stages"], held=old_held)
    placement = tuple(range(ranks))
    count = int(first["num_microbatches"])
    peaks = {family: order_held_bytes(costs, bounds, rows, family, ranks, count) for family in FAMILIES}
    layouts: dict[str, Any] = {}
    for name, priced, cal in (("zb-h1", old, old_cal), ("1f1b+split", new, new_cal)):
        families = {}
        for family in FAMILIES:
            model = first_stage_backward(stage_cost_model(priced, StageLayout(bounds, rows), (), Link()), priced, bounds)
            model = with_held_cost(model, priced, placement, peaks[family], bounds)
            families[family] = {"i": list(model.i), "w": list(model.w), "b": list(model.b)}
        layouts[name] = {"families": families, "split_overhead_us": cal.split_overhead_s * 1e6,
                         "weight_share": list(cal.weight_share),
                         "curve": [[x / 2**20, f, b] for x, f, b in cal.held_curve]}
    return layouts


def _profile_costs(args: argparse.Namespace, work: Path) -> Path:
    if args.costs is not None:
        return Path(args.costs)
    out = work / "profile_costs.json"
    subprocess.run([PYTHON, "-m", "pipefold", "profile", "--batch-size", "32", "--microbatches", "8", "--repeats",
                    "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrations", type=int, default=2, help="calibration runs (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the launches (default 4)")
    parser.add_argument("--steps", type=int, default=8, help="steps per launch (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each launch left out (default 2)")
    parser.add_argument("--costs", type=Path, help="model costs whose memory model gives the blocks' bytes "
                        "(default: a quick `pipefold profile` of the model)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps <= args.warmup or args.calibrations < 1 or args.rounds < 1:
        parser.error("give --steps above --warmup, and at least one calibration and one round")
    work = Path(tempfile.mkdtemp(prefix="pipefold-split-price-"))
    print(f"work folder {work}", file=sys.stderr)
    costs = _profile_costs(args, work)
    priced, rounds = [], []
    for index in range(max(args.calibrations, args.rounds)):
        # Calibrations and rounds alternate, so a change of the host's load meets both.
        if index < args.calibrations:
            print(f"calibration {index + 1} (load {_load()})", file=sys.stderr)
            priced.append(_priced(costs, _calibrate(work / f"cal{index}")))
        if index < args.rounds:
            runs = {family: _train(family, args.steps, args.warmup, work / f"r{index}_{family}") for family in FAMILIES}
            print(f"round {index + 1}: " + ", ".join(f"{family} share {run['core_share']:.2f} (load {run['load']})"
                                                  for family, run in runs.items()), file=sys.stderr)
            rounds.append(runs)
    for index, layouts in enumerate(priced, start=1):
        print(f"calibration {index}: " + "; ".join(
            f"{name}: I and W {found['split_overhead_us']:.0f} us beyond B, W share "
            f"{'/'.join(f'{x:.2f}' for x in found['weight_share'])}" for name, found in layouts.items()))
    print("\n| family | stage | kind | priced over measured, split block zb-h1 (before) | 1f1b+split (now) |")
    print("|---|---|---|---|---|")
    table: dict[str, Any] = {}
    for family in FAMILIES[1:]:
        for stage in (1,):  # on 2 ranks the first stage's pair runs fused: only the last splits
            for kind in ("i", "w"):
                cells = []
                for layout in ("zb-h1", "1f1b+split"):
                    ratios = []
                    for layouts in priced:
                        model, base = layouts[layout]["families"][family], layouts[layout]["families"]["1f1b"]
                        for runs in rounds:
                            planned = model[kind][stage] / base["b"][stage]
                            measured = runs[family][kind][stage] / runs["1f1b"]["b"][stage]
                            ratios.append(planned / measured)
                    table[f"{family} {stage} {kind} {layout}"] = ratios
                    cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
                print(f"| {family} | {stage} | {kind.upper()} | {cells[0]} | {cells[1]} |")
    print("\n(median over calibrations x rounds, range in brackets; each relative to 1F1B's B on the stage)")
    if args.json is not None:
        args.json.write_text(json.dumps({"priced": priced, "rounds": rounds, "table": table}, indent=1))


if __name__ == "__main__":
    main()
