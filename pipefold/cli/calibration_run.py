"""The process `pipefold plan --profile` starts for its calibration run (`pipefold.cli.plan_calibrate`):
`pipefold train`'s flags, then one launch of the ranks at several micro-batch counts
(`pipefold.job.calibration`).

    python -m pipefold.cli.calibration_run --result FILE --microbatches 8,4,2,32,32x1 --phase-steps 12 \\
        --split 1f1b+split --held gpipe --curve zb-h1 -- --ranks 2 --batch-size 128 --microbatches 32 \\
        --out DIR ...   # any train flags

`--microbatches` lists the sizes (`pipefold.job.calibration_size`): a count runs the whole batch
in that many micro-batches, COUNTxROWS runs COUNT micro-batches of ROWS rows (the batch's first
COUNT x ROWS rows); train's own `--microbatches` builds the pipeline for the most of them.

A process of its own, as `pipefold train` would be: the ranks' output and failures stay out of
the plan's (its `--json` goes to stdout).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipefold.errors import PipefoldError
from pipefold.job.calibration_size import parse_sizes

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipefold.cli.calibration_run")
    parser.add_argument("--result", required=True, help="the JSON file rank 0 writes")
    parser.add_argument("--microbatches", required=True,
                        help="sizes, the first the reference: a micro-batch count (the whole batch) or "
                        "COUNTxROWS (COUNT micro-batches of ROWS rows, a slice of the batch), "
                        "comma-separated")
    parser.add_argument("--phase-steps", type=int, required=True, help="steps per size")
    parser.add_argument("--split", metavar="FAMILY",
                        help="also run short blocks of this split-backward order at the first count: a "
                        "family (zb-h1) or FAMILY+split, its every B run as I then W (1f1b+split)")
    parser.add_argument("--held", metavar="FAMILY",
                        help="on a CPU host, also run short blocks of this family, holding more activations "
                        "(gpipe), at the first count")
    parser.add_argument("--curve", metavar="FAMILY",
                        help="on a CPU host, also run short blocks of this family, some of its ranks "
                        "holding a little more activations (zb-h1), at the first count")
    parser.add_argument("train", nargs=argparse.REMAINDER, help="-- then pipefold train's flags")
    args = parser.parse_args(argv)
    words = args.train[1:] if args.train[:1] == ["--"] else args.train
    from pipefold.cli.train import add_parser, config_from_args
    from pipefold.job.outdir import check_out_dir, resolve_out_dir

    train_parser = argparse.ArgumentParser(prog="pipefold")
    add_parser(train_parser.add_subparsers(dest="command"))
    try:
        config = resolve_out_dir(config_from_args(train_parser.parse_args(["train", *words])))
        check_out_dir(config)
        sizes = parse_sizes(args.microbatches)
        from pipefold.job.calibration import (
            build_graph_walk,
            calibration_worker,
            check_curve,
            check_held,
            check_sizes,
            check_split,
        )
        from pipefold.runtime.processes.launch import spawn

        check_sizes(config, sizes, args.phase_steps)
        check_split(config, args.split)
        check_held(config, args.held)
        check_curve(config, args.curve)
    except PipefoldError as error:
        print(f"calibration run: error: {error}", file=sys.stderr)
        return 2
    build_graph_walk(config, args.split)  # once per machine, before the ranks load it
    result = spawn(calibration_worker, config.schedule.num_processes,
                   (config, sizes, args.phase_steps, args.result, args.split, args.held, args.curve))
    if not result.ok:
        print(f"calibration run: {result.describe()}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
