"""`pipefold launch -n N -- script.py args…`: run a script as N local ranks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipefold.errors import ConfigError

_EPILOG = """\
Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT, as under torchrun; the script calls
pipefold.runtime.processes.launch.init_process_group_from_env() (gloo on CPU, NCCL on CUDA).
If a rank exits non-zero the others are stopped and the launcher exits non-zero.

Several machines: run torchrun on each node instead, e.g.
  torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
      --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 script.py args...
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a script as N local ranks (torchrun-style environment)",
        description="Spawn N worker processes of a Python script or module on this machine.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--ranks", type=int, default=2, help="number of worker processes (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per worker; 0 leaves torch's default (use on GPU hosts). Default 1",
    )
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when stopping workers")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: script.py args…, -m module args…, or any executable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipefold.runtime.processes.launch import launch_script

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0; got {args.threads}")
    result = launch_script(
        command, args.ranks, num_threads=args.threads or None, grace_s=args.grace
    )
    if not result.ok:
        print(f"pipefold launch: {result.describe()}", file=sys.stderr)
    return result.exit_code
