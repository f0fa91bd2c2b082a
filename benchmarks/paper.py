"""The planner beside Megatron-LM's published results: Narayanan et al., "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", SC'21 (GPT, s = 2048, V = 51200,
80 GB A100s, 8 per node): Table 1 and Figures 12, 13, 16 and 17.

    python benchmarks/paper.py                  # Table 1, every row, the paper's configuration pinned
    python benchmarks/paper.py --rows 1.7B 18.4B --search    # also the planner's own choice
    python benchmarks/paper.py --figures        # Table 1 and the sweeps of Figures 12, 13, 16, 17
    python benchmarks/paper.py --figures --matmul-from h100.toml   # Fig. 16 also on a measured curve

Every configuration is the one Megatron-LM's own scripts for the paper run (its repository,
examples/sc21/run_table_1.sh and run_figure_*.sh: t, p, micro-batch size, layers per virtual stage,
activation recomputation), pinned through `PlanOptions` and priced by `GptEstimate(megatron=True)`
on the a100-80gb preset (pipefold/plan/presets/a100-80gb.toml). TFLOP/s per GPU =
96 B s l h^2 (1 + s / 6h + V / 16 l h) / (step x GPUs), the paper's formula (it counts the
recomputed forward). For the figures, whose values the paper gives only as plots, the script
prints the paper's stated finding beside the prediction and checks whether the prediction shows
it; it does not compare against numbers read off a plot.

`--matmul-from FILE_OR_PRESET` takes the matrix-product efficiency curve of another hardware file
(one `pipefold profile --hardware` wrote on a GPU, say) and prices Figure 16 a third time on the
a100-80gb preset with that curve in place of its assumed one: the figure's trend hangs on how far
below peak a micro-batch of one sequence runs (docs/plan.md, "Figure 16, not reproduced"). The
curve is each product's share of its own file's peak, so an H100's measured shape stands in for
an A100's until one is measured; the column says which file it came from.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace

from pipefold.plan import NoFeasiblePlan, PlanOptions, plan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import Hardware, load_hardware

SEQ, VOCAB = 2048, 51200
HARDWARE = load_hardware("a100-80gb")
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    heads: int
    hidden: int
    layers: int


@dataclass(frozen=True)
class Row:
    name: str
    shape: Shape
    tensor: int
    pipeline: int
    gpus: int
    batch: int
    tflops: float
    """Published achieved TFLOP/s per GPU."""
    microbatch: int
    """Sequences per micro-batch (run_table_1.sh's MBS)."""
    virtual: int
    """Model chunks per pipeline rank: layers per rank / run_table_1.sh's layers per virtual stage
    (1: no interleaving)."""


# Table 1 of the paper (model size, heads, hidden, layers, t, p, GPUs, batch, TFLOP/s), with the
# micro-batch size and interleaving of run_table_1.sh.
ROWS = (
    Row("1.7B", Shape(24, 2304, 24), 1, 1, 32, 512, 137, 16, 1),
    Row("3.6B", Shape(32, 3072, 30), 2, 1, 64, 512, 138, 16, 1),
    Row("7.5B", Shape(32, 4096, 36), 4, 1, 128, 512, 142, 16, 1),
    Row("18.4B", Shape(48, 6144, 40), 8, 1, 256, 1024, 135, 8, 1),
    Row("39.1B", Shape(64, 8192, 48), 8, 2, 512, 1536, 138, 4, 1),
    Row("76.1B", Shape(80, 10240, 60), 8, 4, 1024, 1792, 140, 2, 3),
    Row("145.6B", Shape(96, 12288, 80), 8, 8, 1536, 2304, 148, 2, 2),
    Row("310.1B", Shape(128, 16384, 96), 8, 16, 1920, 2160, 155, 1, 2),
    Row("529.6B", Shape(128, 20480, 105), 8, 35, 2520, 2520, 163, 1, 3),
    Row("1008.0B", Shape(160, 25600, 128), 8, 64, 3072, 3072, 163, 1, 1),
)

# The figures' models, from the paper's text and run_figure_*.sh.
GPT3_175B = Shape(96, 12288, 96)   # Fig. 12: 96 layers, 96 heads, hidden 12288
GPT_162B = Shape(128, 20480, 32)   # Fig. 13: 32 layers (so p can be 32), 128 heads, hidden 20480
GPT_91B = Shape(128, 15360, 32)    # Fig. 16: run_figure_16.sh's NLS, HS, NAH
GPT_145B = Shape(96, 12288, 80)    # Fig. 17: 80 layers, 96 heads, hidden 12288


def model_flops(shape: Shape, batch: int) -> float:
    s, l, h = SEQ, shape.layers, shape.hidden
    return 96 * batch * s * l * h * h * (1 + s / (6 * h) + VOCAB / (16 * l * h))


def estimate(shape: Shape, hardware: Hardware = HARDWARE) -> GptEstimate:
    return GptEstimate(num_layers=shape.layers, d_model=shape.hidden, num_heads=shape.heads, seq_len=SEQ,
                       vocab_size=VOCAB, hardware=hardware, megatron=True)


@dataclass(frozen=True)
class Prediction:
    """The planner's prediction for one pinned configuration."""

    step_s: float
    tflops: float
    """Per GPU, by the paper's formula."""
    sequences_s: float
    peak_memory: int
    """Bytes on the fullest rank (the planner's memory model, without the hardware's reserve)."""
    fits: bool
    """Whether the peak fits the device's memory less the preset's reserve."""
    placed: str


def predict(shape: Shape, *, tensor: int, pipeline: int, gpus: int, batch: int, microbatch: int = 1,
            virtual: int = 1, recompute: str = "full", hardware: Hardware = HARDWARE) -> Prediction:
    """The planner's step for exactly this configuration (1F1B, interleaved where virtual > 1);
    an over-memory configuration is still priced (NoFeasiblePlan carries it), marked `fits=False`."""
    dp = gpus // (tensor * pipeline)
    options = PlanOptions(num_devices=gpus, num_ranks=pipeline, tensor_parallel=tensor, data_parallel=dp,
                          global_batch=batch, microbatches=batch // (dp * microbatch),
                          schedules=("interleaved-1f1b" if virtual > 1 else "1f1b",), virtual=virtual,
                          recompute="full" if recompute == "full" else "none", order_search_s=0, top=1,
                          hardware=hardware)
    try:
        choice, fits = plan(estimate(shape, hardware), options).choice, True
    except NoFeasiblePlan as error:
        choice, fits = error.fastest, False
    if choice.microbatch_rows != microbatch:
        raise AssertionError(f"pinned micro-batches of {microbatch}, the plan has {choice.microbatch_rows}")
    return Prediction(step_s=choice.step_time,
                      tflops=model_flops(shape, batch) / (choice.step_time * gpus) / 1e12,
                      sequences_s=batch / choice.step_time, peak_memory=choice.peak_memory, fits=fits,
                      placed=choice.placed)


def memory_text(prediction: Prediction) -> str:
    verdict = "" if prediction.fits else f" > {HARDWARE.usable_memory / GIB:.0f}: out of memory"
    return f"{prediction.peak_memory / GIB:.1f} GiB{verdict}"


def pinned(row: Row) -> Prediction:
    return predict(row.shape, tensor=row.tensor, pipeline=row.pipeline, gpus=row.gpus, batch=row.batch,
                   microbatch=row.microbatch, virtual=row.virtual)


def searched(row: Row) -> tuple[float, str]:
    options = PlanOptions(num_devices=row.gpus, global_batch=row.batch, max_tensor_parallel=8,
                          recompute_attention=True, order_search_s=0, top=1, hardware=HARDWARE)
    choice = plan(estimate(row.shape), options).choice
    own = model_flops(row.shape, row.batch) / (choice.step_time * row.gpus) / 1e12
    return own, f"{choice.degree_text}, {choice.describe()}"


def table_1(names: list[str] | None, search: bool) -> None:
    print("### Table 1\n")
    print("| model | t | p | GPUs | batch | micro-batch | v | published TFLOP/s | planner, paper's config "
          "| peak memory " + ("| planner's choice | its TFLOP/s " if search else "") + "| plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if search else "") + "---|")
    for row in ROWS:
        if names and row.name not in names:
            continue
        start = time.perf_counter()
        predicted = pinned(row)
        cells: list[object] = [row.name, row.tensor, row.pipeline, row.gpus, row.batch, row.microbatch,
                               row.virtual, row.tflops,
                               f"{predicted.tflops:.0f} ({predicted.tflops / row.tflops - 1:+.0%})",
                               memory_text(predicted)]
        if search:
            own, what = searched(row)
            cells += [what, f"{own:.0f} ({own / row.tflops - 1:+.0%})"]
        cells.append(f"{time.perf_counter() - start:.1f}")
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print()


# The figures' sweeps: each returns its rows of predictions, keyed by what the figure varies.

FIG12_BATCHES = (12, 24, 36, 48, 60)
FIG13_BATCHES = (32, 128)
FIG13_SPLITS = ((2, 32), (4, 16), (8, 8), (16, 4), (32, 2))
FIG16_BATCHES = (128, 512)
FIG16_MICROBATCHES = (1, 2, 4, 8)
FIG17_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FIG12_VIRTUAL = 4  # run_figure_12.sh: 2 layers per virtual stage, 96 / 12 = 8 layers per rank
WHAT_IF_HALF_FLOPS = 3e10
"""Fig. 16's what-if: a matmul curve at half its best efficiency at 3e10 FLOPs instead of the
preset's 1.5e9, i.e. one that still climbs at the sizes a micro-batch of 1 runs. Not a measurement:
it shows which assumption decides the figure's trend."""


def figure_12(batches: tuple[int, ...] = FIG12_BATCHES) -> dict[tuple[int, int], Prediction]:
    """(batch, v) -> prediction: GPT-3 175B, (t, p) = (8, 12), 96 GPUs, micro-batch 1, recomputed."""
    return {(batch, v): predict(GPT3_175B, tensor=8, pipeline=12, gpus=96, batch=batch, virtual=v)
            for batch in batches for v in (1, FIG12_VIRTUAL)}


def figure_13(batches: tuple[int, ...] = FIG13_BATCHES,
              splits: tuple[tuple[int, int], ...] = FIG13_SPLITS) -> dict[tuple[int, int, int], Prediction]:
    """(batch, t, p) -> prediction: 162.2B GPT on 64 GPUs, micro-batch 1, recomputed."""
    return {(batch, t, p): predict(GPT_162B, tensor=t, pipeline=p, gpus=64, batch=batch)
            for batch in batches for t, p in splits}


def figure_16(batches: tuple[int, ...] = FIG16_BATCHES, microbatches: tuple[int, ...] = FIG16_MICROBATCHES,
              hardware: Hardware = HARDWARE) -> dict[tuple[int, int], Prediction]:
    """(batch, micro-batch size) -> prediction: 91B GPT, (t, p) = (8, 8), 64 GPUs, recomputed."""
    return {(batch, b): predict(GPT_91B, tensor=8, pipeline=8, gpus=64, batch=batch, microbatch=b,
                                hardware=hardware)
            for batch in batches for b in microbatches}


def figure_17(batches: tuple[int, ...] = FIG17_BATCHES) -> dict[tuple[int, str], Prediction]:
    """(batch, "full" or "none") -> prediction: 145B GPT, (t, p) = (8, 16), 128 GPUs, micro-batch 1."""
    return {(batch, recompute): predict(GPT_145B, tensor=8, pipeline=16, gpus=128, batch=batch,
                                        recompute=recompute)
            for batch in batches for recompute in ("full", "none")}


def _holds(ok: bool) -> str:
    return "holds" if ok else "does NOT hold"


def print_figure_12(points: dict[tuple[int, int], Prediction]) -> None:
    v = FIG12_VIRTUAL
    print("### Figure 12: interleaved vs non-interleaved 1F1B, GPT-3 175B, (t, p) = (8, 12), 96 GPUs\n")
    print(f"Micro-batch 1, every stage recomputed; interleaved: v = {v} (2 layers per virtual stage).\n")
    print(f"| batch | 1F1B TFLOP/s | interleaved v={v} TFLOP/s | interleaved gain | peak memory 1F1B "
          "| peak memory interleaved |")
    print("|---|---|---|---|---|---|")
    batches = sorted({batch for batch, _ in points})
    gains = []
    for batch in batches:
        plain, inter = points[batch, 1], points[batch, v]
        gains.append(inter.tflops / plain.tflops - 1)
        print(f"| {batch} | {plain.tflops:.0f} | {inter.tflops:.0f} | {gains[-1]:+.0%} "
              f"| {memory_text(plain)} | {memory_text(inter)} |")
    wins = all(g > 0 for g in gains)
    shrinks = all(a >= b for a, b in zip(gains, gains[1:], strict=False))
    print(f"\nPaper: the interleaved schedule is faster (\"10+%\"), the gap closing as the batch grows. "
          f"Prediction: interleaved faster at every batch: {_holds(wins)}; gain at the smallest batch "
          f"{gains[0]:+.0%} (10+%: {_holds(gains[0] >= 0.10)}); gap shrinking with the batch "
          f"({gains[0]:+.0%} -> {gains[-1]:+.0%}): {_holds(shrinks)}.\n")


def print_figure_13(points: dict[tuple[int, int, int], Prediction]) -> None:
    print("### Figure 13: tensor vs pipeline parallelism, 162.2B GPT, 64 GPUs\n")
    print("Micro-batch 1, every stage recomputed, 1F1B. tp is placed inside a node first.\n")
    batches = sorted({batch for batch, _, _ in points})
    splits = sorted({(t, p) for _, t, p in points})
    print("| (t, p) | " + " | ".join(f"batch {b} TFLOP/s | peak memory" for b in batches) + " | placement |")
    print("|---|" + "---|---|" * len(batches) + "---|")
    for t, p in splits:
        cells = [f"({t}, {p})"]
        for batch in batches:
            point = points[batch, t, p]
            cells += [f"{point.tflops:.0f}", memory_text(point)]
        cells.append(points[batches[0], t, p].placed.split(": ", 1)[-1])
        print("| " + " | ".join(cells) + " |")
    verdicts = []
    for batch in batches:
        best = max(splits, key=lambda split: points[batch, split[0], split[1]].tflops)
        at_8 = next(points[batch, t, p].tflops for t, p in splits if t == 8)
        across = max(points[batch, t, p].tflops for t, p in splits if t > HARDWARE.devices_per_node)
        verdicts.append(f"batch {batch}: best (t, p) = {best} ({_holds(best[0] == 8)}); t across nodes at "
                        f"best {across / at_8:.0%} of t = 8")
    print("\nPaper: peak throughput when t equals the GPUs of a node (8); tp across nodes is much worse. "
          "Prediction: " + "; ".join(verdicts) + ".\n")


def print_figure_16(points: dict[tuple[int, int], Prediction],
                    what_if: dict[tuple[int, int], Prediction],
                    measured: tuple[str, dict[tuple[int, int], Prediction]] | None = None) -> None:
    print("### Figure 16: micro-batch size, 91B GPT, (t, p) = (8, 8), 64 GPUs\n")
    print("1F1B, every stage recomputed. What-if: the same with the matmul curve's half_flops at "
          f"{WHAT_IF_HALF_FLOPS:.0e} instead of the preset's {HARDWARE.matmul.half_flops:.1e} "
          "(an assumption, not a measurement)"
          + (f"; measured: the matmul curve of {measured[0]} (its share of its own peak)" if measured else "")
          + ".\n")
    batches = sorted({batch for batch, _ in points})
    sizes = sorted({b for _, b in points})
    extra = " | measured-curve TFLOP/s" if measured else ""
    columns = (f"batch {b} TFLOP/s | peak memory | what-if TFLOP/s{extra}" for b in batches)
    print("| micro-batch | " + " | ".join(columns) + " |")
    print("|---|" + ("---|---|---|---|" if measured else "---|---|---|") * len(batches))
    for size in sizes:
        cells = [str(size)]
        for batch in batches:
            cells += [f"{points[batch, size].tflops:.0f}", memory_text(points[batch, size]),
                      f"{what_if[batch, size].tflops:.0f}"]
            if measured:
                cells.append(f"{measured[1][batch, size].tflops:.0f}")
        print("| " + " | ".join(cells) + " |")
    best = {batch: _best(sizes, {b: points[batch, b].tflops for b in sizes}) for batch in batches}
    best_if = {batch: _best(sizes, {b: what_if[batch, b].tflops for b in sizes}) for batch in batches}
    print("\nPaper: the best micro-batch size is 2 for this model (bubble grows with it, kernel "
          "efficiency too). Prediction: best " + ", ".join(f"{best[b]} at batch {b}" for b in batches)
          + f" ({_holds(all(v == '2' for v in best.values()))}); with the what-if curve: best "
          + ", ".join(f"{best_if[b]} at batch {b}" for b in batches)
          + _measured_best(sizes, batches, measured) + ".\n")


def _measured_best(sizes: list[int], batches: list[int],
                   measured: tuple[str, dict[tuple[int, int], Prediction]] | None) -> str:
    if measured is None:
        return ""
    best = {batch: _best(sizes, {b: measured[1][batch, b].tflops for b in sizes}) for batch in batches}
    return ("; with the measured curve: best " + ", ".join(f"{best[b]} at batch {b}" for b in batches)
            + f" ({_holds(all(v == '2' for v in best.values()))})")


def _best(sizes: list[int], tflops: dict[int, float]) -> str:
    """The sizes within 0.5% of the fastest ("1 and 2" where they are level)."""
    top = max(tflops.values())
    return " and ".join(str(b) for b in sizes if tflops[b] >= top * 0.995)


def print_figure_17(points: dict[tuple[int, str], Prediction]) -> None:
    print("### Figure 17: activation recomputation, 145B GPT, (t, p) = (8, 16), 128 GPUs\n")
    print("1F1B, micro-batch 1; with recomputation every stage recomputes, without it none does.\n")
    print("| batch | with: sequences/s | with: peak memory | without: sequences/s | without: peak memory "
          "| without / with |")
    print("|---|---|---|---|---|---|")
    batches = sorted({batch for batch, _ in points})
    for batch in batches:
        full, none = points[batch, "full"], points[batch, "none"]
        print(f"| {batch} | {full.sequences_s:.2f} | {memory_text(full)} | {none.sequences_s:.2f} | "
              f"{memory_text(none)} | {none.sequences_s / full.sequences_s:.2f} |")
    small = points[batches[0], "none"].sequences_s / points[batches[0], "full"].sequences_s
    out = [b for b in batches if not points[b, "none"].fits]
    best_with = max(points[b, "full"].sequences_s for b in batches if points[b, "full"].fits)
    fitting = [points[b, "none"].sequences_s for b in batches if points[b, "none"].fits]
    best_without = max(fitting) if fitting else math.nan
    ratio_16 = best_with / max(points[b, "none"].sequences_s for b in batches if b < 16)
    peak = max(points[b, "none"].peak_memory for b in batches)
    flat = min(b for b in batches if points[b, "none"].peak_memory == peak)
    print(f"\nPaper: recomputation \"leads to up to 33% lower throughput\" at small batches, no run without "
          f"it at larger batches (out of memory), and with it the large batches reach up to 2x the best "
          f"throughput without. Prediction: without / with recomputation {small:.2f} at batch {batches[0]} "
          f"({_holds(small > 1.2)} if the paper's 33% is without / with - 1); "
          + (f"out of memory from batch {out[0]} ({_holds(True)})" if out else
             f"out of memory at no batch ({_holds(False)}: peak memory without recomputation stops growing "
             f"at batch {flat}, at {peak / GIB:.1f} GiB)")
          + f"; best with / best without that fits: {best_with / best_without:.2f}x "
          f"({_holds(best_with / best_without > 1.5)}); with the runs without recomputation cut at batch 8, "
          f"as an out-of-memory from 16 would: {ratio_16:.2f}x.\n")


def with_curve_of(source: str) -> Hardware:
    """The a100-80gb preset with the matrix-product curve of `source` (a preset or a file): its
    curve for the preset's dtype (bf16) where it measured one, else its default curve."""
    curve = load_hardware(source).matmul_for(HARDWARE.default_dtype)
    return replace(HARDWARE, matmul=curve, matmul_by_dtype={})


def figures(matmul_from: str | None = None) -> None:
    start = time.perf_counter()
    print_figure_12(figure_12())
    print_figure_13(figure_13())
    what_if = replace(HARDWARE, matmul=replace(HARDWARE.matmul, half_flops=WHAT_IF_HALF_FLOPS))
    measured = (matmul_from, figure_16(hardware=with_curve_of(matmul_from))) if matmul_from else None
    print_figure_16(figure_16(), figure_16(hardware=what_if), measured)
    print_figure_17(figure_17())
    print(f"(figures planned in {time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="model sizes to run (default: all)")
    parser.add_argument("--search", action="store_true", help="also the planner's own choice")
    parser.add_argument("--figures", action="store_true", help="also the sweeps of Figures 12, 13, 16 and 17")
    parser.add_argument("--matmul-from", metavar="FILE_OR_PRESET",
                        help="also price Figure 16 with this hardware file's matmul curve (with --figures)")
    args = parser.parse_args()
    if args.matmul_from and not args.figures:
        parser.error("--matmul-from prices Figure 16: add --figures")
    if args.matmul_from:
        with_curve_of(args.matmul_from)  # a bad file is refused before anything is planned
    print(f"hardware: {HARDWARE.name} ({HARDWARE.source})\n")
    table_1(args.rows, args.search)
    if args.figures:
        figures(args.matmul_from)


if __name__ == "__main__":
    main()
