"""Is one configuration really faster than another, or is the difference the host's noise? Two
(or more) `pipefold train` configurations alternated run by run, each round in a new order, read
as per-round ratios to the first.

    .venv/bin/python benchmarks/order_pair.py --plan PLAN.json --pick 0 --pick 2 --rounds 8
    .venv/bin/python benchmarks/order_pair.py --train "--schedule-file a.json --partition 3,1,1,3" \\
        --train "--schedule-file b.json --partition 3,1,1,3" --costs costs.json --rounds 8

`--plan`: a `pipefold plan --json` output (benchmarks/planner.py keeps its plan's as plan.json in
its work folder); `--pick I` trains its ranked entry I (0: the choice) with the flags
benchmarks/planner.py gives it; `--train ARGS` a configuration by its `pipefold train` flags.
`--costs`: the plan's measured costs (`plan --save-costs`, or planner.py's costs.json), for the
planner's price of each action kind beside the measured one.

Each round runs every configuration once, `--steps` steps, rotated (round r starts at
configuration r mod K), so neither sits always first after the other. Per round: each
configuration's median kept step over the first configuration's in the same round. Reported: the
ratios' median and range, how many rounds each configuration beat the first, the same ratio with
each run's step times rank 0's share of a core (what a host whose other work takes cores away
leaves of the step), and per configuration and action kind (F, I, W, B, summed over the stages
that ran that kind) the measured cost in ms and the planner's price over it. Ratios of runs a
minute apart, not absolute times: on a host shared with other work the absolute step moves
10-20% between runs, far more than between two configurations run back to back.

Cross-simulated (where every configuration has one partition and micro-batch count): each
configuration's order simulated on every run's measured stage costs, over the first's on the
same costs. One set of costs prices both orders, so the host's speed cancels: it says whether
one order is faster than the other at the costs the runtime measured, however loaded the host;
where it agrees with the measured ratio and not with the plan, the plan's prices are what ranked
them wrong.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.planner import _KINDS, _candidate_args, _label, _op_ratios, _train  # noqa: E402


def rotation(round_index: int, num_configs: int) -> list[int]:
    """The order configurations run in round `round_index`: starting at `round_index mod K`."""
    start = round_index % num_configs
    return [(start + offset) % num_configs for offset in range(num_configs)]


def round_ratios(steps: list[list[float]]) -> list[list[float]]:
    """`steps[c][r]`: configuration c's median step in round r. Per configuration, per round, its
    step over configuration 0's in the same round."""
    return [[mine / first for mine, first in zip(row, steps[0], strict=True)] for row in steps]


def kind_costs(op_seconds: dict[str, list[float]]) -> dict[str, float | None]:
    """Per action kind, the run's measured stage costs summed over the stages that ran it."""
    sums: dict[str, float | None] = {}
    for kind in _KINDS:
        ran = [seconds for seconds in op_seconds[kind] if not math.isnan(seconds)]
        sums[kind] = sum(ran) if ran else None
    return sums


def cross_ratios(schedules: list[Any], models: list[Any]) -> list[list[float]]:
    """Per configuration, per measured cost model (every run's, of any configuration): its
    schedule's simulated makespan over the first configuration's on the same costs. One set of
    costs prices both orders, so the host's speed of the moment cancels: what is left is what the
    orders themselves make of the stage costs the runs measured."""
    from pipefold.simulate import simulate

    spans = [[simulate(schedule, model).makespan for model in models] for schedule in schedules]
    return [[mine / first for mine, first in zip(row, spans[0], strict=True)] for row in spans]


def _ran_schedule(run: dict[str, Any], ranks: int) -> Any:
    """The schedule a run ran: its schedule file, else its family built as train built it."""
    from pipefold.schedule.io import load
    from pipefold.schedule.registry import build

    config = run["schedule"]
    if config.get("file"):
        return load(config["file"])
    return build(config["name"], num_ranks=ranks, num_microbatches=int(config["num_microbatches"]),
                 num_virtual=config["virtual"] or None)


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, help="a `pipefold plan --json` output")
    parser.add_argument("--pick", type=int, action="append", default=[], metavar="INDEX",
                        help="train the plan's ranked entry INDEX (0: the choice; repeatable)")
    parser.add_argument("--train", action="append", default=[], metavar="TRAIN_ARGS",
                        help="train this configuration (pipefold train flags in one string; repeatable)")
    parser.add_argument("--costs", type=Path, help="the plan's costs (plan --save-costs), for its prices")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="cores the ranks share (pipefold plan --cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out (default 3)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}; give more steps")
    if args.pick and args.plan is None:
        parser.error("--pick reads a plan: give --plan PLAN.json")

    work = Path(tempfile.mkdtemp(prefix="pipefold-order-pair-"))
    configs: list[tuple[str, list[str], tuple[int, ...]]] = []
    if args.plan is not None:
        top = json.loads(args.plan.read_text())["top"]
        for index in args.pick:
            entry = top[index]
            configs.append((f"#{index + 1}: {_label(entry)}", _candidate_args(entry, index, work),
                            tuple(entry["recompute"] or ())))
    configs += [(f"train {text}", shlex.split(text), ()) for text in args.train]
    if len(configs) < 2:
        parser.error("give two configurations or more (--pick, --train)")

    started = time.perf_counter()
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for round_index in range(args.rounds):
        for number in rotation(round_index, len(configs)):
            label, extra, _ = configs[number]
            result = _train(extra, args, work / f"r{round_index}c{number}")
            result["costs_path"] = work / f"r{round_index}c{number}" / "costs.json"
            runs[number].append(result)
            print(f"round {round_index + 1} {label}: step {result['step_s'] * 1e3:.0f} ms", file=sys.stderr)

    ratios = round_ratios([[run["step_s"] for run in done] for done in runs])
    # The same with each run's step times rank 0's share of a core: on a host whose other work
    # takes cores away, closer to the step each would take alone.
    busy = round_ratios([[run["step_s"] * run["core_share"] for run in done] for done in runs])
    # Cross-simulated: every configuration's order on every run's measured stage costs, where
    # they share one partition and micro-batch count (else one's costs do not fit the other).
    from pipefold.simulate import CostModel

    every = [run for done in runs for run in done]
    cross: list[list[float]] | None = None
    if len({(run["partition"], run["num_microbatches"]) for run in every}) == 1:
        models = [CostModel.from_json(json.loads(run["costs_path"].read_text())) for run in every]
        cross = cross_ratios([_ran_schedule(done[0], args.ranks) for done in runs], models)
    print(f"{args.rounds} rounds of {args.steps} steps ({args.warmup} left out per run), rotated, "
          f"{time.perf_counter() - started:.0f} s")
    print("| configuration | median step ms | over #0, per round | median ratio | range | rounds faster "
          "| x core share: median ratio | core share | cross-simulated: median (range) "
          "| F ms | I ms | W ms | B ms "
          "| planner / run F | I | W | B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for number, ((label, extra, recompute), done, ratio, busy_ratio) in enumerate(
            zip(configs, runs, ratios, busy, strict=True)):
        crossed = None if cross is None else cross[number]
        cross_text = "-" if crossed is None else (
            f"{statistics.median(crossed):.3f} ({min(crossed):.2f}-{max(crossed):.2f})")
        measured = {kind: _median([kind_costs(run["op_seconds"])[kind] for run in done]) for kind in _KINDS}
        priced: dict[str, float | None] = {kind: None for kind in _KINDS}
        if args.costs is not None:
            each = [_op_ratios(args.costs, run, recompute, args) for run in done]
            priced = {kind: _median([r[kind] for r in each]) for kind in _KINDS}
        step = statistics.median(s for run in done for s in run["steps_s"])
        middle = statistics.median(ratio)
        faster = sum(value < 1 for value in ratio)
        print(f"| {label} | {step * 1e3:.0f} | {'/'.join(f'{value:.2f}' for value in ratio)} | "
              f"{middle:.3f} | {min(ratio):.2f}-{max(ratio):.2f} | {faster}/{len(ratio)} | "
              f"{statistics.median(busy_ratio):.3f} | "
              f"{statistics.median(run['core_share'] for run in done):.2f} | {cross_text} | "
              + " | ".join(_cell(measured[kind], 1e3, 1) for kind in _KINDS) + " | "
              + " | ".join(_cell(priced[kind]) for kind in _KINDS) + " |")
        rows.append({"label": label, "train_args": shlex.join(extra), "step_s": step,
                     "rounds_s": [run["step_s"] for run in done], "ratios": ratio, "median_ratio": middle,
                     "rounds_faster": faster, "busy_ratios": busy_ratio, "cross_ratios": crossed,
                     "core_shares": [run["core_share"] for run in done],
                     "measured_kind_s": measured, "planner_per_run": priced,
                     "bubble": statistics.median(run["bubble"] for run in done)})
    print("\nover #0: each round's median kept step over the first configuration's in the same round; "
          "x core share: the same with each run's step times rank 0's share of a core (CPU over wall "
          "seconds); "
          "cross-simulated: the configuration's order simulated on each run's measured stage costs (every "
          "configuration's runs) over the first's on the same costs, so the host's speed cancels; "
          "F, I, W, B ms: the run's measured stage costs summed over the stages that ran the kind "
          "(median over rounds); planner / run: the plan's price of the same over the measured.")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
