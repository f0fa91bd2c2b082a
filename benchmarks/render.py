"""Render benchmark results (benchmarks/results/*.json) as the BENCHMARKS.md body.

    python benchmarks/render.py benchmarks/results/full.json --out BENCHMARKS.md \
        --extra benchmarks/results/notes.md

Plots (PNG) go to benchmarks/results/plots/ (or --plots-dir) and are linked from the
markdown relative to the output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.report import render_markdown, save_plots  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON written by benchmarks/run.py")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write (e.g. BENCHMARKS.md)")
    parser.add_argument(
        "--plots-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "plots",
        help="where the PNGs go (default benchmarks/results/plots)",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="markdown to append after the generated sections (repeatable)",
    )
    args = parser.parse_args()
    document = json.loads(args.results.read_text())
    plot_files = [] if args.no_plots else save_plots(document, args.plots_dir)
    link = os.path.relpath(args.plots_dir.resolve(), args.out.resolve().parent)
    body = render_markdown(document, plots_link=link, plot_files=plot_files)
    for extra in args.extra:
        body = body.rstrip("\n") + "\n\n" + extra.read_text().strip("\n") + "\n"
    args.out.write_text(body)
    print(f"wrote {args.out} ({len(plot_files)} plots in {args.plots_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
