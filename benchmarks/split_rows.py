"""Does the split backward's own cost grow with the micro-batch's rows? I + W - B per stage.

    .venv/bin/python benchmarks/split_rows.py                          # rows 1 2 4 8 16, 12 rounds
    .venv/bin/python benchmarks/split_rows.py --rows 2 4 8 --rounds 20 --json /tmp/split_rows.json

`pipefold plan --profile`'s calibration prices each I and W of a split order as its part of B plus
`ModelCosts.split_overhead_s`, one constant per action, fitted at the calibration's one
micro-batch size. Two quiet calibrations fitted 503 us at 4 rows and 1145 us at 8. This measures,
in one process on one core (no ranks, no messages, no executor: the runtime's own backward
functions, as the executor calls them), the split's own seconds at several row counts:

- stages of `pipefold train`'s default GPT (d_model 128, 4 heads, 4 blocks, 128 positions, 256
  tokens): `last` (layers 4:8: two blocks, the norm, the tied head and the loss: the split stage
  of the calibration's 2-rank [4,4] run) and `middle` (layer 3, one block fed a float input that
  takes a gradient: a middle stage of the v=2 [3,1,1,3] orders the planner picks);
- per micro-batch, `FB` (F then B: 1F1B) and `FIW` (F then I then W at once: "1f1b+split", no I
  state held at any F), in blocks of 8 micro-batches, every (stage, rows, loop) block in turn
  each round, so a change of the host's load meets all of them alike; a block's first two
  micro-batches and the first round are left out (warm-up, the loop before);
- thread CPU seconds (`time.thread_time`: the time another process held the core left out) and
  wall seconds of F, B, I and W per micro-batch. Per round and block the medians; per (stage,
  rows) the split's own seconds per action, `(I + W - B) / 2` (`split_overhead_s`'s definition),
  as the median over rounds (and its rounds' quartiles), and a line `fixed + per_row * rows`
  through them (least squares), with B's own line beside it.

`--calibrations K --batch-sizes 32 64`: instead, K runs of the calibration `pipefold plan --profile`
makes (`benchmarks.held_curve.calibration_command`: train's default GPT on 2 ranks, [4,4], fp32,
8 micro-batches, so 4 and 8 rows), the batch sizes alternated, each priced as `plan --profile`
prices it (`benchmarks.split_price._priced`'s "1f1b+split" layout): per run the split stage's B,
the split's seconds per I and W as calibrations before priced them (one constant: the share of
the stage's work plus the gaps' seconds), the share and the gaps' seconds apart.

A benchmark, not a test: compare rows of one invocation, and give the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOOPS = ("FB", "FIW", "FIW1")
STAGES = ("last", "middle")


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


@dataclass(frozen=True)
class Stages:
    """Train's default GPT cut as the calibration's 2-rank runs cut it: "last" (layers 4:7 with the
    tied head and the loss, the split stage) and "middle" (one block fed a float input)."""

    params: dict[str, list[Any]]
    """Each stage's parameters, as its W accumulates them (the last stage's: the tied embedding's too)."""
    caches: dict[tuple[str, int], Any]
    """A `GroupCache` per (stage, rows), as the runtime keeps one per stage."""
    forward: Callable[[str, int], tuple[Any, Any, Any]]
    """(stage, rows) -> (input leaf, output or loss, output gradient or None for the loss)."""


def build_stages(rows_list: list[int], dtype_name: str) -> Stages:
    """The two stages on one thread, as a rank runs, with inputs for each of `rows_list` (its
    micro-batch rows) in `dtype_name` ("fp32", or "bf16" under autocast). `benchmarks/w_context.py`
    times the same stages."""
    import torch

    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.model.zoo.gpt import tied_head
    from pipefold.runtime.backward import GroupCache
    from pipefold.runtime.processes.allocator import keep_freed_memory

    torch.set_num_threads(1)  # as a rank runs
    keep_freed_memory()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    autocast = dtype is not torch.float32
    torch.manual_seed(0)
    modules = [spec.build() for spec in gpt_layers(256, 128, 4, 4, 128)]
    embedding = modules[0]
    stage_layers = {"last": modules[4:7], "middle": modules[3:4]}
    params = {"last": [p for layer in stage_layers["last"] for p in layer.parameters()]
              + [embedding.get_parameter("weight")],
              "middle": [p for layer in stage_layers["middle"] for p in layer.parameters()]}
    inputs = {rows: torch.randn(rows, 128, 128).to(dtype) for rows in rows_list}
    targets = {rows: torch.randint(0, 256, (rows, 128)) for rows in rows_list}
    grads = {rows: torch.randn(rows, 128, 128).to(dtype) for rows in rows_list}

    def forward(stage: str, rows: int) -> tuple[Any, Any, Any]:
        leaf = inputs[rows].detach().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            value = leaf
            for layer in stage_layers[stage]:
                value = layer(value)
            if stage == "last":
                return leaf, gpt_loss(tied_head(embedding, value).float(), targets[rows]), None
        return leaf, value, grads[rows]

    caches = {(stage, rows): GroupCache() for stage in STAGES for rows in rows_list}
    return Stages(params, caches, forward)


def end_block(pending: list[Any], stage_params: list[Any], backward_weight: Callable[[Any], Any]) -> None:
    """A step's end: the W still pending, then the gradients dropped."""
    while pending:
        backward_weight(pending.pop(0))
    for param in stage_params:
        param.grad = None


Samples = dict[str, dict[str, list[float]]]
"""Seconds per action kind (F, B, I, W) and clock (cpu, wall)."""


def keep_medians(found: Samples, samples: Samples) -> None:
    """A block's median per action kind and clock, appended to what the rounds found."""
    for kind, by_clock in samples.items():
        for clock, values in by_clock.items():
            if values:
                found[kind][clock].append(statistics.median(values))


def measure(rows_list: list[int], rounds: int, dtype_name: str, block: int = 8) -> dict[str, Any]:
    """Per (stage, rows, loop, kind, clock), the per-round medians of each action's seconds."""
    from pipefold.runtime.backward import backward_full, backward_input, backward_weight
    from pipefold.runtime.held_copies import casts_kept

    stages = build_stages(rows_list, dtype_name)
    params, caches, forward = stages.params, stages.caches, stages.forward
    clocks = {"cpu": time.thread_time, "wall": time.perf_counter}
    # found[stage][rows][loop][kind][clock]: one median per round
    found: dict[str, Any] = {
        stage: {rows: {loop: {kind: {clock: [] for clock in clocks} for kind in "FBIW"} for loop in LOOPS}
                for rows in rows_list} for stage in STAGES}
    combos = [(stage, rows, loop) for stage in STAGES for rows in rows_list for loop in LOOPS]
    with casts_kept():  # as a mixed-precision step holds autocast's weight casts
        for round_index in range(rounds + 1):
            # Each round in another order (rotated), so no combination always follows the same one.
            shift = round_index % len(combos)
            for stage, rows, loop in combos[shift:] + combos[:shift]:
                samples: dict[str, dict[str, list[float]]] = {k: {c: [] for c in clocks} for k in "FBIW"}
                pending: list[Any] = []  # I states whose W has not run, oldest first
                for index in range(block):
                    marks: list[tuple[float, float]] = [(time.thread_time(), time.perf_counter())]
                    leaf, output, grad = forward(stage, rows)
                    marks.append((time.thread_time(), time.perf_counter()))
                    if loop == "FB":
                        backward_full([output], [grad], [leaf])
                        marks.append((time.thread_time(), time.perf_counter()))
                        kinds = "FB"
                    else:
                        _, state = backward_input([output], [grad], [leaf], params[stage],
                                                  cache=caches[(stage, rows)])
                        marks.append((time.thread_time(), time.perf_counter()))
                        pending.append(state)
                        # FIW: this I's own W; FIW1: the previous one's (one I state held at each F).
                        if len(pending) > (1 if loop == "FIW1" else 0):
                            backward_weight(pending.pop(0))
                        marks.append((time.thread_time(), time.perf_counter()))
                        kinds = "FIW"
                    if index >= 2:
                        for position, kind in enumerate(kinds):
                            for slot, clock in enumerate(clocks):
                                samples[kind][clock].append(marks[position + 1][slot] - marks[position][slot])
                end_block(pending, params[stage], backward_weight)
                if round_index > 0:  # the first round warms up
                    keep_medians(found[stage][rows][loop], samples)
    return found


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def split_seconds(found: dict[str, Any], stage: str, rows: int, clock: str) -> list[float]:
    """Per round, the split's own seconds per action: (I + W - B) / 2 (B from the same round)."""
    at = found[stage][rows]
    return [(i + w - b) / 2 for i, w, b in zip(at["FIW"]["I"][clock], at["FIW"]["W"][clock],
                                                at["FB"]["B"][clock], strict=True)]


def line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per row) of the least-squares line through (rows, seconds)."""
    rows = np.asarray([float(r) for r, _ in points])
    seconds = np.asarray([s for _, s in points])
    slope, intercept = np.polyfit(rows, seconds, 1)
    return float(intercept), float(slope)


def report(found: dict[str, Any], rows_list: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for stage in STAGES:
        for clock in ("cpu", "wall"):
            print(f"\n{stage} stage, {clock} clock (us; medians over rounds, quartiles in brackets)")
            print("| rows | F (FB) | B | I | W | I + W - B | split per action (I + W - B) / 2 | / B |")
            print("|---|---|---|---|---|---|---|---|")
            points, b_points = [], []
            for rows in rows_list:
                at = found[stage][rows]
                f = statistics.median(at["FB"]["F"][clock]) * 1e6
                b = statistics.median(at["FB"]["B"][clock]) * 1e6
                i = statistics.median(at["FIW"]["I"][clock]) * 1e6
                w = statistics.median(at["FIW"]["W"][clock]) * 1e6
                low, mid, high = (x * 1e6 for x in quartiles(split_seconds(found, stage, rows, clock)))
                points.append((rows, mid))
                b_points.append((rows, b))
                print(f"| {rows} | {f:.0f} | {b:.0f} | {i:.0f} | {w:.0f} | {2 * mid:.0f} "
                      f"| {mid:.0f} ({low:.0f}-{high:.0f}) | {mid / b:.3f} |")
                summary[f"{stage} {clock} {rows}"] = {"F": f, "B": b, "I": i, "W": w, "split": mid,
                                                       "split_q1": low, "split_q3": high}
            # Per round, the F ratios against the same round's FB (the round's load out), and quartiles.
            ratio_cells, ratios = [], {}
            for rows in rows_list:
                at = found[stage][rows]
                for loop in ("FIW", "FIW1"):
                    pairs = zip(at[loop]["F"][clock], at["FB"]["F"][clock], strict=True)
                    ratios[f"{loop} {rows}"] = [x / y for x, y in pairs]
                low, mid, high = quartiles(ratios[f"FIW1 {rows}"])
                ratio_cells.append(f"{rows} rows {statistics.median(ratios[f'FIW {rows}']):.3f} / {mid:.3f} "
                                   f"({low:.3f}-{high:.3f})")
            print("F over FB's F, FIW (no I state held) / FIW1 (one held, s(1) + 1 as the calibration fits "
                  "it; quartiles over rounds): " + ", ".join(ratio_cells))
            summary[f"{stage} {clock} forward"] = ratios
            # The hypothesis: a constant per action fitted at one size (what the calibration priced)
            # against a share of B fitted there, each priced at the other sizes.
            at = rows_list[len(rows_list) // 2]
            constant = dict(points)[at]
            share = constant / dict(b_points)[at]
            misses = ", ".join(f"{rows} rows {constant / split - 1:+.0%} / {share * b / split - 1:+.0%}"
                               for (rows, split), (_, b) in zip(points, b_points, strict=True))
            print(f"fitted at {at} rows, priced at each, over measured: a constant {constant:.0f} us / a "
                  f"share {share:.3f} of B: {misses}")
            fixed, per_row = line(points)
            b_fixed, b_per_row = line(b_points)
            print(f"split per action: {fixed:.0f} us + {per_row:.1f} us/row; B: {b_fixed:.0f} us + "
                  f"{b_per_row:.1f} us/row (split per row / B per row {per_row / b_per_row:.3f})")
            summary[f"{stage} {clock} line"] = {"fixed_us": fixed, "per_row_us": per_row,
                                                "b_fixed_us": b_fixed, "b_per_row_us": b_per_row}
    return summary


def calibrations(batch_sizes: list[int], count: int) -> list[dict[str, Any]]:
    """`count` calibration runs per batch size, alternated, each priced (see the module docstring)."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))  # run as a script: the benchmarks package
    from benchmarks.held_curve import TRAIN, calibration_command
    from benchmarks.split_price import _priced
    from pipefold.simulate import CostModel

    work = Path(tempfile.mkdtemp(prefix="pipefold-split-rows-"))
    print(f"work folder {work}", file=sys.stderr)
    profiles = {}
    for batch in batch_sizes:  # the memory model's bytes per block, as split_price.py's
        profiles[batch] = work / f"profile_{batch}.json"
        subprocess.run([sys.executable, "-m", "pipefold", "profile", "--batch-size", str(batch),
                        "--microbatches", "8", "--repeats", "1", "--out", str(profiles[batch])],
                       cwd=root, check=True, capture_output=True)
    found = []
    for index in range(count):
        for batch in batch_sizes:
            folder = work / f"cal{index}_{batch}"
            folder.mkdir()
            command = calibration_command(folder)
            at = command.index(TRAIN[0], command.index("--")) + 1  # --batch-size's value
            command[at] = str(batch)
            load, started = load_average(), time.time()
            subprocess.run(command, cwd=root, check=True, capture_output=True)
            measured = json.loads((folder / "calibration.json").read_text())
            first = measured["phases"][0]
            run = CostModel.from_json(first["costs"])
            priced = _priced(profiles[batch], folder / "calibration.json")["1f1b+split"]
            overhead = float(priced["costs"].get("overhead_s", 0.0))
            bounds = measured["partition"].strip("[]").split("|")
            layers = [int(stop) - int(start) for start, stop in (part.split(":") for part in bounds)]
            stage = measured["split_phase"]["split_stages"][-1]
            work_s = run.b[stage] - overhead * layers[stage]
            share, gap = priced["split_backward_share"], priced["split_overhead_us"] * 1e-6
            row = {"batch": batch, "rows": int(first["microbatch_rows"]), "load": load,
                   "seconds": time.time() - started, "b_ms": run.b[stage] * 1e3,
                   "constant_us": (share * work_s + gap) * 1e6, "share": share, "gap_us": gap * 1e6}
            found.append(row)
            print(f"calibration {index + 1}, batch {batch} ({row['rows']} rows), load {load}: "
                  f"{row['seconds']:.0f} s, split stage B {row['b_ms']:.2f} ms, split per I and W "
                  f"{row['constant_us']:.0f} us = share {share:.3f} of its work + {row['gap_us']:.0f} us "
                  "of gaps",
                  flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=12, help="rounds kept (one more runs first, left out)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="the compute dtype (train's auto is bf16 on this host)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--calibrations", type=int, default=0,
                        help="instead: this many calibration runs per --batch-sizes value, alternated")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args(argv)
    if args.calibrations > 0:
        rows = calibrations(args.batch_sizes, args.calibrations)
        for batch in args.batch_sizes:
            mine = [row for row in rows if row["batch"] == batch]
            def cells(key: str, form: str, mine: list[dict[str, Any]] = mine) -> str:
                return ", ".join(format(row[key], form) for row in mine)

            print(f"batch {batch}: split per I and W {cells('constant_us', '.0f')} us; share "
                  f"{cells('share', '.3f')}; gaps {cells('gap_us', '.0f')} us")
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    if args.rounds < 2 or len(set(args.rows)) < 2 or min(args.rows) < 1:
        parser.error("give --rounds >= 2 and two or more different --rows >= 1")
    start_load, started = load_average(), time.time()
    found = measure(sorted(set(args.rows)), args.rounds, args.precision)
    print(f"one process, {args.precision}, {args.rounds} rounds, {time.time() - started:.0f} s, "
          f"load {start_load} -> {load_average()}")
    summary = report(found, sorted(set(args.rows)))
    if args.json is not None:
        args.json.write_text(json.dumps({"found": found, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
