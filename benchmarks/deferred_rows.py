"""A deferred W's extra over rows, and the split share pooled with the profile's, on fresh calibrations.

    .venv/bin/python benchmarks/deferred_rows.py --calibrations 3 --json /tmp/deferred_rows.json

Each calibration is what `pipefold plan --profile --ranks 2 --batch-size 32` runs: the one-process
profile (`pipefold.cli.profile.measure`, 5 repeats), then the calibration run of train's default
GPT (`pipefold.cli.plan_calibrate.calibration_command`: 1F1B at each size, the split, GPipe and
zb-h1 blocks at the first, and the second zb-h1 block at the second size, twice the rows), priced
by `at_run_prices` as the plan prices it. Per calibration: the load and rank 0's core share; the
deferred W's extra fraction at the first size (`deferred_weight_grad`) and its cap in seconds
(`deferred_weight_most_s`) with the fraction that cap gives at the second size's W; the wall
seconds the second curve block added and all blocks' wall seconds; the split share of the
block, of the profile, and as priced (their mean). Compare rows of one invocation, and give the
load.

    .venv/bin/python benchmarks/deferred_rows.py --profiles 9 --rows 4

    .venv/bin/python benchmarks/deferred_rows.py --planner-run /tmp/pipefold-planner-XXXX --batch-size 64

`--planner-run DIR`: instead, a stored `benchmarks/planner.py` run's launches repriced (pure code):
per configuration that ran W, each stage's share of deferred W in its order, its W priced without
the deferred term, and its measured W over that price (median over rounds); then the
configuration's W priced over measured as fitted, without the term, and with a cap of `d` times
the calibration's split stage W at its first size (what a second block fits where the extra had
stopped growing there).

`--profiles N`: instead, N profiles alone (as `plan --profile` takes them, at `--rows`), each one's
estimate of the split share on the 2-rank run's split stage (layers 4:8 of [4,4]:
`pipefold.plan.split_fit.profile_split_share`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _args(batch_size: int) -> argparse.Namespace:
    """`pipefold plan --profile --ranks 2 --batch-size B`'s flags as the profile and calibration read them."""
    return argparse.Namespace(model=None, num_layers=4, d_model=128, num_heads=4, seq_len=128, vocab_size=256,
                              untied=False, device="cpu", threads=1, repeats=5, precision="fp32",
                              batch_size=batch_size, microbatches=None, max_microbatches=None, rows=None)


def one(batch_size: int, folder: Path) -> dict[str, Any]:
    """One profile and calibration run, priced."""
    from pipefold.cli.plan_calibrate import _bounds, _held_block, calibration_command
    from pipefold.cli.profile import measure, profile_rows
    from pipefold.plan.alike import pool_alike
    from pipefold.plan.calibrate import at_run_prices
    from pipefold.simulate import CostModel

    args = _args(batch_size)
    load = os.getloadavg()[0]
    measured = measure(args, profile_rows(args))
    costs = pool_alike(measured.costs)
    started = time.perf_counter()
    subprocess.run(calibration_command(args, 2, 12, folder, False), cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    result = json.loads((folder / "calibration.json").read_text())
    first = result["phases"][0]
    rows, bounds = int(first["microbatch_rows"]), _bounds(result["partition"])
    others = [(CostModel.from_json(phase["costs"]), int(phase["microbatch_rows"]))
              for phase in result["phases"][1:]]
    split = result["split_phase"]
    held = _held_block(costs, result, bounds, rows, 2)
    priced, cal = at_run_prices(costs, CostModel.from_json(first["costs"]), bounds, rows, others,
                                split=CostModel.from_json(split["costs"]), split_stages=split["split_stages"],
                                held=held, layer_split=measured.layer_split())
    blocks = [*result["phases"], *(result[key] for key in ("split_phase", "held_phase", "curve_phase",
                                                           "curve_rows_phase") if key in result)]
    second = result.get("curve_rows_phase")
    core = min(sum(block["kept_step_cpu_seconds"]) / sum(block["kept_step_seconds"]) for block in blocks)
    # The second size's W on the split stage, as the cap prices it: its fraction there.
    fraction = None
    if cal.deferred_weight_most_s > 0 and held is not None and held.curve_rows is not None:
        from pipefold.plan.stages import StageLayout, stage_cost_model
        from pipefold.simulate import Link

        model = stage_cost_model(priced, StageLayout(tuple(bounds), held.curve_rows_at), (), Link())
        fraction = min(cal.deferred_weight_grad, cal.deferred_weight_most_s / model.w[-1])
    return {"load": load, "core_share": core, "calibration_s": seconds,
            "blocks_s": sum(sum(block["step_seconds"]) for block in blocks),
            "second_block_s": sum(second["step_seconds"]) if second else 0.0,
            "second_rows": int(second["microbatch_rows"]) if second else None,
            "deferred": cal.deferred_weight_grad, "most_ms": cal.deferred_weight_most_s * 1e3,
            "fraction_at_second": fraction, "split_block": cal.split_share_block,
            "split_profile": cal.split_share_profile, "split_priced": cal.split_backward_share}


def profiles(batch_size: int, rows: int, count: int) -> list[float | None]:
    """`--profiles`: see the module docstring."""
    from pipefold.cli.profile import measure
    from pipefold.plan.split_fit import profile_split_share

    found = []
    for index in range(count):
        load = os.getloadavg()[0]
        layer_split = measure(_args(batch_size), rows).layer_split()
        share = None if layer_split is None else profile_split_share(layer_split, (0, 4, 8), {1})
        found.append(share)
        print(f"profile {index + 1}, {rows} rows, load {load:.2f}: split share {share}", flush=True)
    return found


def planner_run(work: Path, batch_size: int) -> None:
    """`--planner-run`: see the module docstring."""
    import dataclasses
    import math
    import statistics

    from benchmarks import planner
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import first_stage_backward
    from pipefold.plan.deferred_weight import stage_deferred_shares
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import Link

    plan = json.loads((work / "plan.json").read_text())
    args = argparse.Namespace(ranks=2, cores=2, batch_size=batch_size, warmup=2)
    fitted = ModelCosts.from_json(work / "costs.json")
    cal = plan["calibration"]
    first_w = stage_cost_model(fitted, StageLayout(tuple(cal["bounds"]), cal["rows"]), (), Link()).w[-1]
    variants = {"as fitted": fitted, "no term": dataclasses.replace(fitted, deferred_weight_grad=0.0),
                "cap d x W1": dataclasses.replace(fitted, deferred_weight_most_s=fitted.deferred_weight_grad
                                                   * first_w)}
    print(f"d {fitted.deferred_weight_grad:.3f}, the calibration's split stage W at {cal['rows']} rows "
          f"{first_w * 1e3:.2f} ms")
    print("| configuration | rows | deferred share per stage | W ms per stage (no term) | measured / that "
          "| W priced / measured: as fitted | no term | cap d x W1 |")
    print("|---|---|---|---|---|---|---|---|")
    found = {path.parent.name.split("c")[1] for path in work.glob("r*c*/summary.json")}  # rRcC: config C
    for folder in sorted(found, key=int):
        runs = []
        for out in sorted(work.glob(f"r*c{folder}")):
            summary = json.loads((out / "summary.json").read_text())
            runs.append({"op_seconds": planner._op_seconds(out), "partition": summary["partition"],
                         "num_microbatches": summary["config"]["schedule"]["num_microbatches"],
                         "schedule": summary["config"]["schedule"]})
        order = work / f"order{folder}.json"
        schedule_file = order if order.exists() else None
        if all(math.isnan(value) for value in runs[0]["op_seconds"]["W"]):
            continue
        bounds = planner._bounds(runs[0]["partition"])
        rows = -(-batch_size // int(runs[0]["num_microbatches"]))
        plain = variants["no term"]
        model = stage_cost_model(plain, StageLayout(bounds, rows), (), Link(), 2.0)
        model = first_stage_backward(model, plain, bounds)
        model = planner._held(model, plain, runs[0], schedule_file, args, bounds)
        shares = stage_deferred_shares(planner._run_schedule(runs[0], schedule_file, args))
        per_stage = []
        for stage in range(len(bounds) - 1):
            values = [run["op_seconds"]["W"][stage] / model.w[stage] for run in runs
                      if not math.isnan(run["op_seconds"]["W"][stage])]
            per_stage.append(f"{statistics.median(values):.3f}" if values else "-")
        cells = []
        for costs in variants.values():
            path = work.parent / f"{work.name}-deferred-rows-costs.json"
            path.write_text(json.dumps(costs.to_json()))
            ratios = [planner._op_ratios(path, run, (), args, schedule_file)["W"] for run in runs]
            path.unlink()
            cells.append(f"{statistics.median(r for r in ratios if r is not None):.3f}")
        name = "searched order" if schedule_file else runs[0]["schedule"]["name"]
        sizes = [stop - start for start, stop in zip(bounds, bounds[1:], strict=False)]
        print(f"| c{folder} {name} m={runs[0]['num_microbatches']} {sizes} | {rows} "
              f"| {' '.join(f'{x:.2f}' for x in shares)} | {' '.join(f'{x * 1e3:.2f}' for x in model.w)} "
              f"| {' '.join(per_stage)} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profiles", type=int, default=0, help="instead, this many profiles alone")
    parser.add_argument("--rows", type=int, default=4, help="--profiles: rows per micro-batch")
    parser.add_argument("--planner-run", type=Path, default=None,
                        help="instead, reprice a stored planner run")
    args = parser.parse_args(argv)
    if args.calibrations < 1 or args.profiles < 0 or args.rows < 1:
        parser.error("give --calibrations >= 1, --profiles >= 0, --rows >= 1")
    sys.path.insert(0, str(ROOT))
    if args.planner_run is not None:
        planner_run(args.planner_run, args.batch_size)
        return 0
    if args.profiles:
        shares = profiles(args.batch_size, args.rows, args.profiles)
        if args.json is not None:
            args.json.write_text(json.dumps(shares))
        return 0
    work = Path(tempfile.mkdtemp(prefix="pipefold-deferred-rows-"))
    print(f"work folder {work}", file=sys.stderr)
    print("| # | load | core share | calibration s | blocks s | 2nd curve block s | d | cap ms "
          "| d at 2nd size | split: block | profile | priced |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    found = []
    for index in range(args.calibrations):
        folder = work / f"cal{index}"
        folder.mkdir()
        row = one(args.batch_size, folder)
        found.append(row)
        at_second = "-" if row["fraction_at_second"] is None else f"{row['fraction_at_second']:.3f}"
        profile = "-" if row["split_profile"] is None else f"{row['split_profile']:.3f}"
        print(f"| {index + 1} | {row['load']:.2f} | {row['core_share']:.2f} | {row['calibration_s']:.1f} "
              f"| {row['blocks_s']:.1f} | {row['second_block_s']:.2f} ({row['second_rows']} rows) "
              f"| {row['deferred']:.3f} | {row['most_ms']:.2f} | {at_second} | {row['split_block']:.3f} "
              f"| {profile} | {row['split_priced']:.3f} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
