"""Is `pipefold plan --profile` trusted before running? Its choice, the next alternatives it ranked
and `pipefold train`'s defaults, each trained with `pipefold train`, alternated in one run.

    .venv/bin/python benchmarks/planner.py                       # 2 ranks, top 5, 2 rounds of 20 steps
    .venv/bin/python benchmarks/planner.py --ranks 4 --rounds 3 --json /tmp/planner4.json
    .venv/bin/python benchmarks/planner.py --ranks 4 --top 0 --rounds 3 --steps 30   # defaults only

1. `pipefold plan --profile --ranks R --cores C --top K --json` (the default model and batch of
   `pipefold train`) measures the layers here and ranks the configurations.
2. Each of its K ranked candidates (a searched order is written to a schedule file and run with
   `--schedule-file`), plus `pipefold train`'s default (partition "flops") and the former default
   (`--partition uniform`), runs `pipefold train --steps S` in turn, once per round.
3. Per configuration: the median step time over the rounds (each round's median of steps after
   the first `--warmup`), tokens per second from it, and the median measured bubble.

Reported: the forecast error of the choice (target: within 10%), and how far the choice is from
the best measured (target: within 5%). Beside them, per configuration, what depends less on
the host's other load: the forecast against the run's own prediction (from the stage costs
it measured), the last steps' makespan against their wall time, and rank 0's core share (its
CPU seconds over wall seconds per step) with the measured step times that share (the step
as it would run with the core to itself, where the rank computes or polls the whole step).
A benchmark, not a test: timings depend on the machine
and its load (every rank and the planner share the host's cores).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable

from pipefold.job.sections import ModelConfig  # noqa: E402
from pipefold.plan.space import is_asynchronous  # noqa: E402


def _plan(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    command = [PYTHON, "-m", "pipefold", "plan", "--profile", "--ranks", str(args.ranks), "--cores",
               str(args.cores), "--top", str(args.top), "--batch-size", str(args.batch_size), "--json",
               "--device", args.device, "--save-costs", str(work / "costs.json")]
    print("$", shlex.join(command[1:]), file=sys.stderr)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _candidate_args(entry: dict[str, Any], index: int, work: Path) -> list[str]:
    """`pipefold train` flags that run one ranked candidate as the planner priced it."""
    kwargs = entry["pipeline_kwargs"]
    if entry.get("order"):
        path = work / f"order{index}.json"
        path.write_text(json.dumps(entry["order"]))
        words = ["--schedule-file", str(path)]
    else:
        words = ["--schedule", entry["schedule"], "--ranks", str(entry["num_ranks"]),
                 "--microbatches", str(entry["num_microbatches"]), "--virtual", str(entry["num_virtual"])]
    words += ["--partition", ",".join(map(str, kwargs["partition"]))]
    if entry["recompute"]:
        words += ["--set", "recompute=[" + ",".join(map(str, entry["recompute"])) + "]"]
    if not entry.get("order") and is_asynchronous(entry["schedule"]):  # train refuses a tied head
        words += ["--set", "model.tie_embeddings=false"]
    return words


def _label(entry: dict[str, Any]) -> str:
    name = "searched order" if entry.get("order") else entry["schedule"]
    recompute = f" recompute {entry['recompute']}" if entry["recompute"] else ""
    return (f"{name} v={entry['num_virtual']} m={entry['num_microbatches']} "
            f"partition {entry['pipeline_kwargs']['partition']}{recompute}")


def _train(extra: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    command = [PYTHON, "-m", "pipefold", "train", "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--out", str(out), "--device", args.device, "--set", "sample_tokens=0",
               "--set", "eval_every=0", "--precision", "fp32", *extra]  # the profile measures fp32
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    steps = summary["step_seconds"][args.warmup:]
    bubbles = summary["bubble_fraction"][args.warmup:]
    timing = summary["step_time"]
    cpu = summary["step_cpu_seconds"][args.warmup:]
    return {"step_s": statistics.median(steps), "bubble": statistics.median(bubbles),
            "schedule": summary["config"]["schedule"],
            "partition": summary["partition"], "predicted_wall": timing["predicted_wall"],
            # The last steps' wall against the last step's pipeline makespan: how much of the step
            # lies outside the schedule's actions (a ratio, so it depends less on the host's load).
            "makespan_per_wall": timing["measured_makespan_last"] / timing["measured_wall_median_recent"],
            "predicted_per_wall": timing["predicted_wall"] / timing["measured_wall_median_recent"],
            # Rank 0's CPU seconds over its wall seconds per step: the share of a core it got.
            "core_share": statistics.median(c / w for c, w in zip(cpu, steps, strict=True))}


def _forecast(costs_path: Path, run: dict[str, Any], args: argparse.Namespace) -> float | None:
    """The planner's step time for a family configuration `pipefold train` ran (the defaults,
    --extra), from the costs the plan measured; None for a schedule file (a searched order)."""
    from pipefold.plan import ModelCosts
    from pipefold.plan.evaluate import evaluate
    from pipefold.plan.space import Config
    from pipefold.schedule.registry import family
    from pipefold.simulate import Link

    schedule = run["schedule"]
    if schedule.get("file") or schedule["name"] in ("auto", "auto-v"):
        return None
    stages = [part.split(":") for part in run["partition"].strip("[]").split("|")]
    bounds = tuple(int(start) for start, _ in stages) + (int(stages[-1][1]),)
    m = int(schedule["num_microbatches"])
    virtual = int(schedule["virtual"] or family(schedule["name"]).default_virtual)
    config = Config(schedule["name"], virtual, m, -(-args.batch_size // m))
    costs = ModelCosts.from_json(costs_path)
    candidate = evaluate(costs, config, args.ranks, bounds, (), Link(), num_cores=float(args.cores))
    return float(candidate.step_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="cores the ranks share (pipefold plan --cores)")
    parser.add_argument("--top", type=int, default=5, help="ranked candidates to train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the profile and the runs compute (default cpu)")
    parser.add_argument("--extra", action="append", default=[], metavar="TRAIN_ARGS",
                        help="also train this configuration (pipefold train flags in one string; repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pipefold-planner-"))
    plan = _plan(args, work) if args.top > 0 else {"top": []}
    configs: list[tuple[str, list[str], float | None]] = []
    for index, entry in enumerate(plan["top"][: args.top]):
        label = ("choice: " if index == 0 else f"#{index + 1}: ") + _label(entry)
        configs.append((label, _candidate_args(entry, index, work), float(entry["step_time"])))
    default = ["--ranks", str(args.ranks)]
    configs.append(("default (1f1b m=8, partition flops)", default, None))
    configs.append(("former default (1f1b m=8, partition uniform)", [*default, "--partition", "uniform"], None))
    for extra in args.extra:
        configs.append((f"extra: {extra}", shlex.split(extra), None))

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
    for round_index in range(args.rounds):
        for number, (label, extra, _) in enumerate(configs):
            result = _train(extra, args, work / f"r{round_index}c{number}")
            runs[label].append(result)
            print(f"round {round_index + 1} {label}: step {result['step_s'] * 1e3:.0f} ms, "
                  f"bubble {result['bubble']:.0%}", file=sys.stderr)

    tokens = args.batch_size * ModelConfig().seq_len
    rows = []
    for label, extra, forecast in configs:
        if forecast is None and (work / "costs.json").exists():
            forecast = _forecast(work / "costs.json", runs[label][0], args)
        step = statistics.median(r["step_s"] for r in runs[label])
        rows.append({
            "label": label, "train_args": shlex.join(extra), "forecast_s": forecast, "measured_s": step,
            "tokens_per_s": tokens / step, "bubble": statistics.median(r["bubble"] for r in runs[label]),
            "partition": runs[label][0]["partition"], "rounds_s": [r["step_s"] for r in runs[label]],
            "in_run_predicted_s": statistics.median(r["predicted_wall"] for r in runs[label]),
            "in_run_predicted_per_wall": statistics.median(r["predicted_per_wall"] for r in runs[label]),
            "makespan_per_wall": statistics.median(r["makespan_per_wall"] for r in runs[label]),
            "core_share": statistics.median(r["core_share"] for r in runs[label]),
            "measured_x_share_s": statistics.median(r["step_s"] * r["core_share"] for r in runs[label]),
        })
    best = min(row["measured_s"] for row in rows)
    print("| configuration | forecast ms | measured ms (rounds) | tokens/s | bubble | vs best "
          "| in-run predicted ms | forecast / in-run | in-run / wall | makespan / wall | core share "
          "| measured x share ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        forecast_text = f"{row['forecast_s'] * 1e3:.0f}" if row["forecast_s"] is not None else "-"
        rounds = ", ".join(f"{s * 1e3:.0f}" for s in row["rounds_s"])
        print(f"| {row['label']} | {forecast_text} | {row['measured_s'] * 1e3:.0f} ({rounds}) | "
              f"{row['tokens_per_s']:,.0f} | {row['bubble']:.0%} | {row['measured_s'] / best - 1:+.1%} | "
              f"{row['in_run_predicted_s'] * 1e3:.0f} | "
              + ("-" if row["forecast_s"] is None else f"{row['forecast_s'] / row['in_run_predicted_s']:.2f}")
              + f" | {row['in_run_predicted_per_wall']:.2f} | {row['makespan_per_wall']:.2f} | "
              f"{row['core_share']:.2f} | {row['measured_x_share_s'] * 1e3:.0f} |")
    error = None
    if args.top > 0:  # --top 0: the defaults alone (the default partition against uniform)
        choice = rows[0]
        error = (choice["forecast_s"] - choice["measured_s"]) / choice["measured_s"]
        print(f"\nchoice forecast error: {error:+.1%} (target within 10%); choice vs best measured: "
              f"{choice['measured_s'] / best - 1:+.1%} (target within 5%); choice forecast / in-run "
              f"prediction: {choice['forecast_s'] / choice['in_run_predicted_s']:.2f}; against the measured "
              f"step x the core share rank 0 got: "
              f"{choice['forecast_s'] / choice['measured_x_share_s'] - 1:+.1%}")
    if args.json is not None:
        args.json.write_text(json.dumps({"ranks": args.ranks, "steps": args.steps, "rounds": args.rounds,
                                         "rows": rows, "forecast_error": error}, indent=1))


if __name__ == "__main__":
    main()
