"""Does W's cost depend on what ran just before it, and I's on the I states its rank holds?

    .venv/bin/python benchmarks/w_context.py                      # 4 and 16 rows, fp32, 12 rounds
    .venv/bin/python benchmarks/w_context.py --rows 4 16 --rounds 16 --precision bf16 --json /tmp/wctx.json

`pipefold plan --profile`'s calibration prices each stage's I and W from its "1f1b+split" block,
where every W runs right after its own I (F(k) I(k) W(k)) and no I state is held at an I. The
orders the planner picks (searched orders, dualpipe-v, zb-v, zb-h1/h2) run W elsewhere: after
another micro-batch's I, after an F, after a B, and their I run while other I states are held.
This measures, in one process on one core (no ranks, no messages, no executor: the runtime's own
backward functions, as the executor calls them), on `pipefold train`'s default GPT (d_model 128,
4 heads, 4 blocks, 128 positions, 256 tokens) the stages `last` (layers 4:8, the tied head and
the loss) and `middle` (one block fed a float input that takes a gradient), the loops (blocks of
8 micro-batches, every (stage, rows, loop) block in turn each round, rotated; a block's first two
micro-batches and the first round left out):

- `FB`: F(k) B(k) (1F1B; the reference of F and B);
- `FIW`: F(k) I(k) W(k): W after its own I, I with no I state held (the calibration's split block);
- `FIW1`: F(k) I(k) W(k-1): W after another micro-batch's I, I with one other state held (zb-h1's
  last rank);
- `FIW2`: F(k) I(k) W(k-2): the same with two held (zb-h2's last rank);
- `FWI`: F(k) W(k-1) I(k): W right after an F of another micro-batch, I with none held;
- `FBW`: F(a) I(a) F(b) B(b) W(a): W right after a B of another micro-batch, I with none held;
- `FIIWW`: F(a) I(a) F(b) I(b) W(a) W(b): a cool-down's pair, W(a) after another I (kept as
  `FIIWW`), W(b) after a W (kept as `FIIWW+`), I(b) with one other state held.

Thread CPU seconds (`time.thread_time`: the time another process held the core left out) and wall
seconds of each action. Per round the median of each (loop, action); per (stage, rows) each
loop's W and I over the same round's `FIW` W and I (the round's load out), median over rounds and
the rounds' quartiles. A benchmark, not a test: compare rows of one invocation, and give the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package

from benchmarks.split_rows import (  # noqa: E402
    STAGES,
    build_stages,
    end_block,
    keep_medians,
    load_average,
    quartiles,
)

LOOPS = ("FB", "FIW", "FIW1", "FIW2", "FWI", "FBW", "FIIWW")
CLOCKS = ("cpu", "wall")


def measure(rows_list: list[int], rounds: int, dtype_name: str, block: int = 8) -> dict[str, Any]:
    """found[stage][rows][loop][kind][clock]: one median per kept round."""
    from pipefold.runtime.backward import backward_full, backward_input, backward_weight
    from pipefold.runtime.held_copies import casts_kept

    stages = build_stages(rows_list, dtype_name)
    params, caches, forward = stages.params, stages.caches, stages.forward

    def now() -> tuple[float, float]:
        return time.thread_time(), time.perf_counter()

    found: dict[str, Any] = {stage: {rows: {loop: {kind: {clock: [] for clock in CLOCKS} for kind in "FBIW"}
                                            for loop in LOOPS} for rows in rows_list} for stage in STAGES}
    combos = [(stage, rows, loop) for stage in STAGES for rows in rows_list for loop in LOOPS]
    with casts_kept():  # as a mixed-precision step holds autocast's weight casts
        for round_index in range(rounds + 1):
            shift = round_index % len(combos)
            for stage, rows, loop in combos[shift:] + combos[:shift]:
                samples: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CLOCKS} for k in "FBIW"}
                pending: list[Any] = []  # I states whose W has not run, oldest first

                def timed(kind: str, keep: bool, function: Any, *args: Any,
                          samples: dict[str, dict[str, list[float]]] = samples, **kwargs: Any) -> Any:
                    start = now()
                    result = function(*args, **kwargs)
                    end = now()
                    if keep:
                        for slot, clock in enumerate(CLOCKS):
                            samples[kind][clock].append(end[slot] - start[slot])
                    return result

                def run_i(keep: bool, leaf: Any, output: Any, grad: Any, stage: str = stage, rows: int = rows,
                          pending: list[Any] = pending) -> None:
                    _, state = timed("I", keep, backward_input, [output], [grad], [leaf], params[stage],
                                     cache=caches[(stage, rows)])
                    pending.append(state)

                for index in range(block):
                    keep = index >= 2
                    leaf, output, grad = timed("F", keep, forward, stage, rows)
                    if loop == "FB":
                        timed("B", keep, backward_full, [output], [grad], [leaf])
                    elif loop in ("FIW", "FIW1", "FIW2"):
                        run_i(keep, leaf, output, grad)
                        held = {"FIW": 0, "FIW1": 1, "FIW2": 2}[loop]
                        if len(pending) > held:
                            timed("W", keep, backward_weight, pending.pop(0))
                    elif loop == "FWI":
                        if pending:
                            timed("W", keep, backward_weight, pending.pop(0))
                        run_i(keep, leaf, output, grad)
                    elif index % 2 == 0:  # FBW, FIIWW: F(a) I(a), then F(b) ...
                        run_i(keep, leaf, output, grad)
                    elif loop == "FBW":  # ... B(b) W(a)
                        timed("B", keep, backward_full, [output], [grad], [leaf])
                        timed("W", keep, backward_weight, pending.pop(0))
                    else:  # FIIWW: ... I(b) W(a) W(b), the second W kept apart as "B" (after a W)
                        run_i(keep, leaf, output, grad)
                        timed("W", keep, backward_weight, pending.pop(0))
                        timed("B", keep, backward_weight, pending.pop(0))
                end_block(pending, params[stage], backward_weight)
                if round_index > 0:  # the first round warms up
                    keep_medians(found[stage][rows][loop], samples)
    return found


def report(found: dict[str, Any], rows_list: list[int]) -> dict[str, Any]:
    """Per (stage, rows, clock): each loop's W and I over the same round's FIW W and I; F and B too."""
    summary: dict[str, Any] = {}
    for clock in CLOCKS:
        print(f"\n{clock} clock: per round, over the same round's FIW (W after its own I; I with none "
              "held); median over rounds (quartiles)")
        print("| stage | rows | FIW W ms | FIW I ms | W: FIW1 (after other I) | W: FIW2 | W: FWI (after F) "
              "| W: FBW (after B) | W: FIIWW (after other I) | W: FIIWW+ (after W) | I: FIW1 (1 held) "
              "| I: FIW2 (2 held) | I: FWI | I: FBW | F: FIW1 / FB | (I + W) FIW / B |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for stage in STAGES:
            for rows in rows_list:
                at = found[stage][rows]
                base_w, base_i = at["FIW"]["W"][clock], at["FIW"]["I"][clock]
                cells = [f"{statistics.median(base_w) * 1e3:.3f}", f"{statistics.median(base_i) * 1e3:.3f}"]
                key = f"{stage} {rows} {clock}"
                summary[key] = {"W_FIW_ms": statistics.median(base_w) * 1e3,
                                "I_FIW_ms": statistics.median(base_i) * 1e3}
                for kind, base, loops in (("W", base_w, ("FIW1", "FIW2", "FWI", "FBW", "FIIWW", "FIIWW+")),
                                          ("I", base_i, ("FIW1", "FIW2", "FWI", "FBW"))):
                    for loop in loops:
                        # FIIWW+: the cool-down's second W (after a W), recorded as FIIWW's "B".
                        values = at["FIIWW"]["B"][clock] if loop == "FIIWW+" else at[loop][kind][clock]
                        ratios = [x / y for x, y in zip(values, base, strict=True)]
                        low, mid, high = quartiles(ratios)
                        cells.append(f"{mid:.3f} ({low:.2f}-{high:.2f})")
                        summary[key][f"{kind} {loop}"] = ratios
                forward = [x / y for x, y in zip(at["FIW1"]["F"][clock], at["FB"]["F"][clock], strict=True)]
                split = [(i + w) / b for i, w, b in zip(base_i, base_w, at["FB"]["B"][clock], strict=True)]
                cells += [f"{statistics.median(forward):.3f}", f"{statistics.median(split):.3f}"]
                summary[key]["F FIW1/FB"] = forward
                summary[key]["IW FIW/B"] = split
                print(f"| {stage} | {rows} | " + " | ".join(cells) + " |")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=12, help="rounds kept (one more runs first, left out)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32",
                        help="the compute dtype (the calibration runs fp32)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 2 or min(args.rows) < 1:
        parser.error("give --rounds >= 2 and --rows >= 1")
    rows_list = sorted(set(args.rows))
    start_load, started = load_average(), time.time()
    found = measure(rows_list, args.rounds, args.precision)
    print(f"one process, {args.precision}, {args.rounds} rounds, {time.time() - started:.0f} s, "
          f"load {start_load} -> {load_average()}")
    summary = report(found, rows_list)
    if args.json is not None:
        args.json.write_text(json.dumps({"found": found, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
