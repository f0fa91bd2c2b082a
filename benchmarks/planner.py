"""Is `pipefold plan --profile` trusted before running? Its choice, the next alternatives it ranked
and `pipefold train`'s defaults, each trained with `pipefold train`, alternated in one run.

    .venv/bin/python benchmarks/planner.py                       # 2 ranks, top 5, 4 rounds of 8 steps
    .venv/bin/python benchmarks/planner.py --ranks 4 --rounds 3 --json /tmp/planner4.json
    .venv/bin/python benchmarks/planner.py --ranks 4 --top 0 --rounds 6   # defaults only
    .venv/bin/python benchmarks/planner.py --rounds 1 --steps 6  # a quick check that it runs
    .venv/bin/python benchmarks/planner.py --rounds 0 --pairs 4  # adjacent pairs alone (about 50 s each)

1. `pipefold plan --profile --ranks R --cores C --top K --json` (the default model and batch of
   `pipefold train`) measures the layers here and ranks the configurations.
2. Each of its K ranked candidates (a searched order is written to a schedule file and run with
   `--schedule-file`), plus `pipefold train`'s default (partition "flops") and the former default
   (`--partition uniform`), runs `pipefold train --steps S` in turn, once per round: many short
   runs, alternated, because the step time moves more between runs of one configuration (10-20%
   on a quiet host) than between the steps of one run (a few %), and a change of load then
   hits every configuration alike.
3. Per configuration: the median of every step after the first `--warmup` of each run, over all
   rounds; its spread (the lowest and highest round's median, as +/- % of that median); tokens
   per second from it; the median measured bubble.

4. `--pairs N` adjacent pairs (default 3), pair i right after round i: a fresh
   `plan --profile` (its calibration run included), then its choice trained at once with the
   same flags and kept steps as the rounds, then the defaults (the calibration's configuration:
   its calibration step over train's, no pricing between): the forecast against a measurement
   of the same minute of the host, where the rounds meet it minutes after the calibration (a
   host whose speed moves between the two reads as a forecast error there, not here); then the
   choice again (is the first run after a plan the slow one?). Each pair's forecast error is
   printed as the product of the calibration / train ratio of the defaults (two launches of one
   configuration) and the choice's forecast relative to the defaults' over measured (the
   pricing, the launch taken out: `pair_parts`). `--idle S` sleeps
   before the first plan: its calibration then follows an idle host, the pairs' the rounds'
   load, and the calibration runs' own step of the defaults, printed side by side, says whether
   this host runs faster after idling.

Reported: the forecast error of the choice (target: within 10%), and how far the choice is from
the best measured (target: within 5%), with whether the rounds resolve that difference (the
two configurations' round medians do not overlap). Beside them, per configuration, what depends
less on the host's other load: the forecast against the run's own prediction (from the stage
costs it measured), per action kind the planner's stage costs against those the run measured
(F, I, W, B: the sum over the stages that ran that kind, planner / run), the last steps'
makespan against their wall time, rank 0's core share (its CPU seconds over wall seconds), and
the time a rank spends between two actions after one whose output it sent to another rank
against after the others (what a send costs its sender: the calibration prices the latter as
the runtime's time per action and the difference as a send's occupancy). After the
table, the adjacent pairs: each pair's forecast error and their median.
A benchmark, not a test: timings depend on the machine and its load (every rank and the planner
share the host's cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable

from pipefold.job.sections import ModelConfig  # noqa: E402
from pipefold.plan.space import is_asynchronous  # noqa: E402

_KINDS = ("F", "I", "W", "B")


def _bounds(partition: str) -> tuple[int, ...]:
    """Stage bounds from summary.json's partition text ("[0:3 | 3:4 | 4:8]")."""
    stages = [part.split(":") for part in partition.strip("[]").split("|")]
    return tuple(int(start) for start, _ in stages) + (int(stages[-1][1]),)


def _run_schedule(run: dict[str, Any], schedule_file: Path | None, args: argparse.Namespace) -> Any:
    """The schedule a run ran: a searched order's file, else its family's."""
    from pipefold.schedule.io import load
    from pipefold.schedule.registry import build

    if schedule_file is not None:
        return load(schedule_file)
    return build(run["schedule"]["name"], num_ranks=args.ranks, num_microbatches=int(run["num_microbatches"]),
                 num_virtual=run["schedule"]["virtual"] or None)


def _held(model: Any, costs: Any, run: dict[str, Any], schedule_file: Path | None,
          args: argparse.Namespace, bounds: tuple[int, ...]) -> Any:
    """`model` with each rank slowed by the activations and I states it holds in the run's
    schedule, as the plan prices it (`pipefold.plan.held_cost`, `held_states`; each W away from
    its own I, `deferred_weight`); `model` itself where the costs price none."""
    from pipefold.plan.deferred_weight import stage_deferred_shares
    from pipefold.plan.held_cost import prices_held, with_held_cost
    from pipefold.plan.held_states import stage_state_weights
    from pipefold.simulate import simulate

    if not prices_held(costs):
        return model
    schedule = _run_schedule(run, schedule_file, args)
    peaks = simulate(schedule, model).activation_bytes_peak
    states = stage_state_weights(schedule) if costs.held_state_forward > 0 else ()
    late = stage_deferred_shares(schedule) if costs.deferred_weight_grad > 0 else ()
    return with_held_cost(model, costs, schedule.placement, peaks, bounds, states, late)


def _op_ratios(costs_path: Path, run: dict[str, Any], recompute: tuple[int, ...],
               args: argparse.Namespace, schedule_file: Path | None = None) -> dict[str, float | None]:
    """Per action kind: the planner's stage costs for this configuration (from the costs its plan
    measured, each rank slowed by the activations it holds where they price it) over the run's
    own, summed over the stages that ran that kind; None where none did."""
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import first_stage_backward
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import Link

    costs = ModelCosts.from_json(costs_path)
    bounds = _bounds(run["partition"])
    rows = -(-args.batch_size // int(run["num_microbatches"]))
    layout = StageLayout(bounds, rows)
    model = first_stage_backward(stage_cost_model(costs, layout, recompute, Link(), float(args.cores)),
                                 costs, bounds)
    model = _held(model, costs, run, schedule_file, args, bounds)
    ratios: dict[str, float | None] = {}
    for kind in _KINDS:
        planned = getattr(model, kind.lower())
        pairs = [(planned[stage], seconds) for stage, seconds in enumerate(run["op_seconds"][kind])
                 if not math.isnan(seconds)]
        measured = sum(seconds for _, seconds in pairs)
        ratios[kind] = sum(p for p, _ in pairs) / measured if pairs and measured > 0 else None
    return ratios


def _fitted(calibration: dict[str, Any]) -> str:
    """The calibration's lines over rows, where it measured several sizes, and its split backward."""
    shares = calibration.get("weight_share") or []
    block = calibration.get("split_schedule") or "zb-h1"  # the split block's order (zb-h1 before 1f1b+split)
    # The split's share of the stage's backward work (calibrations before it: none, seconds alone).
    share = calibration.get("split_backward_share", 0.0)
    split = (f"; {block}: W {'/'.join(f'{x:.2f}' for x in shares)} of the backward per stage, I and W "
             f"{share:.1%} of the stage's backward + {calibration['split_overhead_s'] * 1e6:.0f} us each "
             "beyond B"
             if shares else "")
    if calibration.get("mean_gap_s"):  # the send priced apart (calibrations before it: not)
        split += (f"; runtime {calibration['action_overhead_s'] * 1e6:.0f} us per action and a send "
                  f"{calibration['send_overhead_s'] * 1e6:.0f} us + "
                  f"{calibration['send_s_per_byte'] * 2**20 * 1e6:.0f} us per MiB (the mean gap "
                  f"{calibration['mean_gap_s'] * 1e6:.0f} us)")
    if not calibration.get("fixed_s"):
        return split

    def ms(key: str) -> str:
        return "/".join(f"{x * 1e3:.2f}" for x in calibration[key])

    return (f"; at {'/'.join(map(str, calibration['measured_rows']))} rows per micro-batch, per stage F "
            f"{ms('fixed_s')} ms + {ms('forward_s_per_row')} ms per row, B + {ms('backward_s_per_row')} "
            f"ms per row, largest miss {calibration['fit_error']:.0%}{split}")


def _plan(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    command = [PYTHON, "-m", "pipefold", "plan", "--profile", "--ranks", str(args.ranks), "--cores",
               str(args.cores), "--top", str(args.top), "--batch-size", str(args.batch_size), "--json",
               "--device", args.device, "--save-costs", str(work / "costs.json")]
    if args.calibrate_steps is not None:
        command += ["--calibrate-steps", str(args.calibrate_steps)]
    print("$", shlex.join(command[1:]), file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    (work / "plan.json").write_text(done.stdout)  # for benchmarks/order_pair.py --plan
    result["plan_seconds"] = time.perf_counter() - started
    calibration = result.get("calibration")
    if calibration is not None:  # the one-process profile's own prices, for the columns beside
        (work / "profile_costs.json").write_text(json.dumps(calibration.pop("profile_costs")))
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


def _op_seconds(out: Path) -> dict[str, list[float]]:
    """The run's own stage costs per action kind (its `costs.json`), each kind only on the stages
    whose last step ran it (a whole-backward stage has no I or W, a split one no B)."""
    measured = json.loads((out / "costs.json").read_text())
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    ran = {(event["cat"], event["args"]["stage"]) for event in trace
           if event.get("ph") == "X" and event.get("cat") in ("F", "B", "I", "W")}
    return {kind: [seconds if (kind, stage) in ran else math.nan
                   for stage, seconds in enumerate(measured[kind.lower()])] for kind in _KINDS}


def _gaps(out: Path) -> tuple[float | None, float | None]:
    """From the run's last step (`trace.json`): the median time a rank spent between an action
    and its next, less its waits, after an action whose output it sent to another rank, and
    after the others (an output kept on the rank, or a W that sends nothing): what a send costs
    its sender (the calibration fits both from its own blocks: `pipefold.plan.send_fit`)."""
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    actions = [e for e in trace if e.get("ph") == "X" and e.get("tid") == 0 and e.get("cat") in _KINDS]
    waits = [e for e in trace if e.get("ph") == "X" and e.get("tid") == 1]
    rank_of = {e["args"]["stage"]: e["pid"] for e in actions}
    sent: list[float] = []
    kept: list[float] = []
    for rank in set(rank_of.values()):
        row = sorted((e for e in actions if e["pid"] == rank), key=lambda e: e["ts"])
        own_waits = [w for w in waits if w["pid"] == rank]
        for before, after in zip(row, row[1:], strict=False):
            end = before["ts"] + before["dur"]
            waited = sum(max(0.0, min(after["ts"], w["ts"] + w["dur"]) - max(end, w["ts"]))
                         for w in own_waits)
            stage = before["args"]["stage"]
            to = stage + 1 if before["cat"] == "F" else stage - 1 if before["cat"] in ("B", "I") else None
            crosses = to is not None and to in rank_of and rank_of[to] != rank
            (sent if crosses else kept).append((after["ts"] - end - waited) * 1e-6)  # trace times are us
    return (statistics.median(sent) if sent else None, statistics.median(kept) if kept else None)


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
    return {"step_s": statistics.median(steps), "steps_s": steps, "bubble": statistics.median(bubbles),
            "op_seconds": _op_seconds(out), "gaps_s": _gaps(out),
            "num_microbatches": summary["config"]["schedule"]["num_microbatches"],
            "schedule": summary["config"]["schedule"],
            "partition": summary["partition"], "predicted_wall": timing["predicted_wall"],
            # The last steps' wall against the last step's pipeline makespan: how much of the step
            # lies outside the schedule's actions (a ratio, so it depends less on the host's load).
            "makespan_per_wall": timing["measured_makespan_last"] / timing["measured_wall_median_recent"],
            "predicted_per_wall": timing["predicted_wall"] / timing["measured_wall_median_recent"],
            # Rank 0's CPU seconds over its wall seconds per step: the share of a core it got.
            "core_share": statistics.median(c / w for c, w in zip(cpu, steps, strict=True))}


def _forecast(
    costs_path: Path, run: dict[str, Any], args: argparse.Namespace, latency: float
) -> float | None:
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
    bounds = _bounds(run["partition"])
    m = int(schedule["num_microbatches"])
    virtual = int(schedule["virtual"] or family(schedule["name"]).default_virtual)
    config = Config(schedule["name"], virtual, m, -(-args.batch_size // m))
    costs = ModelCosts.from_json(costs_path)
    candidate = evaluate(costs, config, args.ranks, bounds, (), Link(latency=latency),
                         num_cores=float(args.cores))
    return float(candidate.step_time)


def _priced(costs_path: Path, run: dict[str, Any], schedule_file: Path | None, recompute: tuple[int, ...],
            args: argparse.Namespace, latency: float) -> float:
    """The planner's step time (makespan + the tied gradient's exchange + update) for what a run
    ran, its schedule (a family's, or a searched order's file) simulated on the stage costs of
    `costs_path`."""
    from pipefold.plan import ModelCosts
    from pipefold.plan.calibrate import first_stage_backward, update_time
    from pipefold.plan.memory import static_weight_bytes
    from pipefold.plan.stages import StageLayout, stage_cost_model
    from pipefold.simulate import Link, simulate
    from pipefold.simulate.engine import step_end_time

    costs = ModelCosts.from_json(costs_path)
    bounds = _bounds(run["partition"])
    m = int(run["num_microbatches"])
    schedule = _run_schedule(run, schedule_file, args)
    layout = StageLayout(bounds, -(-args.batch_size // m))
    model = first_stage_backward(
        stage_cost_model(costs, layout, recompute, Link(latency=latency), float(args.cores)), costs, bounds)
    model = _held(model, costs, run, schedule_file, args, bounds)  # each rank slowed by what it holds
    update = update_time(costs, static_weight_bytes(model, schedule.placement, schedule.num_ranks))
    return float(simulate(schedule, model).makespan + step_end_time(schedule, model) + update)


def _spread(rounds: list[float], middle: float) -> str:
    """The lowest and highest round's median against the pooled median: "-4%/+6%"."""
    return f"{min(rounds) / middle - 1:+.0%}/{max(rounds) / middle - 1:+.0%}"


def _median_of(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e6:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def relative_errors(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Each ranked configuration's forecast relative to the defaults' forecast, against its measured
    step relative to the defaults' measured in the same rounds, less one: the forecast's error with
    the host's speed of the moment taken out (the defaults are the calibration run's own
    configuration, so a host that runs every configuration 20% slower than during the calibration
    moves both ratios alike). Empty without a defaults row."""
    default = next((row for row in rows if row["label"].startswith("default (")), None)
    if default is None:
        return []
    return [(row["label"], (row["forecast_s"] / default["forecast_s"])
             / (row["measured_s"] / default["measured_s"]) - 1)
            for row in rows if not row["label"].startswith(("default (", "former default ("))]


def _print_relative(rows: list[dict[str, Any]]) -> None:
    for label, error in relative_errors(rows):
        print(f"forecast relative to the defaults' (host speed taken out), {label}: {error:+.1%}")


def pair_errors(pairs: list[dict[str, Any]]) -> tuple[list[float], float | None]:
    """Each adjacent pair's forecast error (its plan's forecast of its choice over the step that
    choice measured right after, less one) and their median; (empty, None) without pairs."""
    errors = [pair["forecast_s"] / pair["measured_s"] - 1 for pair in pairs]
    return errors, statistics.median(errors) if errors else None


def calibration_over_train(pairs: list[dict[str, Any]]) -> list[float]:
    """Per pair, the defaults' step in its calibration run over the same configuration's step in
    `pipefold train` right after (pairs whose plan ran no calibration left out)."""
    return [pair["calibration_step_s"] / pair["defaults_measured_s"] for pair in pairs
            if pair["calibration_step_s"] is not None]


def pair_parts(pair: dict[str, Any]) -> tuple[float, float] | None:
    """A pair's forecast over its measured step, as two factors whose product it is: the defaults'
    step in the pair's calibration run over train's right after (the same configuration measured
    by two launches: the launches' difference), and the plan's choice relative to the defaults,
    forecast over measured ((forecast / calibration's defaults) / (choice / defaults), both in
    the pair: the pricing's error with the launch taken out). None without a calibration."""
    calibration = pair["calibration_step_s"]
    if calibration is None:
        return None
    launches = calibration / pair["defaults_measured_s"]
    relative = (pair["forecast_s"] / calibration) / (pair["measured_s"] / pair["defaults_measured_s"])
    return launches, relative


def pairs_after_round(round_index: int, num_rounds: int, num_pairs: int) -> range:
    """The adjacent pairs run right after round `round_index`: pair i after round i, every pair
    beyond the rounds after the last."""
    end = num_pairs if round_index == num_rounds - 1 else min(round_index + 1, num_pairs)
    return range(min(round_index, end), end)


def calibration_blocks(steps_s: list[float], sizes: list[int], warmup: int) -> tuple[float, float] | None:
    """The calibration run's first size: the median kept step of its first block (the launch's
    first steps, before any switch of size) and of its later blocks (each after the run switched
    back from the other sizes); None with one block. `sizes`: steps per block
    (`pipefold.job.calibration.blocks`), `warmup`: the first block's steps left out (a later
    block leaves out its first)."""
    if len(sizes) < 2 or sum(sizes) != len(steps_s):
        return None
    first = steps_s[warmup:sizes[0]]
    later: list[float] = []
    start = sizes[0]
    for size in sizes[1:]:
        later += steps_s[start + 1:start + size]
        start += size
    return (statistics.median(first), statistics.median(later)) if first and later else None


def _blocks_text(calibration: dict[str, Any] | None) -> str:
    """The calibration's first block against its later blocks, for the log."""
    from pipefold.job.calibration import WARMUP_STEPS, blocks

    if not calibration or not calibration.get("step_seconds"):
        return ""
    sizes = blocks(int(calibration["steps"]), max(1, len(calibration.get("measured_rows") or [])))
    split = calibration_blocks(calibration["step_seconds"], sizes, WARMUP_STEPS)
    steps = "/".join(f"{x * 1e3:.0f}" for x in calibration["step_seconds"])
    return (f"; its first size's steps {steps} ms"
            + ("" if split is None else
               f" (first block {split[0] * 1e3:.0f}, later blocks {split[1] * 1e3:.0f} ms)"))


def _pair(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One adjacent pair: a fresh `plan --profile` (its calibration run included), then its choice
    trained at once, so the forecast meets a measurement of the same minute of the host."""
    work.mkdir(parents=True)
    plan = _plan(args, work)
    entry = plan["top"][0]
    run = _train(_candidate_args(entry, 0, work), args, work / "run")
    # Then the calibration's own configuration: the calibration run's step against train's, a
    # minute apart, with no pricing between them.
    defaults = _train(["--ranks", str(args.ranks)], args, work / "defaults")
    # The choice again, after the defaults: whether the first run after a plan is the slow one
    # (the pair's forecast error reads the first).
    again = _train(_candidate_args(entry, 0, work), args, work / "again")
    calibration = plan.get("calibration") or {}
    note = _blocks_text(calibration)
    print(f"pair {work.name}: {_label(entry)}: forecast {float(entry['step_time']) * 1e3:.0f} ms, "
          f"measured {run['step_s'] * 1e3:.0f} ms, again after the defaults "
          f"{again['step_s'] * 1e3:.0f} ms; "
          f"the defaults {defaults['step_s'] * 1e3:.0f} ms{note}", file=sys.stderr)
    return {"label": _label(entry), "forecast_s": float(entry["step_time"]), "measured_s": run["step_s"],
            "again_s": again["step_s"], "order": entry.get("order"),
            "steps_s": run["steps_s"], "calibration_step_s": calibration.get("measured_step_s"),
            "calibration_steps_s": calibration.get("step_seconds"), "defaults_measured_s": defaults["step_s"],
            "plan_seconds": plan["plan_seconds"], "calibration_note": note}


def _print_pairs(pairs: list[dict[str, Any]]) -> None:
    errors, middle = pair_errors(pairs)
    if middle is None:
        return
    print("\nAdjacent pairs (a fresh `plan --profile`, then its choice trained at once, then the defaults, "
          "then the choice again; the defaults' step in the pair's calibration run against train's right "
          "after; the forecast error as the product of that ratio and the choice's forecast relative to "
          "the defaults', over measured):")
    print("| pair | choice | forecast ms | measured ms | again ms | forecast error "
          "| defaults: calibration ms | defaults: train ms | calibration / train "
          "| relative forecast / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for number, (pair, error) in enumerate(zip(pairs, errors, strict=True), start=1):
        calibration = pair["calibration_step_s"]
        trained = pair["defaults_measured_s"]
        parts = pair_parts(pair)
        cells = ["-", f"{trained * 1e3:.0f}", "-", "-"] if calibration is None or parts is None else [
            f"{calibration * 1e3:.0f}", f"{trained * 1e3:.0f}", f"{parts[0]:.2f}", f"{parts[1]:.2f}"]
        again = pair.get("again_s")
        print(f"| {number} | {pair['label']} | {pair['forecast_s'] * 1e3:.0f} | "
              f"{pair['measured_s'] * 1e3:.0f} | {'-' if again is None else f'{again * 1e3:.0f}'} | "
              f"{error:+.1%} | {' | '.join(cells)} |")
    print(f"forecast error over {len(errors)} adjacent pairs: median {middle:+.1%} "
          f"(from {min(errors):+.1%} to {max(errors):+.1%}; target within 10%)")
    ratios = calibration_over_train(pairs)
    if ratios:
        print("the defaults' step, calibration run over train right after: median "
              f"{statistics.median(ratios):.2f} (from {min(ratios):.2f} to {max(ratios):.2f}; below 1 the "
              "calibration ran faster)")
    relative = [parts[1] for pair in pairs if (parts := pair_parts(pair)) is not None]
    if relative:
        print("the choice's forecast relative to the defaults', over measured in the pair: median "
              f"{statistics.median(relative):.2f} (from {min(relative):.2f} to {max(relative):.2f})")
    again = [pair["again_s"] / pair["measured_s"] for pair in pairs if pair.get("again_s")]
    if again:
        print("the choice again after the defaults over its first run right after the plan: median "
              f"{statistics.median(again):.2f} (from {min(again):.2f} to {max(again):.2f}; below 1 the run "
              "right after the plan was the slower)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="cores the ranks share (pipefold plan --cores)")
    parser.add_argument("--top", type=int, default=5, help="ranked candidates to train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default 2)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="runs of each configuration, alternated (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the profile and the runs compute (default cpu)")
    parser.add_argument("--extra", action="append", default=[], metavar="TRAIN_ARGS",
                        help="also train this configuration (pipefold train flags in one string; repeatable)")
    parser.add_argument("--calibrate-steps", type=int, metavar="N",
                        help="pipefold plan --calibrate-steps (default: plan's; 0: the one-process profile's "
                        "prices alone)")
    parser.add_argument("--pairs", type=int, metavar="N",
                        help="adjacent pairs: a fresh plan --profile, then its choice and the defaults "
                        "trained at once; pair i runs after round i, the rest after the last "
                        "(default 3, with --top 0 none; 0: none)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="sleep this long before the first plan, so its calibration run follows an idle "
                        "host and the pairs' follow the rounds' load (default 0)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--relative", type=Path, metavar="JSON",
                        help="print the forecast errors relative to the defaults' from an earlier --json, "
                        "and stop")
    args = parser.parse_args()
    if args.relative is not None:
        _print_relative(json.loads(args.relative.read_text())["rows"])
        return
    if args.pairs is None:  # --top 0 (the defaults alone) has no choice to pair
        args.pairs = 3 if args.top > 0 else 0
    if args.pairs < 0 or args.rounds < 0:
        parser.error("give --pairs and --rounds as 0 or more")
    if args.pairs and args.top < 1:
        parser.error("--pairs trains the plan's choice; give --top 1 or more, or --pairs 0")
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}; give more steps")

    work = Path(tempfile.mkdtemp(prefix="pipefold-planner-"))
    print(f"work folder {work} (plan.json, costs.json, the runs)", file=sys.stderr)
    started = time.perf_counter()
    if args.idle:
        print(f"idling {args.idle:.0f} s before the plan", file=sys.stderr)
        time.sleep(args.idle)
    pairs: list[dict[str, Any]] = []
    if args.rounds == 0:  # the adjacent pairs alone
        pairs = [_pair(args, work / f"pair{index}") for index in range(args.pairs)]
        _print_pairs(pairs)
        if args.json is not None:
            errors, middle = pair_errors(pairs)
            args.json.write_text(json.dumps({"ranks": args.ranks, "steps": args.steps, "warmup": args.warmup,
                                             "pairs": pairs, "pair_forecast_errors": errors,
                                             "pair_forecast_error_median": middle}, indent=1))
        return
    plan = _plan(args, work) if args.top > 0 else {"top": []}
    if "plan_seconds" in plan:
        calibration = plan.get("calibration")
        print(f"plan --profile took {plan['plan_seconds']:.1f} s"
              + ("" if calibration is None else
                 f", of which the calibration run {calibration['seconds']:.1f} s (the profile's F x "
                 + "/".join(f"{x:.2f}" for x in calibration["forward_scale"]) + ", B x "
                 + "/".join(f"{x:.2f}" for x in calibration["backward_scale"]) + " per stage"
                 + _fitted(calibration) + ")" + _blocks_text(calibration)),
              file=sys.stderr)
    configs: list[tuple[str, list[str], float | None, tuple[int, ...]]] = []
    files: dict[str, Path | None] = {}
    for index, entry in enumerate(plan["top"][: args.top]):
        label = ("choice: " if index == 0 else f"#{index + 1}: ") + _label(entry)
        configs.append((label, _candidate_args(entry, index, work), float(entry["step_time"]),
                        tuple(entry["recompute"] or ())))
        files[label] = work / f"order{index}.json" if entry.get("order") else None
    default = ["--ranks", str(args.ranks)]
    configs.append(("default (1f1b m=8, partition flops)", default, None, ()))
    uniform = [*default, "--partition", "uniform"]
    configs.append(("former default (1f1b m=8, partition uniform)", uniform, None, ()))
    for extra in args.extra:
        configs.append((f"extra: {extra}", shlex.split(extra), None, ()))

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in configs}
    for round_index in range(args.rounds):
        for number, (label, extra, *_) in enumerate(configs):
            result = _train(extra, args, work / f"r{round_index}c{number}")
            runs[label].append(result)
            print(f"round {round_index + 1} {label}: step {result['step_s'] * 1e3:.0f} ms, "
                  f"bubble {result['bubble']:.0%}", file=sys.stderr)
        # Pair i right after round i: the pairs alternate with the rounds.
        pairs += [_pair(args, work / f"pair{index}") for index in pairs_after_round(round_index, args.rounds,
                                                                                      args.pairs)]

    tokens = args.batch_size * ModelConfig().seq_len
    costs_path = work / "costs.json"
    profile_path = work / "profile_costs.json"
    # The plan prices messages at the calibration run's latency (no link flags given here).
    latency = float((plan.get("calibration") or {}).get("message_latency_s", 0.0))
    rows = []
    for label, extra, forecast, recompute in configs:
        done = runs[label]
        if forecast is None and costs_path.exists():
            forecast = _forecast(costs_path, done[0], args, latency)
        step = statistics.median(s for r in done for s in r["steps_s"])
        ratios = ([_op_ratios(costs_path, r, recompute, args, files.get(label)) for r in done]
                  if costs_path.exists() else [])
        op_ratio: dict[str, float | None] = {}
        for kind in _KINDS:
            values = [value for r in ratios if (value := r[kind]) is not None]
            op_ratio[kind] = statistics.median(values) if values else None
        # The same configuration priced at the one-process profile's prices (before calibration).
        profile_forecast = profile_f = profile_b = None
        if profile_path.exists():
            profile_forecast = _priced(profile_path, done[0], files.get(label), recompute, args, 0.0)
            raw = [_op_ratios(profile_path, r, recompute, args, files.get(label)) for r in done]
            profile_f = _median_of([r["F"] for r in raw])
            profile_b = _median_of([r["B"] for r in raw])
            if forecast is not None and label in files:  # the repricing reproduces the plan's own
                again = _priced(costs_path, done[0], files[label], recompute, args, latency)
                print(f"{label}: plan {forecast * 1e3:.1f} ms, repriced {again * 1e3:.1f} ms",
                      file=sys.stderr)
        rows.append({
            "label": label, "train_args": shlex.join(extra), "forecast_s": forecast, "measured_s": step,
            "tokens_per_s": tokens / step, "bubble": statistics.median(r["bubble"] for r in done),
            "partition": done[0]["partition"], "rounds_s": [r["step_s"] for r in done],
            "steps_s": [r["steps_s"] for r in done],
            "in_run_predicted_s": statistics.median(r["predicted_wall"] for r in done),
            "in_run_predicted_per_wall": statistics.median(r["predicted_per_wall"] for r in done),
            "makespan_per_wall": statistics.median(r["makespan_per_wall"] for r in done),
            "core_share": statistics.median(r["core_share"] for r in done),
            "measured_x_share_s": statistics.median(r["step_s"] * r["core_share"] for r in done),
            "planner_per_run": op_ratio,
            "profile_forecast_s": profile_forecast, "profile_f_per_run": profile_f,
            "profile_b_per_run": profile_b,
            "gap_after_send_s": _median_of([r["gaps_s"][0] for r in done]),
            "gap_after_other_s": _median_of([r["gaps_s"][1] for r in done]),
        })
    best_row = min(rows, key=lambda row: row["measured_s"])
    best = best_row["measured_s"]
    print(f"{args.rounds} rounds of {args.steps} steps ({args.warmup} left out per run), "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| configuration | forecast ms | measured ms | spread (rounds) | tokens/s | bubble | vs best "
          "| in-run predicted ms | forecast / in-run | F | I | W | B | in-run / wall | makespan / wall "
          "| core share | gap after a send us | other gaps us | profile-only forecast ms | profile F "
          "| profile B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        forecast_text = f"{row['forecast_s'] * 1e3:.0f}" if row["forecast_s"] is not None else "-"
        ops = " | ".join(_ratio(row["planner_per_run"][kind]) for kind in _KINDS)
        print(f"| {row['label']} | {forecast_text} | {row['measured_s'] * 1e3:.0f} | "
              f"{_spread(row['rounds_s'], row['measured_s'])} | "
              f"{row['tokens_per_s']:,.0f} | {row['bubble']:.0%} | {row['measured_s'] / best - 1:+.1%} | "
              f"{row['in_run_predicted_s'] * 1e3:.0f} | "
              + ("-" if row["forecast_s"] is None else f"{row['forecast_s'] / row['in_run_predicted_s']:.2f}")
              + f" | {ops} | {row['in_run_predicted_per_wall']:.2f} | {row['makespan_per_wall']:.2f} | "
              f"{row['core_share']:.2f} | {_us(row['gap_after_send_s'])} | {_us(row['gap_after_other_s'])} | "
              + ("-" if row["profile_forecast_s"] is None else f"{row['profile_forecast_s'] * 1e3:.0f}")
              + f" | {_ratio(row['profile_f_per_run'])} | {_ratio(row['profile_b_per_run'])} |")
    print("\nF, I, W, B: the planner's stage costs for the configuration over the run's own "
          "(the sum over the stages that ran that kind; median over rounds). Gaps: the time a rank spent "
          "between two actions, less its waits, after an action whose output it sent to the other rank "
          "and after the others (the last step of each run; the calibrated plan prices the second as "
          "the runtime's time per action and a send's occupancy beside it after the first, the "
          "profile alone every gap alike). Profile-only forecast, profile F and B: the same at the "
          "one-process profile's prices, before `plan --profile`'s calibration run.")
    error = None
    resolved: bool | None = None
    if args.top > 0:  # --top 0: the defaults alone (the default partition against uniform)
        choice = rows[0]
        error = (choice["forecast_s"] - choice["measured_s"]) / choice["measured_s"]
        # Resolved: the choice's and the best's round medians do not overlap (or they are one row).
        low, high = min(choice["rounds_s"]), max(choice["rounds_s"])
        if args.rounds < 2:
            resolved = None  # one round has no spread to weigh a difference against
        else:
            best_rounds = best_row["rounds_s"]
            resolved = choice is best_row or low > max(best_rounds) or high < min(best_rounds)
        if choice["profile_forecast_s"] is not None:
            print("at the one-process profile's prices (no calibration) the choice's forecast error would be "
                  f"{(choice['profile_forecast_s'] - choice['measured_s']) / choice['measured_s']:+.1%}")
        print(f"choice forecast error: {error:+.1%} (target within 10%); choice vs best measured: "
              f"{choice['measured_s'] / best - 1:+.1%} (target within 5%; "
              + {True: "the rounds resolve it", False: "within the rounds' spread: not resolved",
                 None: "one round: give --rounds 2 or more to resolve it"}[resolved] + "); "
              f"choice forecast / in-run prediction: "
              f"{choice['forecast_s'] / choice['in_run_predicted_s']:.2f}")
        _print_relative(rows)
    _print_pairs(pairs)
    calibrated = [pair["calibration_step_s"] for pair in pairs if pair["calibration_step_s"] is not None]
    defaults = next(row for row in rows if row["label"].startswith("default ("))
    if calibrated and plan.get("calibration"):
        print("the defaults' step in the calibration runs: the first plan's "
              f"{plan['calibration']['measured_step_s'] * 1e3:.0f} ms, the pairs' "
              + "/".join(f"{value * 1e3:.0f}" for value in calibrated)
              + f" ms; in the rounds {defaults['measured_s'] * 1e3:.0f} ms (median)")
    if args.json is not None:
        report = {"plan_seconds": plan.get("plan_seconds"), "calibration": plan.get("calibration"),
                  "ranks": args.ranks, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                  "idle_s": args.idle,
                  "rows": rows, "forecast_error": error, "choice_vs_best_resolved": resolved,
                  "pairs": pairs, "pair_forecast_errors": pair_errors(pairs)[0],
                  "pair_forecast_error_median": pair_errors(pairs)[1]}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
