"""Render a results document (benchmarks/results/*.json) as the BENCHMARKS.md body, with plots.

    markdown = render_markdown(document, plots_dir=Path("benchmarks/results/plots"),
                               plots_link="benchmarks/results/plots")

Pure formatting: no torch; matplotlib only inside `save_plots`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.breakdown import efficiency_breakdown
from pipefold.files import write_atomic
from pipefold.timeline import Timeline
from pipefold.viz import render_png

__all__ = ["render_markdown", "save_plots", "table"]

logger = logging.getLogger(__name__)

Record = dict[str, Any]


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:+.0%}"


def _mib(values: Sequence[int | None] | None) -> str:
    if not values or any(value is None for value in values):
        return "—"
    return " / ".join(f"{value / 2**20:.0f}" for value in values if value is not None)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _disturbed(record: Record) -> str:
    sides = record.get("sides", {})
    counts = [side.get("num_disturbed", 0) for side in sides.values()]
    totals = [len(side.get("samples_s", [])) for side in sides.values()]
    return f"{sum(counts)}/{sum(totals)}" if sum(totals) else "—"


def _has_deepspeed(records: Sequence[Record]) -> bool:
    return any("deepspeed_step_s" in record for record in records)


def _searched_label(record: Record) -> str:
    ran = record.get("searched_schedule")
    return "pipefold only, ran " + (f"`{ran}`" if ran else "?")


def _step_table(records: Sequence[Record]) -> str:
    deepspeed = _has_deepspeed(records)
    header = ["schedule (torch class)", "M", "pipefold s", "torch s", "ratio torch/pipefold"]
    if deepspeed:
        header += ["deepspeed s", "ratio ds/pipefold"]
    header += ["one process s", "eff. pipefold", "eff. torch"]
    if deepspeed:
        header += ["eff. deepspeed"]
    header += [
        "predicted s", "pred. error", "pred. (warm-up costs) s", "error", "spread pf / torch", "disturbed"
    ]
    rows = []
    for record in records:
        if record.get("skipped"):
            continue
        row = [
            f"{record['schedule']} ({record['peer_schedule'] or _searched_label(record)})",
            str(record["microbatches"]),
            _seconds(record["pipefold_step_s"]),
            _seconds(record["peer_step_s"]),
            _ratio(record["ratio"]),
        ]
        if deepspeed:
            row += [_seconds(record.get("deepspeed_step_s")), _ratio(record.get("deepspeed_ratio"))]
        row += [
            _seconds(record.get("single_process_s")),
            _ratio(record["efficiency"]),
            _ratio(record["peer_efficiency"]),
        ]
        if deepspeed:
            row += [_ratio(record.get("deepspeed_efficiency"))]
        row += [
            _seconds(record["predicted_step_s"]),
            _percent(record["prediction_error"]),
            _seconds(record.get("calibrated_predicted_step_s")),
            _percent(record.get("calibrated_prediction_error")),
            f"{_percent(record.get('pipefold_spread'))[1:]} / {_percent(record.get('peer_spread'))[1:]}",
            _disturbed(record),
        ]
        rows.append(row)
    return table(header, rows)


def _memory_table(records: Sequence[Record]) -> str:
    header = [
        "schedule",
        "M",
        "peak RSS pipefold (MiB/rank)",
        "peak RSS torch (MiB/rank)",
        "activations counted (MiB/rank)",
        "activations predicted (MiB/rank)",
    ]
    rows = []
    for record in records:
        sides = record.get("sides", {})
        if record.get("skipped"):
            continue
        rows.append(
            [
                record["schedule"],
                str(record["microbatches"]),
                _mib(sides.get("pipefold", {}).get("peak_rss_bytes")),
                _mib(sides.get("torch", {}).get("peak_rss_bytes")),
                _mib(sides.get("pipefold", {}).get("activation_bytes_peak")),
                _mib(record.get("predicted_activation_bytes_peak")),
            ]
        )
    return table(header, rows)


def _overhead_table(records: Sequence[Record]) -> str:
    header = ["schedule", "ranks", "M", "actions/rank", "pipefold µs/action", "torch µs/action", "ratio"]
    rows = []
    for record in records:
        pf, peer = record.get("pipefold_per_action_s"), record.get("peer_per_action_s")
        rows.append(
            [
                record["schedule"],
                str(record["ranks"]),
                str(record["microbatches"]),
                str(record.get("actions_per_rank") or "—"),
                "—" if pf is None else f"{pf * 1e6:.0f}",
                "—" if peer is None else f"{peer * 1e6:.0f}",
                _ratio(record["ratio"]),
            ]
        )
    return table(header, rows)


def _breakdown_table(records: Sequence[Record]) -> str:
    """Per workload, ranks and M: 1F1B and the most efficient row, efficiency factored."""
    factors = ("efficiency", "inflation", "balance", "busy", "span_per_step")
    header = ["workload", "ranks", "M", "schedule", *factors[:-1], "span / step"]
    rows = []
    groups = dict.fromkeys((r["workload"], r["ranks"], r["microbatches"]) for r in records)
    for workload, num_ranks, num_microbatches in groups:
        chosen = [
            r for r in records
            if (r["workload"], r["ranks"], r["microbatches"]) == (workload, num_ranks, num_microbatches)
            and r.get("efficiency") is not None
        ]
        if not chosen:
            continue
        best = max(chosen, key=_efficiency_key)
        shown = [r for r in chosen if r["schedule"] == "1f1b" and r is not best] + [best]
        for record in shown:
            parts = efficiency_breakdown(record)
            if parts is None:
                continue
            rows.append(
                [workload, str(num_ranks), str(num_microbatches), record["schedule"]]
                + [_ratio(parts[key]) for key in factors]
            )
    return table(header, rows) if rows else ""


def _baseline_table(document: dict[str, Any], workload: str) -> str:
    base = document.get("baselines", {}).get(workload)
    if not base:
        return ""
    rows = [
        [f"1 process, 1 thread, M={m} accumulated", _seconds((entry.get("step_s") or {}).get("median"))]
        for m, entry in sorted(base["accumulate"].items(), key=lambda item: int(item[0]))
    ]
    full = base.get("full_batch") or {}
    threads = full.get("num_threads", "?")
    full_s = (full.get("step_s") or {}).get("median")
    rows.append([f"1 process, {threads} threads, full batch", _seconds(full_s)])
    return table(["baseline (timed before the ranks started)", "step s (median)"], rows)


def _skipped(records: Sequence[Record]) -> list[str]:
    lines = []
    for record in records:
        sides = record.get("sides", {})
        errors = {label: side["error"] for label, side in sides.items() if side.get("error")}
        if errors:
            detail = "; ".join(f"{label}: {error}" for label, error in errors.items())
            where = (
                f"{record['workload']} {record['schedule']} "
                f"p={record['ranks']} M={record['microbatches']}"
            )
            lines.append(f"- {where}: {detail}")
    return lines


_METHOD = """\
How these numbers are made (`benchmarks/harness/`):

- Both libraries run the same 8 layers (`benchmarks/harness/workloads.py`), cut evenly into
  ranks x virtual stages, with the same stage-to-rank layout per pair: contiguous for GPipe,
  1F1B and zero-bubble; looped (rank r owns r, r+p) for interleaved 1F1B and looped BFS;
  V-shaped (rank r owns r and 2p-1-r) for ZB-V and DualPipeV. The transformer's embedding is
  fused into layer 0 and its final LayerNorm + head into layer 7, so 8 layers split evenly.
- Zero-bubble: torch's `ScheduleInterleavedZeroBubble` with one stage per rank against
  pipefold's `zb-h1` (the closest equivalent: ZB-H1 order, backward split into I and W).
- pipefold-only rows: *auto* (contiguous layout) and *auto-v* (V layout) run the schedule
  pipefold tunes for this model on these ranks (`pipefold.runtime.tune_schedule`: three
  probe steps time every stage's F, B, I and W, the link and the runtime's overheads;
  `find_schedule` searches from those costs; a measured trial, 2 to 6 alternating rounds, then
  keeps the fastest of the searched schedule and the two best families of its layout, named in
  the row: `auto` is the searched one). torch has no counterpart, so they have no ratio and do
  not count in the ratio medians; they count for the best efficiency.
- One set of spawned ranks (gloo on 127.0.0.1, 1 torch thread each) runs every configuration;
  each library's gradients are checked against one process (`assert_close`) before it is
  timed; then, after warm-up, the libraries alternate step by step (A B A B). A step's time is
  the slowest rank's, between two barriers. Tables give medians; *spread* is the interquartile
  range relative to the median. *ratio* = torch / pipefold, above 1 means pipefold is faster.
- Efficiency = t(one process, 1 thread, same M accumulated) / (ranks x t(pipeline)); 1.0 is ideal.
  On CPU, micro-batching itself costs about as much as the bubble, hence this baseline. It is
  timed on rank 0 as a third side of the alternation (pipefold, torch, one process, ...) while
  the other ranks wait, so it sees the same machine as the pipelines (this one drifts by 10-30%
  within minutes); the table of baselines per workload is the same work timed before the ranks
  started, and feeds the profile-based prediction.
- Transport: pipefold sends boundary tensors between ranks on one host through shared memory
  (`pipefold/runtime/transport/shm.py`, its default on CPU); torch uses gloo's loopback sockets. Both run
  in the same processes, so process-wide settings apply to both: pipefold's `Pipeline` raises
  glibc's trim/mmap thresholds (`pipefold/runtime/processes/allocator.py`) and torch profits as well.
- Prediction: `pipefold.simulate` with per-stage F/B/I/W costs from a per-layer profile of the
  one-process run, scaled so that its one-process step equals the measured baseline; error =
  predicted / measured pipefold step - 1. It cannot see that two ranks on two cores slow each
  other, or that the cores differ in speed. *pred. (warm-up costs)* simulates the same schedule
  with each stage's costs, the message latency and the runtime's overheads (the gap between
  two actions, the time a step spends outside its actions) measured in pipefold's latest
  untimed steps (the gradient check and the warm-up steps; `measured_cost_model`, what
  `pipefold train` reports), then compares with the timed steps. Where ranks outnumber the
  cores, both predictions let the ranks computing at once share the cores fairly
  (`CostModel.num_cores`, docs/decisions.md, "shared cores").
- Memory: peak RSS is the rank process's high-water mark during each library's timed steps
  (reset before each step). Both libraries share the process, whose RSS is mostly torch itself
  and allocator caches that are not returned to the OS, so the two columns are close by
  construction; the per-library comparison is the activation bytes pipefold counts (saved-tensor
  hooks) against the simulator's prediction.
- Quiet gate: rank 0 reads /proc/stat around every timed step; CPU time the machine spent
  beyond the ranks' own (`process_time`) is other load. A step where that exceeds the threshold
  is retaken (up to the retry limit) and, if still disturbed, kept and counted in *disturbed*.
"""


def _median_of(values: Sequence[float | None]) -> float | None:
    kept = sorted(v for v in values if v is not None)
    if not kept:
        return None
    middle = len(kept) // 2
    return kept[middle] if len(kept) % 2 else (kept[middle - 1] + kept[middle]) / 2


def _efficiency_key(record: Record) -> float:
    return float(record["efficiency"] or 0.0)


def _peer_efficiencies(rows: Sequence[Record], num_microbatches: int) -> list[float]:
    return [r["peer_efficiency"] or 0.0 for r in rows if r["microbatches"] == num_microbatches]


def _summary(records: Sequence[Record]) -> list[str]:
    """One bullet per rank count: speed against torch, efficiency, prediction error."""
    lines = []
    for num_ranks in sorted({r["ranks"] for r in records}):
        measured = [r for r in records if r["ranks"] == num_ranks and r.get("efficiency") is not None]
        # The ratio and the medians are over the pairs; the best efficiency also counts
        # pipefold's searched rows (auto, auto-v), which torch has no counterpart for.
        chosen = [r for r in measured if r.get("ratio") is not None]
        if not chosen:
            continue
        ratios = [float(r["ratio"]) for r in chosen]
        faster = sum(ratio > 1 for ratio in ratios)
        line = (
            f"- **{num_ranks} ranks**: torch/pipefold step-time ratio median {_ratio(_median_of(ratios))} "
            f"(from {min(ratios):.2f} to {max(ratios):.2f}); pipefold faster in {faster} of {len(ratios)}."
        )
        for workload in dict.fromkeys(r["workload"] for r in chosen):
            rows = [r for r in chosen if r["workload"] == workload]
            candidates = [r for r in measured if r["workload"] == workload]
            best = {
                m: max((r for r in candidates if r["microbatches"] == m), key=_efficiency_key)
                for m in sorted({r["microbatches"] for r in candidates})
            }
            bests = ", ".join(
                f"M={m} {_ratio(r['efficiency'])} ({r['schedule']}; torch's best "
                f"{_ratio(max(_peer_efficiencies(rows, m), default=None))})"
                for m, r in best.items()
            )
            line += (
                f" {workload}: efficiency median {_ratio(_median_of([r['efficiency'] for r in rows]))} "
                f"(torch {_ratio(_median_of([r['peer_efficiency'] for r in rows]))}) "
                f"over the pairs, "
                f"best {bests}."
            )
        profile = [abs(r["prediction_error"]) for r in chosen if r.get("prediction_error") is not None]
        warm = [
            abs(r["calibrated_prediction_error"])
            for r in chosen
            if r.get("calibrated_prediction_error") is not None
        ]
        if profile:
            line += f" Median |prediction error|: {_percent(_median_of(profile))[1:]} from the profile"
            if warm:
                within = sum(error <= 0.10 for error in warm)
                line += (
                    f", {_percent(_median_of(warm))[1:]} from warm-up costs "
                    f"({within} of {len(warm)} within 10%)"
                )
            line += "."
        lines.append(line)
    return lines


def render_markdown(
    document: dict[str, Any], *, plots_link: str | None = None, plot_files: Sequence[str] = ()
) -> str:
    """The BENCHMARKS.md body for one results document."""
    machine = document.get("machine", {})
    options = document.get("options", {})
    records: list[Record] = list(document.get("records", []))
    parts = [
        "# Benchmarks: pipefold vs torch.distributed.pipelining",
        "",
        f"- Command: `{document.get('command') or 'python benchmarks/run.py'}`",
        f"- Date: {document.get('started', '?')} to {document.get('finished', '?')} (UTC)",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('num_cpus', '?')} CPUs, "
        f"{machine.get('memory_gib', '?')} GiB; {machine.get('platform', '?')}",
        f"- Software: Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}, "
        f"DeepSpeed {machine.get('deepspeed') or 'not installed (DS_BUILD_OPS=0 pip install deepspeed)'}",
        f"- Options: {options.get('warmup_steps', '?')} warm-up + "
        f"{options.get('timed_steps', '?')} timed steps per library, "
        f"quiet threshold {options.get('quiet_threshold', '?')}, "
        f"{options.get('quiet_max_retries', '?')} retakes",
        "",
        _METHOD,
    ]
    summary = _summary([r for r in records if r["workload"] != "tiny" and not r.get("skipped")])
    if summary:
        parts += ["## Summary", "", *summary, ""]
    breakdown = _breakdown_table(
        sorted(
            (r for r in records if r["workload"] != "tiny" and not r.get("skipped")),
            key=lambda r: (r["workload"], r["ranks"], r["microbatches"]),
        )
    )
    if breakdown:
        parts += [
            "## Where the efficiency goes",
            "",
            "Per workload and M, 1F1B and the most efficient row, their efficiency factored exactly "
            "(`benchmarks/harness/breakdown.py`, from pipefold's timeline of the last timed step): "
            "*inflation* = one-process time / the sum of every rank's action times (the same work "
            "running slower inside the pipeline); *balance* = that sum / (ranks x the busiest rank's); "
            "*busy* = the busiest rank's action time / the step's span (bubble and waits); "
            "*span / step* = the span / the median step (time outside the actions, and the last "
            "step against the median).",
            "",
            breakdown,
            "",
        ]
    main_records = [r for r in records if r["workload"] != "tiny"]
    for workload in dict.fromkeys(r["workload"] for r in main_records):
        parts += [f"## Workload: {workload}", "", _baseline_table(document, workload), ""]
        for num_ranks in sorted({r["ranks"] for r in main_records if r["workload"] == workload}):
            chosen = [r for r in main_records if r["workload"] == workload and r["ranks"] == num_ranks]
            chosen.sort(key=lambda r: (r["schedule"], r["microbatches"]))
            parts += [f"### {num_ranks} ranks", "", _step_table(chosen), ""]
            parts += [f"Memory, {num_ranks} ranks:", "", _memory_table(chosen), ""]
    overhead = [r for r in records if r["workload"] == "tiny"]
    if overhead:
        parts += [
            "## Per-action overhead",
            "",
            "A d=8 model with one sample per micro-batch, so compute is negligible: step time / "
            "compute actions per rank.",
            "",
            _overhead_table(overhead),
            "",
        ]
    if plot_files:
        parts += ["## Plots", ""]
        prefix = f"{plots_link.rstrip('/')}/" if plots_link else ""
        parts += [f"![{Path(name).stem}]({prefix}{name})" for name in plot_files]
        parts.append("")
    skipped = _skipped(records)
    if skipped:
        parts += ["## Not measured", "", *skipped, ""]
    return "\n".join(parts).rstrip() + "\n"


def _bar_chart(records: Sequence[Record], title: str, path: Path) -> None:
    # matplotlib only where a plot is drawn: the tables render without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{r['schedule']}\nM={r['microbatches']}" for r in records]
    series = [("pipefold", "pipefold_step_s"), ("torch", "peer_step_s")]
    if _has_deepspeed(records):
        series.append(("deepspeed", "deepspeed_step_s"))
    figure = Figure(figsize=(max(6.0, 0.6 * len(records) + 2), 4.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for index, (label, key) in enumerate(series):
        values = [r.get(key) or 0.0 for r in records]
        axes.bar([x + index * width for x in range(len(records))], values, width=width, label=label)
    axes.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(records))])
    # Long family names (interleaved-1f1b) would run into their neighbours upright.
    axes.set_xticklabels(labels, fontsize=7, rotation=35, ha="right", rotation_mode="anchor")
    axes.set_ylabel("step time (s, median)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(str(path))


def save_plots(document: dict[str, Any], plots_dir: Path) -> list[str]:
    """Write the PNGs into `plots_dir`; returns their file names, in report order."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in document.get("records", []) if not r.get("skipped")]
    names = []
    for workload in dict.fromkeys(r["workload"] for r in records):
        for num_ranks in sorted({r["ranks"] for r in records if r["workload"] == workload}):
            chosen = [r for r in records if r["workload"] == workload and r["ranks"] == num_ranks]
            chosen.sort(key=lambda r: (r["schedule"], r["microbatches"]))
            name = f"step_time_{workload}_p{num_ranks}.png"
            _bar_chart(chosen, f"{workload}, {num_ranks} ranks: step time per schedule", plots_dir / name)
            names.append(name)
    compare = _timeline_pair(records)
    if compare is not None:
        record, measured, predicted = compare
        name = (
            f"timeline_{record['workload']}_{record['schedule']}"
            f"_p{record['ranks']}_m{record['microbatches']}.png"
        )
        write_atomic(plots_dir / name, render_png(measured, compare=predicted))
        names.append(name)
    return names


def _timeline_pair(records: Sequence[Record]) -> tuple[Record, Any, Any] | None:
    """The first record with both a measured pipefold timeline and a predicted one (1F1B preferred)."""
    candidates = sorted(records, key=lambda r: (r["schedule"] != "1f1b", r["workload"] == "tiny"))
    for record in candidates:
        measured = record.get("sides", {}).get("pipefold", {}).get("timeline")
        predicted = record.get("predicted_timeline")
        if measured and predicted:
            return record, Timeline.from_json(measured), Timeline.from_json(predicted)
    return None
