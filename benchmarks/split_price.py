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

Then rounds of `pipefold train` launches (`CONFIGURATIONS`: 1F1B on the calibration's stages
[4,4], zb-h1 and zb-h2 on them, zb-v and dualpipe-v on [3,1,1,3], 8 micro-batches of 4 rows),
alternated with the calibrations. Per configuration and action kind, the planner's stage costs
over the run's own (`benchmarks/planner.py`'s per-kind ratio, each rank slowed by what it
holds), over the same round's 1F1B B ratio (the calibration's load out: 1.00 is priced as
1F1B's B is), and I and W over the same launch's F ratio (the launch's load out too, which on a
shared host moves 2x between launches: F is priced alike by both layouts). `--from JSON`
reprints a stored run's tables.
A benchmark, not a test: the ranks share the host's cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable
FAMILIES = ("1f1b", "zb-h1", "zb-h2")
# The launches' train flags: held_curve.py's, so both benchmarks launch the same job.
from benchmarks.held_curve import calibration_command, planned_profile  # noqa: E402


def v_launch(schedule: str) -> list[str]:
    """`pipefold train`'s flags for `schedule` at v=2, 8 micro-batches, on [3,1,1,3] (the layout
    of the planner's choices)."""
    return ["--ranks", "2", "--schedule", schedule, "--virtual", "2", "--microbatches", "8",
            "--partition", "3,1,1,3"]


CONFIGURATIONS = {
    "1f1b m=8 [4,4]": ["--ranks", "2", "--microbatches", "8", "--partition", "4,4"],
    "zb-h1 m=8 [4,4]": ["--ranks", "2", "--schedule", "zb-h1", "--microbatches", "8", "--partition", "4,4"],
    "zb-h2 m=8 [4,4]": ["--ranks", "2", "--schedule", "zb-h2", "--microbatches", "8", "--partition", "4,4"],
    "zb-v v=2 m=8 [3,1,1,3]": v_launch("zb-v"),
    "dualpipe-v v=2 m=8 [3,1,1,3]": v_launch("dualpipe-v"),
}
"""What the rounds launch: the calibration's own 1F1B (the reference), and split orders the planner
ranks (zb-h1, zb-h2; zb-v and dualpipe-v on [3,1,1,3], as its choices run)."""
BASE = "1f1b m=8 [4,4]"
LAYOUTS = ("zb-h1", "1f1b+split")


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _calibrate(folder: Path) -> Path:
    folder.mkdir()
    result = folder / "calibration.json"
    subprocess.run(
        calibration_command(folder),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result


def _priced(costs_path: Path, calibration: Path) -> dict[str, Any]:
    """Per layout, per family, per stage: the priced I, W and B (the family's held factors in), and
    the priced costs (`costs`, ModelCosts JSON)."""
    from dataclasses import replace

    from pipefold.cli.plan_calibrate import _bounds, _held_block
    from pipefold.plan.calibrate import at_run_prices, first_stage_backward
    from pipefold.plan.held_cost import order_held_bytes, with_held_cost
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import CostModel, Link

    costs = planned_profile(costs_path)  # as plan --profile prices it
    measured = json.loads(calibration.read_text())
    first = measured["phases"][0]
    rows = int(first["microbatch_rows"])
    bounds = _bounds(measured["partition"])
    run = CostModel.from_json(first["costs"])
    ranks = len(bounds) - 1
    held = _held_block(costs, measured, bounds, rows, ranks)
    assert held is not None and held.curve is not None
    # Both layouts with the zb-h1 block on the bytes curve, as when this compared them (the I-state
    # term, which takes it off the curve, is `benchmarks/istate_price.py`'s comparison).
    held = replace(held, curve_state_weights=())
    new, new_cal = at_run_prices(
        costs,
        run,
        bounds,
        rows,
        split=CostModel.from_json(measured["split_phase"]["costs"]),
        split_stages=measured["split_phase"]["split_stages"],
        held=held,
    )
    # As a calibration before the curve block: the zb-h1 block is the split block (and the curve's).
    zb = measured["curve_phase"]
    old_held = replace(held, split_bytes=held.curve_bytes, curve=None, curve_bytes=())
    old, old_cal = at_run_prices(
        costs,
        run,
        bounds,
        rows,
        split=CostModel.from_json(zb["costs"]),
        split_stages=zb["split_stages"],
        held=old_held,
    )
    placement = tuple(range(ranks))
    count = int(first["num_microbatches"])
    peaks = {family: order_held_bytes(costs, bounds, rows, family, ranks, count) for family in FAMILIES}
    layouts: dict[str, Any] = {}
    for name, priced, cal in (("zb-h1", old, old_cal), ("1f1b+split", new, new_cal)):
        families = {}
        for family in FAMILIES:
            model = first_stage_backward(
                stage_cost_model(priced, StageLayout(bounds, rows), (), Link()), priced, bounds
            )
            model = with_held_cost(model, priced, placement, peaks[family], bounds)
            families[family] = {"i": list(model.i), "w": list(model.w), "b": list(model.b)}
        layouts[name] = {
            "families": families,
            "split_overhead_us": cal.split_overhead_s * 1e6,
            "split_backward_share": cal.split_backward_share,
            "costs": priced.to_json(),
            "weight_share": list(cal.weight_share),
            "curve": [[x / 2**20, f, b] for x, f, b in cal.held_curve],
        }
    return layouts


def _profile_costs(args: argparse.Namespace, work: Path) -> Path:
    if args.costs is not None:
        return Path(args.costs)
    out = work / "profile_costs.json"
    subprocess.run(
        [
            PYTHON,
            "-m",
            "pipefold",
            "profile",
            "--batch-size",
            "32",
            "--microbatches",
            "8",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out


def _ratios(costs: dict[str, Any], run: dict[str, Any], work: Path) -> dict[str, float | None]:
    """Per action kind, the planner's stage costs for what `run` ran over its own
    (`benchmarks/planner.py`'s `_op_ratios`: each rank slowed by the activations it holds)."""
    from benchmarks.planner import _op_ratios

    path = work / "priced_costs.json"
    path.write_text(json.dumps(costs))
    options = argparse.Namespace(batch_size=32, cores=2, ranks=2)
    return _op_ratios(path, run, (), options)


def _print_table(priced: list[dict[str, Any]], rounds: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    """Per configuration and kind, the priced / measured ratio two ways, each layout: over the same
    round's 1F1B B ratio (the calibration's load out), and I and W over the same launch's F ratio
    (the launch's load out too: F is priced alike by both layouts)."""
    print(
        "\n| configuration | kind | zb-h1 block (before): over 1F1B's B | over its F "
        "| 1f1b+split block (now): over 1F1B's B | over its F |"
    )
    print("|---|---|---|---|---|---|")
    table: dict[str, Any] = {}

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})" if values else "-"

    for label in CONFIGURATIONS:
        for kind in ("F", "I", "W", "B"):
            cells = []
            for layout in LAYOUTS:
                over_base, over_f = [], []
                for layouts in priced:
                    for runs in rounds:
                        here = _ratios(layouts[layout]["costs"], runs[label], work)
                        base = _ratios(layouts[layout]["costs"], runs[BASE], work)["B"]
                        ratio, forward = here[kind], here["F"]
                        if ratio is not None and base:
                            over_base.append(ratio / base)
                            if kind in ("I", "W") and forward:
                                over_f.append(ratio / forward)
                table[f"{label} {kind} {layout}"] = {"over_1f1b_b": over_base, "over_f": over_f}
                cells += [cell(over_base), cell(over_f)]
            if cells[0] != "-":
                print(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    print("\n(median over calibrations x rounds, range in brackets)")
    return table


def add_run_arguments(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """The flags of a benchmark that alternates calibrations with rounds of launches
    (`alternate_runs`): this one's and `istate_price.py`'s."""
    parser.add_argument("--calibrations", type=int, default=2, help="calibration runs (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"rounds of the launches (default {rounds})"
    )
    parser.add_argument("--steps", type=int, default=8, help="steps per launch (default 8)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="first steps of each launch left out (default 2)"
    )
    parser.add_argument(
        "--costs",
        type=Path,
        help="model costs whose memory model gives the blocks' bytes "
        "(default: a quick `pipefold profile` of the model)",
    )


def train_options(args: argparse.Namespace) -> argparse.Namespace:
    """What `benchmarks.planner._train` reads, from `add_run_arguments`' flags."""
    return argparse.Namespace(steps=args.steps, warmup=args.warmup, batch_size=32, device="cpu")


def alternate_runs(
    args: argparse.Namespace,
    train: argparse.Namespace,
    work: Path,
    configurations: dict[str, list[str]],
    after_each: Callable[[list[Path], list[dict[str, Any]]], None] | None = None,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """`args.calibrations` calibration runs and `args.rounds` rounds of `configurations` launched
    in turn, alternated (a calibration, then a round), so a change of the host's load meets both;
    each launch keeps the load it started at. `after_each` sees both lists after each step (to
    write them as they grow). Returns the calibrations' result files and the rounds."""
    from benchmarks.planner import _train

    calibrations: list[Path] = []
    rounds: list[dict[str, Any]] = []
    for index in range(max(args.calibrations, args.rounds)):
        if index < args.calibrations:
            print(f"calibration {index + 1} (load {_load()})", file=sys.stderr)
            calibrations.append(_calibrate(work / f"cal{index}"))
        if index < args.rounds:
            runs: dict[str, dict[str, Any]] = {}
            for label, words in configurations.items():
                load = _load()
                runs[label] = {**_train(words, train, work / f"r{index}_{len(runs)}"), "load": load}
            print(
                f"round {index + 1}: "
                + ", ".join(
                    f"{label} share {run['core_share']:.2f} (load {run['load']})"
                    for label, run in runs.items()
                ),
                file=sys.stderr,
            )
            rounds.append(runs)
        if after_each is not None:
            after_each(calibrations, rounds)
    return calibrations, rounds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, rounds=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--from", dest="stored", type=Path, metavar="JSON", help="reprint a stored --json's tables"
    )
    args = parser.parse_args()
    if args.stored is not None:
        stored = json.loads(args.stored.read_text())
        _print_table(
            stored["priced"], stored["rounds"], Path(tempfile.mkdtemp(prefix="pipefold-split-price-"))
        )
        return
    if args.steps <= args.warmup or args.calibrations < 1 or args.rounds < 1:
        parser.error("give --steps above --warmup, and at least one calibration and one round")
    train = train_options(args)
    work = Path(tempfile.mkdtemp(prefix="pipefold-split-price-"))
    print(f"work folder {work}", file=sys.stderr)
    costs = _profile_costs(args, work)
    calibrations, rounds = alternate_runs(args, train, work, CONFIGURATIONS)
    priced = [_priced(costs, path) for path in calibrations]
    for index, layouts in enumerate(priced, start=1):
        print(
            f"calibration {index}: "
            + "; ".join(
                f"{name}: I and W {found.get('split_backward_share', 0.0):.3f} of the stage's backward "
                f"+ {found['split_overhead_us']:.0f} us beyond B, W share "
                f"{'/'.join(f'{x:.2f}' for x in found['weight_share'])}"
                for name, found in layouts.items()
            )
        )
    table = _print_table(priced, rounds, work)
    if args.json is not None:
        args.json.write_text(json.dumps({"priced": priced, "rounds": rounds, "table": table}, indent=1))


if __name__ == "__main__":
    main()
