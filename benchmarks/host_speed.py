"""Does this host run faster after idling than under sustained load? The question behind
`plan --profile`'s forecast: its calibration run prices the host of its own minute.

    .venv/bin/python benchmarks/host_speed.py                     # 60 s idle, then 4 runs of 30 steps
    .venv/bin/python benchmarks/host_speed.py --idle 120 --runs 6 --json /tmp/host_speed.json

1. Sleeps `--idle` seconds (nothing of ours runs; the load average before and after is said).
2. Runs `pipefold train` at the calibration run's configuration (the defaults on `--ranks`, fp32,
   the flags and kept steps of `benchmarks/planner.py`'s rounds) `--runs` times back to back,
   `--steps` steps each.
3. Per run: the median kept step, the medians of its first and last third of kept steps (a run
   that slows as the host heats or its credit drains reads last > first), CPU seconds per step
   (rank 0) and the seconds since the idle ended. Then the first run over the later runs' median:
   above 1 the host ran slower after idling, below 1 faster (a burst the calibration run, right
   after a pause, would price and the runs after it would not get).

`--against-calibration N` asks instead whether `plan --profile`'s calibration run measures the
defaults as `pipefold train` does: N alternated pairs (ABBA: pair i runs the calibration first
where i is even, train first where odd, so "right after the other" meets both alike), each the
calibration run exactly as `pipefold plan --profile --ranks R` starts it
(`pipefold.cli.plan_calibrate.calibration_command`: its sizes and zb-h1 in one launch) and
`pipefold train --steps S` at the same configuration (the rounds' flags and kept steps). Per
pair: the calibration's measured step (its first size's kept steps, as the plan reads it), its
first block against its later blocks, train's median kept step, and their ratio; then the
median ratio and its spread over the pairs (below 1: the calibration measures faster).

    .venv/bin/python benchmarks/host_speed.py --against-calibration 12 --steps 8 --idle 0

`--after-plan N` asks whether the first `pipefold train` after a `plan --profile` is the slow
one (`benchmarks/planner.py`'s pairs read the choice trained right after the plan 1-8% slower
than the same choice trained again after the defaults): N rounds, each with two preludes in
turn (ABBA over the rounds), the calibration run exactly as `plan --profile` starts it (what
takes nearly all of a plan's time) and idling for as long as it took; after each prelude
`--runs` back-to-back launches of `pipefold train` (the defaults, or `--train-args`, e.g. a
planned choice's `--schedule-file F --partition 3,1,1,3`). Per round and prelude: the first
launch's median step over the later launches' mean. Above 1 after the calibration and not
after idling: the plan slows the run after it.

    .venv/bin/python benchmarks/host_speed.py --after-plan 3 --runs 3 --steps 10 --idle 0

A benchmark, not a test: other work on the host moves every number; repeat it and compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.planner import _train  # noqa: E402


def thirds(steps: list[float]) -> tuple[float, float]:
    """The medians of the first and the last third of `steps` (at least one step each)."""
    size = max(1, len(steps) // 3)
    return statistics.median(steps[:size]), statistics.median(steps[-size:])


def after_idle_ratio(medians: list[float]) -> float | None:
    """The first run's median step over the median of the later runs' medians (None with one run):
    below 1, the host ran faster right after idling than under the sustained load after it."""
    if len(medians) < 2:
        return None
    return medians[0] / statistics.median(medians[1:])


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


QUIET_SHARE = 0.9
"""`--against-calibration`'s quiet pairs: rank 0 had at least this share of a core on both sides."""


def calibration_first(pair_index: int) -> bool:
    """ABBA order of `--against-calibration`: even pairs run the calibration first, odd ones train."""
    return pair_index % 2 == 0


def _calibration(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The calibration run as `pipefold plan --profile --ranks R` starts it; its first size's steps."""
    import subprocess

    from benchmarks.planner import calibration_blocks
    from pipefold.cli.main import build_parser
    from pipefold.cli.plan_calibrate import DEFAULT_STEPS, calibration_command
    from pipefold.job.calibration import WARMUP_STEPS, blocks

    plan_args = build_parser().parse_args(["plan", "--profile", "--ranks", str(args.ranks), "--batch-size",
                                           str(args.batch_size), "--device", args.device])
    work.mkdir(parents=True)
    command = calibration_command(plan_args, args.ranks, DEFAULT_STEPS, work, hf=False)
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads((work / "calibration.json").read_text())
    first = result["phases"][0]
    sizes = blocks(DEFAULT_STEPS, len(result["phases"]))
    split = calibration_blocks(first["step_seconds"], sizes, WARMUP_STEPS)
    shares = [cpu / wall for cpu, wall in zip(first["kept_step_cpu_seconds"], first["kept_step_seconds"],
                                              strict=True) if wall > 0]
    return {"step_s": statistics.median(first["kept_step_seconds"]), "steps_s": first["step_seconds"],
            "core_share": statistics.median(shares),
            "first_block_s": None if split is None else split[0],
            "later_blocks_s": None if split is None else split[1]}


def _against_calibration(args: argparse.Namespace, work: Path) -> None:
    pairs: list[dict[str, Any]] = []
    for index in range(args.against_calibration):
        order = ("calibration", "train") if calibration_first(index) else ("train", "calibration")
        pair: dict[str, Any] = {"order": order, "load_before": _load()}
        for side in order:
            folder = work / f"pair{index}-{side}"
            pair[side] = (_calibration(args, folder) if side == "calibration"
                          else _train(["--ranks", str(args.ranks)], args, folder))
        pair["load_after"] = _load()
        pair["ratio"] = pair["calibration"]["step_s"] / pair["train"]["step_s"]
        pairs.append(pair)
        cal = pair["calibration"]
        print(f"pair {index + 1} ({' then '.join(order)}): calibration {cal['step_s'] * 1e3:.1f} ms, train "
              f"{pair['train']['step_s'] * 1e3:.1f} ms, ratio {pair['ratio']:.3f}; "
              f"load {pair['load_before']} "
              f"-> {pair['load_after']}", file=sys.stderr)
    print(f"{len(pairs)} alternated pairs (ABBA): the calibration run as `plan --profile --ranks "
          f"{args.ranks}` starts it, and `pipefold train --steps {args.steps}` ({args.warmup} left out) "
          "at its configuration")
    print("| pair | first | calibration ms | its first block ms | its later blocks ms | train ms "
          "| calibration / train | core share: calibration, train | load average before -> after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for number, pair in enumerate(pairs, start=1):
        cal = pair["calibration"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.1f}"

        print(f"| {number} | {pair['order'][0]} | {ms(cal['step_s'])} | {ms(cal['first_block_s'])} | "
              f"{ms(cal['later_blocks_s'])} | {ms(pair['train']['step_s'])} | {pair['ratio']:.3f} | "
              f"{cal['core_share']:.2f}, {pair['train']['core_share']:.2f} | "
              f"{pair['load_before']} -> {pair['load_after']} |")
    ratios = sorted(pair["ratio"] for pair in pairs)
    if ratios:
        low, high = ratio_quartiles(ratios)
        print(f"calibration / train: median {statistics.median(ratios):.3f} (quartiles {low:.3f}-{high:.3f}, "
              f"from {ratios[0]:.3f} to {ratios[-1]:.3f}); {sum(r < 1 for r in ratios)} of {len(ratios)} "
              "below 1")
        quiet = quiet_ratios(pairs)
        if quiet:
            print(f"pairs where rank 0 had at least {QUIET_SHARE:.0%} of a core on both sides: {len(quiet)}, "
                  f"calibration / train median {statistics.median(quiet):.3f} (from {quiet[0]:.3f} to "
                  f"{quiet[-1]:.3f}); {sum(r < 1 for r in quiet)} below 1")
    if args.json is not None:
        args.json.write_text(json.dumps({"against_calibration": pairs, "steps": args.steps,
                                         "warmup": args.warmup}, indent=1))


def _after_plan(args: argparse.Namespace, work: Path) -> None:
    extra = ["--ranks", str(args.ranks), *args.train_args.split()]
    seconds = 0.0
    rows: list[dict[str, Any]] = []
    for index in range(args.after_plan):
        preludes = ("calibration", "idle") if calibration_first(index) else ("idle", "calibration")
        for prelude in preludes:
            load = _load()
            if prelude == "calibration":
                began = time.perf_counter()
                _calibration(args, work / f"round{index}-calibration")
                seconds = time.perf_counter() - began
            else:
                time.sleep(seconds or 30.0)  # as long as the last calibration took (30 s before any)
            steps = [_train(extra, args, work / f"round{index}-{prelude}-{run}")["step_s"]
                     for run in range(args.runs)]
            ratio = steps[0] / statistics.fmean(steps[1:])
            rows.append({"round": index + 1, "prelude": prelude, "steps_s": steps, "first_over_later": ratio,
                         "load_before": load})
            print(f"round {index + 1} after {prelude}: {' '.join(f'{s * 1e3:.0f}' for s in steps)} ms, "
                  f"first / later {ratio:.3f}; load {load}", file=sys.stderr)
    print(f"{args.after_plan} rounds (ABBA) of a prelude then {args.runs} launches of `pipefold train "
          f"--steps {args.steps}` ({args.warmup} left out) {' '.join(extra)}")
    print("| round | prelude | median step per launch ms | first / later | load average before |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['prelude']} | "
              f"{' / '.join(f'{s * 1e3:.0f}' for s in row['steps_s'])} | "
              f"{row['first_over_later']:.3f} | {row['load_before']} |")
    for prelude in ("calibration", "idle"):
        ratios = [row["first_over_later"] for row in rows if row["prelude"] == prelude]
        print(f"after {prelude}: first / later launches mean {statistics.fmean(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)})")
    if args.json is not None:
        args.json.write_text(json.dumps({"after_plan": rows, "steps": args.steps, "warmup": args.warmup},
                                        indent=1))


def quiet_ratios(pairs: list[dict[str, Any]], share: float = QUIET_SHARE) -> list[float]:
    """The calibration / train ratios of the pairs where rank 0 had at least `share` of a core on
    both sides, sorted: a pair where either side shared its core with other work on the host
    compares that work's timing, not the two programs."""
    return sorted(pair["ratio"] for pair in pairs
                  if min(pair["calibration"]["core_share"], pair["train"]["core_share"]) >= share)


def ratio_quartiles(ratios: list[float]) -> tuple[float, float]:
    """The first and third quartile of `ratios` (both the one value where there is one)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    first, _, third = statistics.quantiles(ratios, n=4)
    return first, third


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idling first (default 60)")
    parser.add_argument("--runs", type=int, default=4, help="back-to-back runs after it (default 4)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default 2)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--against-calibration", type=int, default=0, metavar="N",
                        help="instead: N alternated pairs of plan --profile's calibration run and "
                        "pipefold train "
                        "at its configuration (default 0: none)")
    parser.add_argument("--after-plan", type=int, default=0, metavar="N",
                        help="instead: N rounds of the calibration run or as long idle, each followed by "
                        "--runs launches of pipefold train (default 0: none)")
    parser.add_argument("--train-args", default="", help="with --after-plan: train flags beyond --ranks "
                        "(default: the defaults)")
    args = parser.parse_args()
    if args.steps <= args.warmup + 2:
        parser.error(f"--steps {args.steps}: give more than --warmup + 2 = {args.warmup + 2}")

    work = Path(tempfile.mkdtemp(prefix="pipefold-host-speed-"))
    if args.after_plan:
        if args.runs < 2:
            parser.error(
                f"--runs {args.runs}: --after-plan compares the first launch with later ones; give 2 or more"
            )
        if args.idle:
            print(f"idling {args.idle:.0f} s (load average {_load()})", file=sys.stderr)
            time.sleep(args.idle)
        _after_plan(args, work)
        return
    if args.against_calibration:
        if args.idle:
            print(f"idling {args.idle:.0f} s (load average {_load()})", file=sys.stderr)
            time.sleep(args.idle)
        _against_calibration(args, work)
        return
    print(f"idling {args.idle:.0f} s (load average {_load()})", file=sys.stderr)
    time.sleep(args.idle)
    print(f"idle done (load average {_load()})", file=sys.stderr)
    resumed = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for index in range(args.runs):
        began = time.perf_counter() - resumed
        result = _train(["--ranks", str(args.ranks)], args, work / f"run{index}")
        first, last = thirds(result["steps_s"])
        runs.append({"began_s": began, "median_s": result["step_s"], "first_third_s": first,
                     "last_third_s": last, "core_share": result["core_share"], "load": _load(),
                     "steps_s": result["steps_s"]})
        print(f"run {index + 1}: {result['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    print(f"{args.runs} back-to-back runs of {args.steps} steps ({args.warmup} left out per run) after "
          f"{args.idle:.0f} s idle:")
    print("| run | began s after the idle | median step ms | first third ms | last third ms | core share "
          "| load average after |")
    print("|---|---|---|---|---|---|---|")
    for index, run in enumerate(runs, start=1):
        print(f"| {index} | {run['began_s']:.0f} | {run['median_s'] * 1e3:.0f} | "
              f"{run['first_third_s'] * 1e3:.0f} | {run['last_third_s'] * 1e3:.0f} | "
              f"{run['core_share']:.2f} | {run['load']} |")
    ratio = after_idle_ratio([run["median_s"] for run in runs])
    if ratio is not None:
        print(f"first run after the idle over the later runs: {ratio:.2f} (below 1: faster after idling)")
    if args.json is not None:
        args.json.write_text(json.dumps({"idle_s": args.idle, "steps": args.steps, "warmup": args.warmup,
                                         "runs": runs, "after_idle_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
