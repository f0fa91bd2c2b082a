"""Is a zero-bubble rank's F priced as it runs? The same calibrations priced two ways (the held
curve through GPipe's and zb-h1's points, by bytes; or GPipe's points and an I-state term, by the
I states a rank holds at each F), against the same launches.

    .venv/bin/python benchmarks/istate_price.py --calibrations 3 --rounds 3 --json /tmp/istate.json
    .venv/bin/python benchmarks/istate_price.py --from /tmp/istate.json     # reprice a stored run

`pipefold plan --profile`'s calibration runs a zb-h1 block whose last rank holds one I state (an
input-gradient backward waiting for its W) at most of its F. Before, that rank's F over 1F1B's
became the held curve's knot at its bytes (+9 MiB), so every order holding those bytes was
charged, with or without I states, and zb-h2's two states were extrapolated by bytes; now it fits
`ModelCosts.held_state_forward` (`pipefold.plan.held_states`) and the curve keeps GPipe's points.
Each calibration (`benchmarks/split_price.py`'s layout: 1F1B at 8 and 4 micro-batches, 1f1b+split,
GPipe, zb-h1) is priced both ways (`at_run_prices`, its `HeldBlock` with and without the curve
block's I-state weights), rounds of `pipefold train` launches (`CONFIGURATIONS`) alternated with
the calibrations. Per configuration and rank: the planner's F (each rank slowed by what it holds,
as `pipefold plan` prices the order) over the launch's, over the same round's 1F1B launch's ratio
(the calibration's load out), and the last rank's over rank 0's of the same launch (the launch's
load out too); and the planner's step time over the launch's, over 1F1B's. Median over
calibrations x rounds. A benchmark, not a test: the ranks share the host's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import split_price  # noqa: E402
from benchmarks.held_curve import planned_profile  # noqa: E402

CONFIGURATIONS = {
    **split_price.CONFIGURATIONS,
    "interleaved-1f1b v=2 m=8 [3,1,1,3]": split_price.v_launch("interleaved-1f1b"),
}
"""`split_price`'s launches, and a v=2 [3,1,1,3] order without a split: it holds more bytes than
1F1B on its ranks and no I state."""
BASE = split_price.BASE
WAYS = ("bytes", "states")
"""How the calibration's zb-h1 block is priced: a knot of the bytes curve (before), or the I-state term."""


def _priced(costs_path: Path, calibration: Path) -> dict[str, Any]:
    """Per way, the priced costs (ModelCosts JSON), the held curve and s(1)."""
    from pipefold.cli.plan_calibrate import _bounds, _held_block
    from pipefold.plan.calibrate import at_run_prices
    from pipefold.simulate import CostModel

    costs = planned_profile(costs_path)  # as plan --profile prices it
    measured = json.loads(calibration.read_text())
    first = measured["phases"][0]
    rows = int(first["microbatch_rows"])
    bounds = _bounds(measured["partition"])
    others = [
        (CostModel.from_json(phase["costs"]), int(phase["microbatch_rows"]))
        for phase in measured["phases"][1:]
    ]
    held = _held_block(costs, measured, bounds, rows, len(bounds) - 1)
    assert held is not None and held.curve is not None and held.curve_state_weights
    ways = {}
    for way, block in (("bytes", replace(held, curve_state_weights=())), ("states", held)):
        priced, cal = at_run_prices(
            costs,
            CostModel.from_json(first["costs"]),
            bounds,
            rows,
            others,
            split=CostModel.from_json(measured["split_phase"]["costs"]),
            split_stages=measured["split_phase"]["split_stages"],
            held=block,
        )
        ways[way] = {
            "costs": priced.to_json(),
            "curve": [[x / 2**20, f, b] for x, f, b in cal.held_curve],
            "state_forward": cal.held_state_forward,
            "curve_drift": cal.curve_drift,
            "latency": cal.message_latency_s,
        }
    return ways


def priced_launch(costs_json: dict[str, Any], run: dict[str, Any], latency: float, work: Path
                  ) -> tuple[Any, Any, float]:
    """A launch of `run` priced on `costs_json` as the planner prices it (2 ranks, batch 32): the
    stage costs with the held terms for its order, its schedule's placement, and the planner's
    step over the launch's. `benchmarks/deferred_price.py` prices the same way."""
    from benchmarks.planner import _bounds, _forecast, _held, _run_schedule
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import first_stage_backward
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import Link

    path = work / "priced_costs.json"
    path.write_text(json.dumps(costs_json))
    options = argparse.Namespace(batch_size=32, cores=2, ranks=2)
    priced = ModelCosts.from_json(path)
    bounds = tuple(_bounds(run["partition"]))
    layout = StageLayout(bounds, -(-32 // int(run["num_microbatches"])))
    model = first_stage_backward(stage_cost_model(priced, layout, (), Link(), 2.0), priced, bounds)
    model = _held(model, priced, run, None, options, bounds)
    placement = _run_schedule(run, None, options).placement
    step = _forecast(path, run, options, latency)
    return model, placement, (step or float("nan")) / run["step_s"]


def _rank_forward(way: dict[str, Any], run: dict[str, Any], work: Path) -> tuple[list[float], float]:
    """Per rank, the planner's F seconds over the launch's (summed over the rank's stages), and the
    planner's step time over the launch's."""
    model, placement, step = priced_launch(way["costs"], run, way["latency"], work)
    ratios = []
    for rank in range(2):
        stages = [stage for stage, on in enumerate(placement) if on == rank]
        ratios.append(sum(model.f[s] for s in stages) / sum(run["op_seconds"]["F"][s] for s in stages))
    return ratios, step


def _table(
    priced: list[dict[str, Any]], rounds: list[dict[str, Any]], work: Path, min_share: float = 0.0
) -> dict[str, Any]:
    """The table, each launch kept where it and its round's 1F1B launch had at least `min_share`
    of a core on rank 0; and per way the mean |median - 1| over the configurations but 1F1B."""
    table: dict[str, Any] = {}
    print(
        "\n| configuration | way | rank 0 F / 1F1B's | rank 1 F / 1F1B's | rank 1 over rank 0 "
        "| step / 1F1B's |"
    )
    print("|---|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})" if values else "-"

    for label in CONFIGURATIONS:
        for way in WAYS:
            zero, one, within, step = [], [], [], []
            for ways in priced:
                for runs in rounds:
                    if (
                        label not in runs
                        or min(runs[label]["core_share"], runs[BASE]["core_share"]) < min_share
                    ):
                        continue
                    base, base_step = _rank_forward(ways[way], runs[BASE], work)
                    here, here_step = _rank_forward(ways[way], runs[label], work)
                    zero.append(here[0] / base[0])
                    one.append(here[1] / base[1])
                    within.append(here[1] / here[0])
                    step.append(here_step / base_step)
            table[f"{label} {way}"] = {"rank0": zero, "rank1": one, "rank1_over_rank0": within, "step": step}
            print(f"| {label} | {way} | {cell(zero)} | {cell(one)} | {cell(within)} | {cell(step)} |")
    print("\n(priced over measured; median over calibrations x rounds, range in brackets)")
    for way in WAYS:
        misses = {
            key: [
                abs(statistics.median(values[key]) - 1)
                for name, values in table.items()
                if name.endswith(f" {way}") and not name.startswith(BASE) and values[key]
            ]
            for key in ("rank0", "rank1", "rank1_over_rank0", "step")
        }
        print(
            f"{way}: mean |median - 1| "
            + ", ".join(f"{key} {statistics.fmean(found):.3f}" for key, found in misses.items() if found)
        )
    for index, ways in enumerate(priced, start=1):
        print(
            f"calibration {index}: "
            + "; ".join(
                f"{way}: s(1) {found['state_forward']:.3f}, drift {found['curve_drift']:.3f}, curve "
                + ", ".join(f"+{x:.1f} MiB x{f:.3f}/{b:.3f}" for x, f, b in found["curve"])
                for way, found in ways.items()
            )
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    split_price.add_run_arguments(parser, rounds=3)
    parser.add_argument("--json", type=Path, help="also write the launches and calibrations here")
    parser.add_argument(
        "--min-share",
        type=float,
        default=0.0,
        help="keep only launches whose rank 0 (and its round's 1F1B's) had this share of a core",
    )
    parser.add_argument(
        "--from",
        dest="stored",
        type=Path,
        metavar="JSON",
        help="reprice a stored --json's calibrations (this tree's code) against its launches",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipefold-istate-price-"))
    if args.stored is not None:
        stored = json.loads(args.stored.read_text())
        costs = Path(stored["costs"])
        priced = [_priced(costs, Path(path)) for path in stored["calibrations"]]
        _table(priced, stored["rounds"], work, args.min_share)
        return
    if args.steps <= args.warmup or args.calibrations < 1 or args.rounds < 1:
        parser.error("give --steps above --warmup, and at least one calibration and one round")
    print(f"work folder {work}", file=sys.stderr)
    costs = split_price._profile_costs(argparse.Namespace(costs=args.costs), work)
    train = split_price.train_options(args)

    def write(calibrations: list[Path], rounds: list[dict[str, Any]]) -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(
                {"costs": str(costs), "calibrations": [str(path) for path in calibrations], "rounds": rounds},
                indent=1))

    calibrations, rounds = split_price.alternate_runs(args, train, work, CONFIGURATIONS, write)
    _table([_priced(costs, Path(path)) for path in calibrations], rounds, work, args.min_share)


if __name__ == "__main__":
    main()
