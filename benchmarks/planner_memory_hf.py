"""The planner's memory model of a Hugging Face model against the CPU allocator, per rank, at 2 ranks.

    python benchmarks/planner_memory_hf.py --model gpt2 [--precision bf16] [--quick] [--json FILE]
    python benchmarks/planner_memory_hf.py --model llama [--no-measure]
    python benchmarks/planner_memory_hf.py --model path/to/config.json    # a model of your own
    python benchmarks/planner_memory.py --allocator --model gpt2           # the same, from planner_memory

`--model gpt2` and `--model llama` write a tiny config.json (`TINY`: 2 blocks, width 64, 4 heads,
vocabulary 256, 32 positions; GPT-2 with transformers' defaults: gelu_new, dropouts 0.1; Llama with
2 key/value heads, untied) into a scratch directory; a path is used as given (its vocabulary must
be at most 65536: the token file is uint16). `pipefold train --model` starts from a random
initialization and reads `train.bin`, random token ids written beside it.

For each configuration (1f1b and gpipe, recompute none and full, m = 2 and 4; `--quick`: 1f1b at
m = 4), the plan of the estimate (`pipefold plan --model CONFIG`: `pipefold.plan.hf_estimate`)
and, unless `--no-measure`, of the measured layers (`plan --model CONFIG --measure`, no
calibration run) are pinned to it; the estimate's `train_command` then trains for 3 steps with
`--memory-peaks` (each rank's CPU allocations recorded by torch's profiler; steps 2-3 kept:
`pipefold.job.allocator_peaks`), and each rank's plan is set beside that peak: the rows of
`benchmarks/planner_memory.py --allocator` for the estimate, and the measured plan's total and
error in two more columns. Both plans split the model as the estimate's command does
(`--partition`), so the two are compared at one partition. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.planner_memory import (
    GPU_STEPS,
    RunFailed,
    _cli,
    allocator_cases,
    allocator_error,
    allocator_row,
    allocator_verdict,
    cpu_header,
    run_cases,
)

SEQ_LEN, BATCH = 32, 8
TINY: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256,
             "n_positions": SEQ_LEN},
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": SEQ_LEN, "tie_word_embeddings": False},
}
"""Tiny configs as the tests build them (tests/model/test_hf_saved_profile.py), at the CPU run's sizes."""
NUM_TOKENS = 50_000


def write_model(model: str, work: Path) -> tuple[Path, Path]:
    """config.json (a `TINY` name written with transformers' full defaults, or the path given) and a
    token file of random ids below its vocabulary, in `work`."""
    import numpy as np
    import transformers

    if model in TINY:
        fields = dict(TINY[model])
        made = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
        config = work / f"{model}.json"
        made.to_json_file(config, use_diff=False)
    else:
        config = Path(model).resolve()
        if config.is_dir():
            config = config / "config.json"
    vocab = int(json.loads(config.read_text())["vocab_size"])
    if vocab > 2**16:
        raise SystemExit(f"--model {model}: vocabulary {vocab} exceeds the uint16 token file's 65536")
    tokens = work / "train.bin"
    np.random.default_rng(0).integers(0, vocab, size=NUM_TOKENS, dtype=np.uint16).tofile(tokens)
    return config, tokens


def plan_memory(config: Path, schedule: str, recompute: str, num_microbatches: int, precision: str,
                work: Path, *, measure: bool = False) -> dict[str, Any]:
    """`pipefold plan --model config` pinned to the configuration (`measure`: on the measured
    layers, one repeat, no calibration run): its JSON."""
    return json.loads(_cli(
        ["plan", "--model", str(config), "--ranks", "2", "--seq-len", str(SEQ_LEN),
         "--batch-size", str(BATCH),
         "--schedule", schedule, "--microbatches", str(num_microbatches), "--recompute", recompute,
         "--order-search", "0", "--json", "--precision", precision,
         *(["--measure", "--calibrate-steps", "0", "--repeats", "1"] if measure else [])],
        work))


def measure_hf(config: Path, tokens: Path, schedule: str, recompute: str, num_microbatches: int,
               work: Path, precision: str = "fp32", with_measured: bool = True,
               ) -> tuple[list[tuple[str, ...]], dict[str, Any]]:
    """One configuration: the rows (`allocator_row` plus the measured plan's total and error)
    and what they came from."""
    started = time.perf_counter()
    planned = plan_memory(config, schedule, recompute, num_microbatches, precision, work)
    measured = (plan_memory(config, schedule, recompute, num_microbatches, precision, work, measure=True)
                if with_measured else None)
    out = work / f"hf-{schedule}-{recompute}-{num_microbatches}-{precision}"
    command = shlex.split(planned["train_command"])[1:]
    _cli([*command, "--data", str(tokens), "--steps", str(GPU_STEPS), "--eval-every", "0", "--set",
          "sample_tokens=0", "--memory-peaks", "--out", str(out)], work)
    counted = json.loads((out / "summary.json").read_text())["memory"]
    label = f"{schedule} m={num_microbatches} recompute={recompute}" + (
        f" {precision}" if precision != "fp32" else "")
    rows = []
    for entry in sorted(counted, key=lambda e: (e["pipeline_rank"], e["world_rank"])):
        rank = entry["pipeline_rank"]
        row = allocator_row(label, entry, planned["choice"]["memory"][rank], device="cpu")
        extra: tuple[str, ...] = ("-", "-")
        if measured is not None:
            if measured["train_command"] != planned["train_command"]:  # another split: not comparable
                extra = ("other split", "-")
            else:
                mine = measured["choice"]["memory"][rank]
                error = allocator_error(mine, entry, "cpu_allocated_peak")
                extra = (f"{mine['total'] / 2**10:.0f}", f"{error:+.1%}")
        # The estimate's whole-step error stays the last column (allocator_verdict reads it).
        rows.append((*row[:-1], *extra, row[-1]))
    record = {"configuration": label, "train_command": planned["train_command"],
              "plan_memory": planned["choice"]["memory"],
              "measured_plan_memory": measured["choice"]["memory"] if measured else None,
              "measured_train_command": measured["train_command"] if measured else None,
              "summary_memory": counted, "seconds": time.perf_counter() - started}
    return rows, record


def header() -> tuple[str, ...]:
    base = cpu_header()
    return (*base[:-1], "total KiB (plan --measure)", "error (--measure)", "error (estimate)")


def hf_allocator_check(model: str, quick: bool, precision: str, json_file: Path | None,
                       with_measured: bool = True) -> None:
    """The table for `model` (a `TINY` name or a config.json / model directory)."""
    import torch

    cases = allocator_cases(quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config, tokens = write_model(model, Path(tmp))
        family = json.loads(config.read_text())["model_type"]
        print(f"CPU, torch {torch.__version__}: Hugging Face {model} ({family}), 2 pipeline ranks, "
              f"seq-len {SEQ_LEN}, batch {BATCH}, {precision}, {GPU_STEPS} steps (the first is warm-up), "
              "allocations profiled (train --memory-peaks)", flush=True)

        def measure(schedule: str, recompute: str, m: int) -> tuple[list[tuple[str, ...]], dict[str, Any]]:
            return measure_hf(config, tokens, schedule, recompute, m, Path(tmp), precision, with_measured)

        rows, num_failed = run_cases(cases, measure, header(), json_file)
    print(f"estimate: {allocator_verdict(rows, num_failed)}")
    if with_measured:
        errors = [row[-2] for row in rows if row[-2] != "-"]
        within = sum(abs(float(e.rstrip('%'))) <= 10 for e in errors)
        print(f"--measure: {within} of {len(errors)} rank totals within 10%")
    print(f"{len(cases)} configurations in {time.perf_counter() - started:.0f} s")
    if num_failed:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="gpt2|llama|DIR_OR_CONFIG",
                        help="a tiny built-in config (gpt2, llama) or a Hugging Face config.json / directory")
    parser.add_argument("--quick", action="store_true", help="1f1b at m = 4 only")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "bf16-pure"), default="fp32")
    parser.add_argument("--no-measure", action="store_true", help="the estimate's plan only (no --measure)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the plans and summaries to FILE")
    args = parser.parse_args()
    hf_allocator_check(args.model, args.quick, args.precision, args.json, not args.no_measure)


if __name__ == "__main__":
    try:
        main()
    except RunFailed as failed:
        raise SystemExit(str(failed)) from None
