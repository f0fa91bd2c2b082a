"""`pipefold plan --measure-top K`: train the plan's top K for a few steps each and pick the fastest.

    pipefold plan --profile --ranks 2 --batch-size 32 --measure-top 3              # 3 rounds of 6 steps
    pipefold plan --profile --ranks 2 --measure-top 5 --measure-steps 8 --measure-rounds 4 --json

The forecast ranks configurations the model cannot tell apart (on a CPU host the top 5 are
often forecast within a few % of each other and measure 30-60% apart), so this trains each of
the top K with `pipefold train` (the command `pipefold plan` prints for it, `--steps
--measure-steps`), alternated over `--measure-rounds` rounds so a change of the host's load
hits them alike, and ranks them by the median of their steps after the first two of each run.
The plan itself, its forecasts and its choice, stay the model's own; the measured fastest is
reported beside them and its train command printed. A searched order runs from a schedule file
written into a temporary folder (removed after). Only the model `pipefold train` builds can be
measured: the built-in GPT or a Hugging Face model, not a `--costs` file.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipefold.errors import ConfigError, PipefoldError
from pipefold.schedule.io import dumps

__all__ = ["MeasuredCandidate", "add_arguments", "check_arguments", "measure_top"]

WARMUP_STEPS = 2
"""Steps of each run left out: the first allocates and builds the executor's tables."""


@dataclass(frozen=True)
class MeasuredCandidate:
    """One of the plan's top candidates, trained."""

    rank: int
    """Its place in the plan's ranking, from 1 (the choice)."""
    forecast_s: float
    """The plan's step time for it."""
    measured_s: float
    """The median of its steps after the first `WARMUP_STEPS` of each run, over every round."""
    rounds_s: tuple[float, ...]
    """Each round's median step."""
    command: str
    """The `pipefold train` command that ran it (with a temporary schedule file for a searched order)."""

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "forecast_s": self.forecast_s, "measured_s": self.measured_s,
                "rounds_s": list(self.rounds_s), "command": self.command}


def add_arguments(parser: Any) -> None:
    """The flags of `--measure-top`."""
    parser.add_argument("--measure-top", type=int, default=0, metavar="K",
                        help="train the top K for a few steps each with pipefold train, alternated, and "
                        "report the measured ranking and fastest beside the forecast (default 0: off)")
    parser.add_argument("--measure-steps", type=int, default=6, metavar="N",
                        help=f"steps per run of --measure-top (default 6; the first {WARMUP_STEPS} are "
                        "left out)")
    parser.add_argument("--measure-rounds", type=int, default=3, metavar="N",
                        help="runs of each candidate of --measure-top, alternated (default 3)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad `--measure-*` values before anything is measured."""
    if args.measure_top < 0:
        raise ConfigError(f"--measure-top = {args.measure_top}; give a count >= 1 (0: off)")
    if args.measure_steps <= WARMUP_STEPS:
        raise ConfigError(
            f"--measure-steps = {args.measure_steps}; give more than {WARMUP_STEPS} (the first "
            f"{WARMUP_STEPS} steps of each run are left out)"
        )
    if args.measure_rounds < 1:
        raise ConfigError(f"--measure-rounds = {args.measure_rounds}; give a count >= 1")


def measure_top(
    args: argparse.Namespace, result: Any,
    words_of: Callable[[Any, str | None], list[str] | None],
) -> list[MeasuredCandidate]:
    """Train the first `args.measure_top` candidates of `result.top` (`words_of(candidate,
    schedule_file)` gives each one's `pipefold train` words), alternated; ordered as ranked."""
    candidates = list(result.top[: args.measure_top])
    with tempfile.TemporaryDirectory(prefix="pipefold-measure-") as folder:
        work = Path(folder)
        commands: list[list[str]] = []
        for rank, candidate in enumerate(candidates, start=1):
            schedule_file = None
            if candidate.is_searched_order:
                schedule_file = str(work / f"order{rank}.json")
                Path(schedule_file).write_text(dumps(candidate.order))
            words = words_of(candidate, schedule_file)
            if words is None:
                raise ConfigError(
                    f"--measure-top: pipefold train cannot run #{rank} ({candidate.describe()}) as planned "
                    "(a --costs file, a vocabulary other than train's, --megatron, or both recompute kinds); "
                    "plan the built-in GPT (--profile) or a Hugging Face model, or drop --measure-top"
                )
            commands.append(words)
        steps: list[list[float]] = [[] for _ in candidates]
        rounds: list[list[float]] = [[] for _ in candidates]
        for round_index in range(args.measure_rounds):
            for index, words in enumerate(commands):
                seconds = _train(words, args, work / f"r{round_index}c{index}")
                steps[index] += seconds
                rounds[index].append(statistics.median(seconds))
                print(f"measure round {round_index + 1}/{args.measure_rounds} #{index + 1}: "
                      f"{statistics.median(seconds) * 1e3:.0f} ms per step", file=sys.stderr)
    return [
        MeasuredCandidate(rank=index + 1, forecast_s=candidate.step_time,
                          measured_s=statistics.median(steps[index]), rounds_s=tuple(rounds[index]),
                          command=shlex.join(commands[index]))
        for index, candidate in enumerate(candidates)
    ]


def _train(words: Sequence[str], args: argparse.Namespace, out: Path) -> list[float]:
    """Run `pipefold train` (`words` from "pipefold train") for `--measure-steps`; its step
    seconds after the warm-up."""
    import json

    command = [sys.executable, "-m", "pipefold", *words[1:], "--steps", str(args.measure_steps),
               "--out", str(out), "--device", args.device, "--set", "sample_tokens=0",
               "--set", "eval_every=0"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    summary = out / "summary.json"
    if done.returncode != 0 or not summary.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PipefoldError(
            f"--measure-top: {shlex.join(words)} failed (exit {done.returncode}): " + " | ".join(tail)
        )
    seconds: list[float] = json.loads(summary.read_text())["step_seconds"][WARMUP_STEPS:]
    return seconds


def measured_text(measured: Sequence[MeasuredCandidate], args: argparse.Namespace) -> str:
    """The measured ranking beside the forecast, and the measured fastest's command."""
    fastest = min(measured, key=lambda m: m.measured_s)
    lines = [
        f"measured: each of the top {len(measured)} trained {args.measure_rounds} x {args.measure_steps} "
        "steps "
        f"(alternated; the median step after the first {WARMUP_STEPS} of each run). The forecast and the "
        "choice above are the model's own; the measured fastest is the one to run here:"
    ]
    for m in measured:
        spread = f"{min(m.rounds_s) * 1e3:.0f}-{max(m.rounds_s) * 1e3:.0f}"
        mark = "  <- measured fastest" if m is fastest else ""
        lines.append(f"  #{m.rank}: forecast {m.forecast_s * 1e3:.1f} ms, "
                     f"measured {m.measured_s * 1e3:.1f} ms "
                     f"(rounds {spread} ms, {m.forecast_s / m.measured_s - 1:+.0%} forecast error), "
                     f"{m.measured_s / fastest.measured_s - 1:+.1%} vs fastest{mark}")
    if fastest.rank != 1:
        lines.append("  the measured fastest is not the forecast's choice")
    return "\n".join(lines)
