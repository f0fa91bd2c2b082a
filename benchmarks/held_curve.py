"""How much slower are a rank's actions when it holds a little more activation memory than 1F1B?
`pipefold plan --profile` prices a rank that holds more than its calibration's 1F1B run by a
slope per byte fitted against GPipe, which holds 4-8x as much (docs/plan.md, "Measured costs").
Schedules that hold only a little more (zb-h1 and zb-h2's last rank, the v=2 orders on
[3,1,1,3]) were priced 5-14% cheap relative to train's defaults in the planner benchmark. This
measures the same stages [4,4] (the same layers on the same ranks, 8 micro-batches of 4 rows) run
by families that hold 1x (1F1B), about 2x on the last rank (zb-h1), about 1.5x and 3x (zb-h2) and
4-8x (GPipe) 1F1B's activations, alternated in rounds of `pipefold train` launches:

    .venv/bin/python benchmarks/held_curve.py                        # 4 rounds, 2 calibration runs
    .venv/bin/python benchmarks/held_curve.py --rounds 6 --calibrations 0 --json /tmp/held_curve.json

1. Per round and rank: each family's F and backward (B, or I + W) over 1F1B's in the same round,
   with the rank's activation peak (train's `activations_peak`) and rank 0's core share (its CPU
   over wall seconds: below ~0.9 another process took the core, and the round's ratios are the
   load's). What the per-byte slope predicts is in the last columns: GPipe's ratio scaled down to
   each family's extra bytes (a straight line through 1F1B's and GPipe's points).
2. `--calibrations N` runs of the calibration run `plan --profile` starts (1F1B at 8 and 4
   micro-batches, its split (1f1b+split), GPipe and zb-h1 blocks at 8 between them:
   `pipefold.cli.calibration_run`),
   printing per stage the zb-h1 and GPipe blocks' F over the 1F1B block's. Where the last rank's
   F ratio stands above the first rank's (which holds what 1F1B holds), that is not drift but the
   memory held.
3. For each calibration, what the plan prices from it (`pipefold.plan.calibrate.at_run_prices`,
   the bytes from the planner's memory model of a `pipefold profile` of the same model, or
   `--costs FILE`): the held curve's knots, and per family and rank its F and backward over
   1F1B's as the curve prices them beside what the straight line through GPipe's points (the
   price before the curve) gives, to hold against the measured medians of 1.

`--from DIR` reprices a stored work folder (its rounds and calibrations) without launching:
what a change to the pricing does to the same measurements.

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
PYTHON = sys.executable
FAMILIES = ("1f1b", "zb-h1", "zb-h2", "gpipe")
TRAIN = [
    "--batch-size",
    "32",
    "--ranks",
    "2",
    "--microbatches",
    "8",
    "--partition",
    "4,4",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "--set",
    "sample_tokens=0",
    "--set",
    "eval_every=0",
]



def calibration_command(folder: Path) -> list[str]:
    """The calibration run `plan --profile` makes (its blocks: 1F1B at 8 and 4 micro-batches, the
    split, GPipe held and zb-h1 curve blocks), on `TRAIN`'s job, writing into `folder`
    (`calibration.json`, `run/`)."""
    return [
        PYTHON, "-m", "pipefold.cli.calibration_run", "--result", str(folder / "calibration.json"),
        "--microbatches", "8,4", "--phase-steps", "12", "--split", "1f1b+split", "--held", "gpipe",
        "--curve", "zb-h1", "--", "--out", str(folder / "run"), *TRAIN,
    ]


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _train(family: str, steps: int, warmup: int, out: Path) -> dict[str, Any]:
    command = [
        PYTHON,
        "-m",
        "pipefold",
        "train",
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--schedule",
        family,
        *TRAIN,
    ]
    load = _load()
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads((out / "summary.json").read_text())
    costs = json.loads((out / "costs.json").read_text())
    walls, cpus = summary["step_seconds"][warmup:], summary["step_cpu_seconds"][warmup:]
    return {
        "step_s": statistics.median(walls),
        "load": load,
        "core_share": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
        # `b` is a stage's B, or its I + W where the stage ran them apart (`measured_cost_model`).
        "f": costs["f"],
        "backward": costs["b"],
        "peaks_mib": [m["activations_peak"] / 2**20 for m in summary["memory"]],
    }


def slope_prediction(base_peak: float, gpipe_peak: float, gpipe_ratio: float, peak: float) -> float:
    """The ratio a straight line through (base_peak, 1) and (gpipe_peak, gpipe_ratio) gives at `peak`
    (what a slope per byte fitted against GPipe prices), never below 1."""
    if gpipe_peak <= base_peak:
        return 1.0
    return max(1.0, 1 + (gpipe_ratio - 1) * (peak - base_peak) / (gpipe_peak - base_peak))


def _rounds(args: argparse.Namespace, work: Path) -> list[dict[str, dict[str, Any]]]:
    done = []
    for index in range(args.rounds):
        runs = {
            family: _train(family, args.steps, args.warmup, work / f"r{index}_{family}")
            for family in FAMILIES
        }
        done.append(runs)
        print(
            f"round {index + 1}: "
            + ", ".join(
                f"{family} {run['step_s'] * 1e3:.0f} ms (load {run['load']}, share {run['core_share']:.2f})"
                for family, run in runs.items()
            ),
            file=sys.stderr,
        )
    return done


def _stored_rounds(work: Path, warmup: int) -> list[dict[str, dict[str, Any]]]:
    """The rounds of a stored work folder (`r{index}_{family}` run folders), as `_rounds` gives them."""
    done = []
    index = 0
    while all((work / f"r{index}_{family}" / "summary.json").exists() for family in FAMILIES):
        runs = {}
        for family in FAMILIES:
            out = work / f"r{index}_{family}"
            summary = json.loads((out / "summary.json").read_text())
            costs = json.loads((out / "costs.json").read_text())
            walls, cpus = summary["step_seconds"][warmup:], summary["step_cpu_seconds"][warmup:]
            runs[family] = {
                "step_s": statistics.median(walls), "load": "?",
                "core_share": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
                "f": costs["f"], "backward": costs["b"],
                "peaks_mib": [m["activations_peak"] / 2**20 for m in summary["memory"]],
            }
        done.append(runs)
        index += 1
    return done


def _print_rounds(done: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    print(
        "| round | family | rank | peak MiB (1F1B's) | F / 1F1B's | backward / 1F1B's "
        "| GPipe's line predicts | core share | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    table: dict[str, Any] = {}
    for index, runs in enumerate(done, start=1):
        base, gpipe = runs["1f1b"], runs["gpipe"]
        for family in FAMILIES[1:]:
            run = runs[family]
            for rank in range(2):
                f = run["f"][rank] / base["f"][rank]
                b = run["backward"][rank] / base["backward"][rank]
                line = slope_prediction(
                    base["peaks_mib"][rank],
                    gpipe["peaks_mib"][rank],
                    gpipe["f"][rank] / base["f"][rank],
                    run["peaks_mib"][rank],
                )
                quiet = min(run["core_share"], base["core_share"]) >= 0.9
                table.setdefault(f"{family} rank {rank}", []).append(
                    {
                        "f": f,
                        "backward": b,
                        "line": line,
                        "quiet": quiet,
                        "peak": run["peaks_mib"][rank],
                        "base_peak": base["peaks_mib"][rank],
                    }
                )
                peaks = f"{run['peaks_mib'][rank]:.0f} ({base['peaks_mib'][rank]:.0f})"
                print(
                    f"| {index} | {family} | {rank} | {peaks} "
                    f"| {f:.3f} | {b:.3f} | {line:.3f} | {run['core_share']:.2f} / {base['core_share']:.2f} "
                    f"| {run['load']} |"
                )
    print("\nMedians over the rounds where both launches had >= 0.9 of a core (else over all rounds):")
    for key, rows in table.items():
        kept = [row for row in rows if row["quiet"]] or rows
        print(
            f"  {key}: F {statistics.median(r['f'] for r in kept):.3f}, backward "
            f"{statistics.median(r['backward'] for r in kept):.3f}, GPipe's line "
            f"{statistics.median(r['line'] for r in kept):.3f} ({len(kept)} of {len(rows)} rounds)"
        )
    return table


def _calibrations(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    found = []
    for index in range(args.calibrations):
        folder = work / f"cal{index}"
        folder.mkdir()
        command = calibration_command(folder)
        load = _load()
        subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        measured = json.loads((folder / "calibration.json").read_text())
        base = measured["phases"][0]
        row: dict[str, Any] = {
            "load": load,
            "share": statistics.median(
                c / w for c, w in zip(base["kept_step_cpu_seconds"], base["kept_step_seconds"], strict=True)
            ),
        }
        # zb-h1 ran as the curve block (a stored run before it: as the split block).
        zb_key = "curve_phase" if "curve_phase" in measured else "split_phase"
        for key, name in ((zb_key, "zb-h1"), ("held_phase", "gpipe")):
            phase = measured[key]
            row[name] = [f / b for f, b in zip(phase["costs"]["f"], base["costs"]["f"], strict=True)]
        found.append(row)
        print(
            f"calibration {index + 1} (load {load}, 1F1B block's core share {row['share']:.2f}): "
            f"zb-h1 F / 1F1B's per stage {'/'.join(f'{x:.3f}' for x in row['zb-h1'])}, "
            f"GPipe {'/'.join(f'{x:.3f}' for x in row['gpipe'])}"
        )
    return found


def _profile_costs(args: argparse.Namespace, work: Path) -> Path:
    """The costs whose memory model gives each block's bytes: `--costs`, else a quick profile."""
    if args.costs is not None:
        return Path(args.costs)
    out = work / "profile_costs.json"
    if not out.exists():
        subprocess.run([PYTHON, "-m", "pipefold", "profile", "--batch-size", "32", "--microbatches", "8",
                        "--repeats", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return out


def planned_profile(costs_path: Path) -> Any:
    """The profile's `ModelCosts` as `pipefold plan --profile` hands them to its calibration:
    identical blocks at their mean (`pipefold.plan.alike.pool_alike`). A quick profile (one
    repeat) times the GPT's four blocks 1.2x apart in forward and 1.7x in fixed seconds, and
    `at_run_prices` shares each calibrated stage's time over its layers by those times, so stages
    that cut a calibrated stage (v=2 [3,1,1,3] from 1F1B's [4,4]) would inherit that noise: the
    V layouts' rank 0 F was priced 3-4% high and rank 1's as low (BENCHMARKS.md, h-vrank0)."""
    from pipefold.plan import ModelCosts
    from pipefold.plan.alike import pool_alike

    return pool_alike(ModelCosts.from_json(costs_path))


def _priced(costs_path: Path, calibration: Path) -> dict[str, Any]:
    """What the plan prices from one stored calibration run: the held curve and, per family and
    rank, F and backward (I + W where the family splits it, on the last rank) over 1F1B's, by the
    curve ("curve") and as before it ("line": the split block's drift taken per stage and one
    straight line through GPipe's points over the most any rank held, `fit_held_slope`)."""
    from dataclasses import replace

    from pipefold.cli.plan_calibrate import _bounds, _held_block
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import at_run_prices, first_stage_backward
    from pipefold.plan.held_cost import family_state_weights, fit_held_slope, order_held_bytes, with_held_cost
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import CostModel, Link

    costs = planned_profile(costs_path)  # as plan --profile prices it
    measured = json.loads(calibration.read_text())
    first = measured["phases"][0]
    rows = -(-int(measured["batch_size"]) // int(first["num_microbatches"]))
    bounds = _bounds(measured["partition"])
    run = CostModel.from_json(first["costs"])
    split = CostModel.from_json(measured["split_phase"]["costs"])
    split_stages = measured["split_phase"]["split_stages"]
    held = _held_block(costs, measured, bounds, rows, len(bounds) - 1)
    assert held is not None
    curve, cal = at_run_prices(costs, run, bounds, rows, split=split, split_stages=split_stages, held=held)
    before, _ = at_run_prices(costs, run, bounds, rows, split=split, split_stages=split_stages)
    line = replace(before, held_forward_per_byte=fit_held_slope(run.f, held.measured.f, held.run_bytes,
                                                                held.block_bytes, kind="F"),
                   held_backward_per_byte=fit_held_slope(run.b, held.measured.b, held.run_bytes,
                                                         held.block_bytes, kind="B"),
                   held_reference_bytes=float(max(held.run_bytes)))
    placement = tuple(range(len(bounds) - 1))
    count = int(first["num_microbatches"])
    peaks = {
        family: order_held_bytes(costs, bounds, rows, family, len(placement), count) for family in FAMILIES
    }

    def model(priced: ModelCosts, family: str) -> CostModel:
        base = first_stage_backward(
            stage_cost_model(priced, StageLayout(bounds, rows), (), Link()), priced, bounds
        )
        states = family_state_weights(family, len(placement), count, 1) if priced.held_state_forward else ()
        return with_held_cost(base, priced, placement, peaks[family], bounds, states)

    families: dict[str, Any] = {}
    for family in FAMILIES[1:]:
        ranks = []
        for rank in placement:
            split_here = family != "gpipe" and rank == placement[-1]  # the first stage's pair runs fused
            row: dict[str, float] = {"mib": peaks[family][rank] / 2**20}
            for name, priced in (("curve", curve), ("line", line)):
                now, base = model(priced, family), model(priced, "1f1b")
                backward = now.i[rank] + now.w[rank] if split_here else now.b[rank]
                row[f"f_{name}"] = now.f[rank] / base.f[rank]
                row[f"backward_{name}"] = backward / base.b[rank]
            ranks.append(row)
        families[family] = ranks
    return {"curve_mib": [[x / 2**20, f, b] for x, f, b in cal.held_curve], "drift": cal.split_drift,
            "split_overhead_us": cal.split_overhead_s * 1e6,
            "before_split_overhead_us": before.split_overhead_s * 1e6,
            "split_backward_share": cal.split_backward_share,
            "before_split_backward_share": before.split_backward_share,
            "families": families}


def _print_priced(priced: list[dict[str, Any]]) -> None:
    for index, found in enumerate(priced, start=1):
        knots = ", ".join(f"+{x:.1f} MiB: F {f:.3f} B {b:.3f}" for x, f, b in found["curve_mib"])
        drift = "per stage" if found["drift"] is None else f"{found['drift']:.3f}"
        print(f"\ncalibration {index} priced: curve {knots}; split drift {drift}, split overhead "
              f"{found['split_overhead_us']:.0f} us + {found.get('split_backward_share', 0.0):.3f} "
              f"of the stage's backward per I and W (before: {found['before_split_overhead_us']:.0f} us + "
              f"{found.get('before_split_backward_share', 0.0):.3f})")
        print("| family | rank | MiB | F curve | F line (before) | backward curve | backward line (before) |")
        print("|---|---|---|---|---|---|---|")
        for family, ranks in found["families"].items():
            for rank, row in enumerate(ranks):
                print(f"| {family} | {rank} | {row['mib']:.0f} | {row['f_curve']:.3f} | {row['f_line']:.3f} "
                      f"| {row['backward_curve']:.3f} | {row['backward_line']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the four launches (default 4)")
    parser.add_argument("--steps", type=int, default=8, help="steps per launch (default 8)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="first steps of each launch left out (default 2)"
    )
    parser.add_argument(
        "--calibrations", type=int, default=2, help="calibration runs after the rounds (default 2)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--costs", type=Path, help="model costs whose memory model gives the blocks' bytes "
                        "(default: a quick `pipefold profile` of the model)")
    parser.add_argument("--from", dest="stored", type=Path, metavar="DIR",
                        help="reprice a stored work folder's rounds and calibrations; launch nothing")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}; give more steps")
    if args.stored is not None:
        work = args.stored
        done = _stored_rounds(work, args.warmup)
        table = _print_rounds(done) if done else {}
        calibrations = []
    else:
        work = Path(tempfile.mkdtemp(prefix="pipefold-held-curve-"))
        print(f"work folder {work}", file=sys.stderr)
        done = _rounds(args, work)
        table = _print_rounds(done) if done else {}
        calibrations = _calibrations(args, work)
    found = sorted(work.glob("cal*/calibration.json"))
    priced = [_priced(_profile_costs(args, work), path) for path in found] if found else []
    _print_priced(priced)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"rounds": done, "table": table, "calibrations": calibrations, "priced": priced}, indent=1
            )
        )


if __name__ == "__main__":
    main()
