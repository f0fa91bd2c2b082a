"""The planner beside Megatron-LM's published results: Narayanan et al., "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", SC'21, Table 1 (GPT, s = 2048,
V = 51200, 80 GB A100s, 8 per node).

    python benchmarks/paper.py                  # every row, the paper's configuration pinned
    python benchmarks/paper.py --rows 1.7B 18.4B --search    # also the planner's own choice

For each row: the paper's t, p, batch and published TFLOP/s per GPU; the planner's prediction
for that configuration (micro-batches of 1 sequence, 1F1B, every stage recomputed, as the
table's runs recompute activations: the paper's FLOP count includes the recomputed forward);
with --search, the planner's own choice on the same GPUs (tp <= 8) and its prediction. TFLOP/s
per GPU = 96 B s l h^2 (1 + s / 6h + V / 16 l h) / (step x GPUs), the paper's formula. Hardware:
the a100-80gb preset (pipefold/plan/presets/a100-80gb.toml).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from pipefold.plan import PlanOptions, plan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware


@dataclass(frozen=True)
class Row:
    name: str
    heads: int
    hidden: int
    layers: int
    tensor: int
    pipeline: int
    gpus: int
    batch: int
    tflops: float
    """Published achieved TFLOP/s per GPU."""


# Table 1 of the paper, as published (model size, heads, hidden, layers, t, p, GPUs, batch, TFLOP/s).
ROWS = (
    Row("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    Row("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    Row("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
    Row("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    Row("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    Row("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    Row("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    Row("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    Row("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    Row("1008.0B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
)
SEQ, VOCAB = 2048, 51200
HARDWARE = load_hardware("a100-80gb")


def model_flops(row: Row) -> float:
    s, l, h = SEQ, row.layers, row.hidden
    return 96 * row.batch * s * l * h * h * (1 + s / (6 * h) + VOCAB / (16 * l * h))


def tflops(row: Row, step_s: float) -> float:
    return model_flops(row) / (step_s * row.gpus) / 1e12


def estimate(row: Row) -> GptEstimate:
    return GptEstimate(num_layers=row.layers, d_model=row.hidden, num_heads=row.heads, seq_len=SEQ,
                       vocab_size=VOCAB, hardware=HARDWARE, megatron=True)


def pinned(row: Row) -> tuple[float, str]:
    dp = row.gpus // (row.tensor * row.pipeline)
    options = PlanOptions(num_devices=row.gpus, num_ranks=row.pipeline, tensor_parallel=row.tensor,
                          data_parallel=dp, global_batch=row.batch, microbatches=row.batch // dp,
                          schedules=("1f1b",), recompute="full", order_search_s=0, top=1, hardware=HARDWARE)
    result = plan(estimate(row), options)
    return tflops(row, result.choice.step_time), f"{result.choice.peak_memory / 2**30:.1f} GiB"


def searched(row: Row) -> tuple[float, str]:
    options = PlanOptions(num_devices=row.gpus, global_batch=row.batch, max_tensor_parallel=8,
                          recompute_attention=True, order_search_s=0, top=1, hardware=HARDWARE)
    choice = plan(estimate(row), options).choice
    return tflops(row, choice.step_time), f"{choice.degree_text}, {choice.describe()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="model sizes to run (default: all)")
    parser.add_argument("--search", action="store_true", help="also the planner's own choice")
    args = parser.parse_args()
    print(f"hardware: {HARDWARE.name} ({HARDWARE.source})")
    print("| model | t | p | GPUs | batch | published TFLOP/s | planner, paper's config | peak memory "
          + ("| planner's choice | its TFLOP/s " if args.search else "") + "| plan s |")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.search else "") + "---|")
    for row in ROWS:
        if args.rows and row.name not in args.rows:
            continue
        start = time.perf_counter()
        predicted, memory = pinned(row)
        cells = [row.name, row.tensor, row.pipeline, row.gpus, row.batch, row.tflops,
                 f"{predicted:.0f} ({predicted / row.tflops - 1:+.0%})", memory]
        if args.search:
            own, what = searched(row)
            cells += [what, f"{own:.0f} ({own / row.tflops - 1:+.0%})"]
        cells.append(f"{time.perf_counter() - start:.1f}")
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
