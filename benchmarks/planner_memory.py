"""The planner's memory model against what `pipefold train` counts, per rank, on a tiny GPT at 2 ranks.

    python benchmarks/planner_memory.py            # 1f1b and gpipe, recompute none/full, m = 2 and 4
    python benchmarks/planner_memory.py --quick    # 1f1b, m = 4 only
    python benchmarks/planner_memory.py --megatron # Megatron-LM's GPT: `plan --megatron`'s model
    python benchmarks/planner_memory.py --quick --precision bf16   # profiled and trained in bf16
    python benchmarks/planner_memory.py --quick --precision bf16 --tensor-parallel 2   # 4 processes

For each configuration: `pipefold plan --profile` pinned to it (the layers measured here, the
partition balanced on them) gives the predicted memory per rank and the command that trains it;
that command then runs 2 steps, and its summary.json gives what each rank held: weights and
optimizer state (the tensors' bytes), gradients (as large as the weights during a step) and the
activation peak the saved-tensor hooks counted. Runs one job at a time (each is 2 processes).
Prints one row per (configuration, rank): predicted and counted activations and totals, and the
total's error (without the plan's recompute transient, which the hooks do not see). A benchmark,
not a test.

`--megatron` checks the model `pipefold plan --megatron` prices (`GptEstimate(megatron=True)`
on the `cpu` hardware preset, fp32: Korthikanti et al. 2022's activations) against
`pipefold train --attention unfused --dropout 0.1` (Megatron-LM's unfused attention and
dropouts) at the same partition, schedule, micro-batches and recomputation (none, full, and
selective: the attention core), through the planner's own `evaluate`.

`--precision bf16|fp16|bf16-pure` profiles, plans and trains in that precision (`plan --profile
--precision`): the 16-bit weight copies autocast holds for a step are then a column of their
own on both sides, the plan's `casts` and the job's (summary.json's memory `casts`, measured from
autocast's cache and left out of the counted activations: pipefold.runtime.held_copies), with
their error per rank (the plan prices each rank's from its own layers' profiled copies; under
`--tensor-parallel`, each tp rank's from its shards).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = ["--num-layers", "2", "--d-model", "64", "--num-heads", "4", "--seq-len", "32", "--batch-size", "8"]
CLI = [sys.executable, "-c", "import sys; from pipefold.cli.main import main; sys.exit(main())"]


def _cli(args: list[str], cwd: Path) -> str:
    done = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise SystemExit(f"pipefold {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def measure(schedule: str, recompute: str, num_microbatches: int, work: Path,
            precision: str = "fp32", tensor_parallel: int = 1) -> list[tuple[str, ...]]:
    split = ["--tensor-parallel", str(tensor_parallel), "--devices", str(2 * tensor_parallel)]
    planned = json.loads(_cli(
        ["plan", "--profile", "--ranks", "2", *MODEL, "--schedule", schedule, "--microbatches",
         str(num_microbatches), "--recompute", recompute, "--order-search", "0", "--json",
         "--calibrate-steps", "0", "--precision", precision, *(split if tensor_parallel > 1 else [])],
        work))  # memory: times do not matter here
    command = shlex.split(planned["train_command"])[1:]  # without the leading "pipefold"
    out = work / f"{schedule}-{recompute}-{num_microbatches}-{precision}-tp{tensor_parallel}"
    _cli([*command, "--steps", "2", "--out", str(out)], work)
    counted = json.loads((out / "summary.json").read_text())["memory"]
    rows = []
    # One entry per process: with tensor parallelism, each tp rank of a stage against its plan.
    for entry in sorted(counted, key=lambda e: (e["pipeline_rank"], e["world_rank"])):
        rank = entry["pipeline_rank"]
        predicted = planned["choice"]["memory"][rank]
        # The job holds autocast's weight copies once a step (mixed precision) and reports them
        # apart from the counted activations, as the plan prices them (`casts`).
        casts = entry.get("casts", 0)
        total = 2 * entry["weights"] + entry["optimizer"] + entry["activations_peak"] + casts
        # The hooks do not see the layer a recomputing backward rebuilds for a moment, so the
        # like-for-like total leaves the plan's recompute transient out (shown apart).
        like = predicted["total"] - predicted["recompute"]
        mixed = precision != "fp32"
        rows.append((
            f"{schedule} m={num_microbatches} recompute={recompute}" + (f" {precision}" if mixed else "")
            + (f" tp={tensor_parallel}" if tensor_parallel > 1 else ""),
            str(rank) if tensor_parallel == 1 else f"{rank} (process {entry['world_rank']})",
            f"{predicted['activations'] / 2**10:.0f}", f"{entry['activations_peak'] / 2**10:.0f}",
            *((f"{predicted['casts'] / 2**10:.1f}", f"{casts / 2**10:.1f}",
               f"{predicted['casts'] / casts - 1:+.1%}" if casts else "-") if mixed else ()),
            f"{predicted['recompute'] / 2**10:.0f}", f"{like / 2**10:.0f}", f"{total / 2**10:.0f}",
            f"{like / total - 1:+.1%}",
        ))
    return rows


MEGATRON_PARTITION = (3, 3)  # embeddings + 1 block | 1 block + norm + head


def megatron_plan(schedule: str, recompute: str, num_microbatches: int) -> list[dict[str, int]]:
    """Per rank, the memory `pipefold plan --megatron` prices for this configuration (fp32, cpu)."""
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.evaluate import evaluate
    from pipefold.plan.hardware import load_hardware
    from pipefold.plan.space import Config
    from pipefold.simulate import Link

    num_layers, d_model, num_heads, seq_len, batch = 2, 64, 4, 32, 8
    rows = batch // num_microbatches
    estimate = GptEstimate(num_layers=num_layers, d_model=d_model, num_heads=num_heads, seq_len=seq_len,
                           vocab_size=256, hardware=load_hardware("cpu"), dtype="fp32", megatron=True,
                           recompute_attention=recompute == "selective")
    costs = estimate.at(rows, 1, Link(), False)
    bounds = (0, MEGATRON_PARTITION[0], sum(MEGATRON_PARTITION))
    stages = (0, 1) if recompute == "full" else ()
    candidate = evaluate(costs, Config(schedule, 1, num_microbatches, rows,
                                       recompute_attention=recompute == "selective"),
                         num_ranks=2, bounds=bounds, recompute=stages, link=Link(),
                         recompute_attention=recompute == "selective")
    memory = [m.to_json() for m in candidate.memory]
    # What the executor also holds and the plan's stage model leaves out: the output of the
    # forward that has not been sent yet (each sent output's data is freed: runtime.sent_outputs),
    # one stage output on the first rank at the activations' peak.
    first = costs.layers[:bounds[1]]
    memory[0]["held_output"] = first[-1].output_bytes
    memory[1]["held_output"] = 0
    return memory


def measure_megatron(
    schedule: str, recompute: str, num_microbatches: int, work: Path
) -> list[tuple[str, ...]]:
    planned = megatron_plan(schedule, recompute, num_microbatches)
    out = work / f"megatron-{schedule}-{recompute}-{num_microbatches}"
    # As the planner's train command recomputes stages: each of their layers checkpointed.
    recompute_flags = (["--set", f"recompute=[{','.join(map(str, range(sum(MEGATRON_PARTITION))))}]"]
                       if recompute == "full" else ["--recompute", recompute])
    _cli(["train", "--ranks", "2", *MODEL, "--schedule", schedule, "--microbatches", str(num_microbatches),
          *recompute_flags, "--partition", ",".join(map(str, MEGATRON_PARTITION)),
          "--attention", "unfused", "--dropout", "0.1", "--precision", "fp32", "--steps", "2",
          "--out", str(out)], work)
    counted = json.loads((out / "summary.json").read_text())["memory"]
    rows = []
    for entry in sorted(counted, key=lambda e: e["pipeline_rank"]):
        rank = entry["pipeline_rank"]
        predicted = planned[rank]
        total = 2 * entry["weights"] + entry["optimizer"] + entry["activations_peak"]
        like = predicted["total"] - predicted["recompute"]
        activations = predicted["activations"] / entry["activations_peak"] - 1
        with_output = (predicted["activations"] + predicted["held_output"]) / entry["activations_peak"] - 1
        rows.append((
            f"{schedule} m={num_microbatches} recompute={recompute}", str(rank),
            f"{predicted['activations'] / 2**10:.0f}", f"{entry['activations_peak'] / 2**10:.0f}",
            f"{activations:+.1%}", f"{predicted['held_output'] / 2**10:.0f}", f"{with_output:+.1%}",
            f"{like / 2**10:.0f}", f"{total / 2**10:.0f}", f"{like / total - 1:+.1%}",
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1f1b at m = 4 only")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "bf16-pure"), default="fp32",
                        help="profile, plan and train in this precision (default fp32)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                        help="T tensor-parallel ranks per stage (2 T processes; default 1)")
    parser.add_argument("--megatron", action="store_true",
                        help="Megatron-LM's GPT (unfused attention, dropout) against the model "
                        "`plan --megatron` prices")
    args = parser.parse_args()
    if args.megatron:
        megatron(args.quick)
        return
    cases = [("1f1b", "none", 4), ("1f1b", "full", 4)] if args.quick else [
        (schedule, recompute, m)
        for schedule in ("1f1b", "gpipe") for recompute in ("none", "full") for m in (2, 4)
    ]
    casts = ("casts KiB (plan)", "casts KiB (job)", "casts error") if args.precision != "fp32" else ()
    header = ("configuration", "rank", "activations KiB (plan)", "activations KiB (counted)", *casts,
              "recompute transient KiB (plan)", "total KiB (plan, without it)", "total KiB (counted)",
              "error")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, recompute, m in cases:
            for row in measure(schedule, recompute, m, Path(tmp), args.precision, args.tensor_parallel):
                print("| " + " | ".join(row) + " |", flush=True)


def megatron(quick: bool) -> None:
    cases = [("1f1b", recompute, 4) for recompute in ("none", "full", "selective")] if quick else [
        *(("1f1b", recompute, m) for m in (2, 4) for recompute in ("none", "full", "selective")),
        *(("gpipe", recompute, 4) for recompute in ("none", "selective")),
    ]
    header = ("configuration", "rank", "activations KiB (plan --megatron)", "activations KiB (counted)",
              "activations error", "unsent stage output KiB", "error with it",
              "total KiB (plan, without transient)", "total KiB (counted)", "error")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, recompute, m in cases:
            for row in measure_megatron(schedule, recompute, m, Path(tmp)):
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
