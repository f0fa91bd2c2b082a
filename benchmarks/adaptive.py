"""Adaptive choice per length bucket against padding every batch to the maximum and against one
fixed choice tuned for the mean length, on a corpus with a long-tailed length distribution,
alternated in the same ranks.

    .venv/bin/python benchmarks/adaptive.py                          # 2 ranks, 3 timed rounds
    .venv/bin/python benchmarks/adaptive.py --memory-limit 3MiB --rounds 2

The corpus: documents (random bytes, newline-ended) whose lengths are log-normal (median
`--median-len`, a long tail clipped at the model's `--seq-len`). `pipefold.data.LengthBuckets`
cuts them into batches of one bucket length each, `--token-budget` tokens at most. One
`Pipeline` (the built-in GPT, built with `--microbatches`, the most any choice uses) runs the
same `--steps` batches per round in three ways, in turn:

- adaptive: each batch as `pipefold.plan.adaptive` chooses for its (rows, length), the measured
  re-check included (the untimed first round runs it);
- padded: each batch padded to `--seq-len` (what a fixed-shape trainer runs), with the choice
  for the padded shape of the most rows;
- fixed-mean: each batch unpadded, with the one choice the chooser makes for the mean length.

Per way: useful (unpadded) tokens per second over the timed rounds, and the largest activation
peak any rank counted in any step (`Timeline.activation_bytes_peak`). No optimizer step: the
three see the same weights. A benchmark, not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = ("adaptive", "padded", "fixed-mean")


def _corpus(num_docs: int, median_len: int, max_len: int, seed: int) -> bytes:
    import numpy as np

    generator = np.random.default_rng(seed)
    lengths = np.clip(generator.lognormal(np.log(median_len), 1.0, num_docs).astype(int), 2, 4 * max_len)
    parts = [bytes(generator.integers(32, 127, n, dtype=np.uint8)) + b"\n" for n in lengths.tolist()]
    return b"".join(parts)


def _rank(args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from pipefold.data import VOCAB_SIZE, LengthBuckets
    from pipefold.job.adaptive_choice import gpt_chooser
    from pipefold.job.sections import ModelConfig, ScheduleConfig
    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.plan.adaptive import AdaptiveChoice, BatchTooLong, length_bucket
    from pipefold.plan.orders import family_schedule
    from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions, TransportOptions
    from pipefold.runtime.adaptive import AdaptiveRunner
    from pipefold.runtime.processes.launch import init_process_group_from_env

    init_process_group_from_env()
    torch.manual_seed(0)
    model = ModelConfig(d_model=args.d_model, num_heads=args.num_heads, num_layers=args.num_layers,
                        seq_len=args.seq_len)
    schedule = ScheduleConfig(ranks=args.ranks, num_microbatches=args.microbatches, adaptive=True,
                              memory_limit=args.memory_limit)
    layers = gpt_layers(VOCAB_SIZE, args.d_model, args.num_heads, args.num_layers, args.seq_len)
    pipe = Pipeline(
        layers, loss_fn=gpt_loss, schedule="1f1b", num_microbatches=args.microbatches,
        layout=LayoutOptions(device=torch.device("cpu"), seed=0),
        runtime=RuntimeOptions(count_memory_every=1),
        transport=TransportOptions(shared_memory_bytes=1 << 28),
    )

    def chooser() -> Any:
        return gpt_chooser(model, schedule, "fp32", bounds=pipe.partition.bounds,
                           placement=pipe.schedule.placement, device_type="cpu")

    buckets = LengthBuckets(
        _corpus(args.num_docs, args.median_len, args.seq_len, seed=1), separator=ord("\n"),
        token_budget=args.token_budget, max_len=args.seq_len, min_len=args.min_len,
        row_multiple=args.microbatches, seed=2,
    )
    batches = [buckets.next_batch() for _ in range(args.steps)]
    lengths = [inputs.shape[1] for inputs, _ in batches]
    useful_tokens = sum(inputs.numel() for inputs, _ in batches)
    most_rows = max(inputs.shape[0] for inputs, _ in batches)
    mean_len = statistics.fmean(lengths)
    multiple = args.microbatches
    mean_rows = max(multiple, args.token_budget // round(mean_len) // multiple * multiple)

    adaptive = AdaptiveRunner(pipe, chooser())
    fixed_chooser = chooser()

    def fastest_or_leanest(rows: int, length: int) -> AdaptiveChoice:
        """The fastest choice that fits; where none does, the leanest (it runs over the limit)."""
        try:
            return fixed_chooser.ranked(rows, length)[0]
        except BatchTooLong as error:
            return error.leanest

    fixed: dict[str, AdaptiveChoice] = {
        "padded": fastest_or_leanest(most_rows, args.seq_len),
        "fixed-mean": fastest_or_leanest(mean_rows, round(mean_len)),
    }

    def predicted_peak(way: str) -> int:
        """The largest predicted peak (weights, gradients, optimizer state, activations) of a rank
        over the round's batches, as the way runs them."""
        peaks = []
        for inputs, _ in batches:
            rows, length = inputs.shape
            if way == "adaptive":
                peaks.append(adaptive.chooser.choose(rows, length).peak_memory)
                continue
            label = fixed[way].label
            length = args.seq_len if way == "padded" else length
            priced = fixed_chooser.priced(rows, length_bucket(length))
            peaks += [c.peak_memory for c in priced if c.label == label]
        return max(peaks)

    def use(choice: AdaptiveChoice) -> None:
        for stage in pipe.stages:
            stage.set_recompute(choice.recompute == "full")
        pipe.use_schedule(family_schedule(choice.schedule, args.ranks, choice.num_microbatches, 1))

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, args.seq_len - tensor.shape[1]))

    def run(way: str) -> tuple[float, int]:
        """(wall seconds, largest activation peak) of the round's batches."""
        if way != "adaptive":
            use(fixed[way])
        peak = 0
        dist.barrier()
        start = time.perf_counter()
        for inputs, targets in batches:
            if way == "adaptive":
                choice = adaptive.prepare(inputs)
            if way == "padded":
                inputs, targets = padded(inputs), padded(targets)
            if way == "fixed-mean" and inputs.shape[0] % fixed[way].num_microbatches:
                raise SystemExit(f"{inputs.shape[0]} rows do not split into {fixed[way].num_microbatches}")
            pipe.step(inputs, targets)
            for param in pipe.parameters():
                param.grad = None
            timeline = pipe.last_timeline
            assert timeline is not None
            if way == "adaptive":
                adaptive.finish(choice)
            peak = max(peak, *timeline.activation_bytes_peak)
        if way == "adaptive":
            adaptive.forget()  # the fixed ways switch the pipeline under the runner
        wall = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        return float(wall), peak

    for way in WAYS:  # warm-up: shapes traced once, the adaptive re-check runs its trials
        run(way)
    results: dict[str, list[tuple[float, int]]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            results[way].append(run(way))
    if dist.get_rank() == 0:
        summary: dict[str, Any] = {
            "lengths": lengths, "useful_tokens": useful_tokens,
            "choices": {
                "adaptive": adaptive.chooser.report(),
                **{way: choice.label for way, choice in fixed.items()},
            },
        }
        for way, runs in results.items():
            wall = sum(r[0] for r in runs)
            summary[way] = {
                "predicted_peak": predicted_peak(way),
                "tokens_per_s": useful_tokens * len(runs) / wall,
                "round_s": statistics.median(r[0] for r in runs),
                "activation_peak": max(r[1] for r in runs),
            }
        out.put(summary)
    dist.destroy_process_group()


def main() -> int:
    import multiprocessing as mp

    from pipefold.runtime.processes.launch import spawn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8, help="the most micro-batches a choice uses")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="the longest bucket (and the padded length)")
    parser.add_argument("--min-len", type=int, default=16, help="the shortest bucket")
    parser.add_argument("--median-len", type=int, default=24, help="the documents' median length")
    parser.add_argument("--num-docs", type=int, default=4000)
    parser.add_argument("--token-budget", type=int, default=2048, help="tokens per batch at most")
    parser.add_argument("--steps", type=int, default=12, help="batches per way per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed alternations of the three ways")
    parser.add_argument("--memory-limit", default="", help='bytes per rank for every choice, e.g. "3MiB"')
    args = parser.parse_args()
    out = mp.get_context("spawn").Queue()
    result = spawn(_rank, args.ranks, (args, out))
    if not result.ok:
        print(result.describe(), file=sys.stderr)
        return 1
    summary = out.get(timeout=60)
    lengths = summary["lengths"]
    print(f"batch lengths: {lengths} (mean {statistics.fmean(lengths):.0f}); "
          f"{summary['useful_tokens']} useful tokens per round")
    for row in summary["choices"]["adaptive"]:
        times = row["trial_s"] if row["settled"] else row["measured_s"]
        state = "re-check" if row["settled"] else "re-check not finished"
        print(f"adaptive: length <= {row['bucket']}, {row['rows']} rows, {row['steps']} steps -> "
              f"{row['choice']} ({state}: {', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in times.items())})")
    print(f"padded: {summary['choices']['padded']}; fixed-mean: {summary['choices']['fixed-mean']}")
    limit = f" (limit {args.memory_limit})" if args.memory_limit else ""
    print(f"| way | useful tokens/s | round s (median) | peak activation bytes counted (any rank, any step) "
          f"| predicted peak per rank{limit} |")
    print("|---|---|---|---|---|")
    for way in WAYS:
        s = summary[way]
        print(f"| {way} | {s['tokens_per_s']:.0f} | {s['round_s']:.2f} | {s['activation_peak']:,} "
              f"| {s['predicted_peak']:,} |")
    base = summary["adaptive"]["tokens_per_s"]
    for way in WAYS[1:]:
        print(f"| adaptive / {way} | {base / summary[way]['tokens_per_s']:.2f} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
