"""Fault injection: kill (SIGKILL) or stop (SIGSTOP) one rank at every action kind.

For 1f1b (a flush schedule) and zb-h1 (zero bubble), at 2 and 4 ranks, one rank kills or
stops itself at F, B, I, W, a send, a receive, the optimizer step and the middle of a
checkpoint save (tests/runtime/_fault_cases.py). Each case must end every process within
the bound (a killed rank is noticed in under a second, a stopped one within the pipeline's
`timeout_s`), every surviving rank's error must name the victim's rank, stage, micro-batch
and action, no `/dev/shm` file of the case may remain, and the latest checkpoint must load
and hold the weights of the one-process reference after the step it records.

Starting ranks costs seconds (torch's import), so the ranks are forked from a fork server
that imported torch and pipefold once, and the cases run a few at a time (a stopped case
mostly waits out its timeout). `python tests/runtime/test_faults.py` runs the suite and
prints the table of docs/reliability.md.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fault_cases  # noqa: E402

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]

SCHEDULES = ("1f1b", "zb-h1")
RANKS = (2, 4)
KIND_NAMES = ("F", "B", "I", "W", "send", "receive", "optimizer step", "checkpoint save")
KILL_TIMEOUT_S = 30.0
"""The pipeline's timeout in kill cases: a killed rank must be noticed long before it."""
STOP_TIMEOUT_S = 3.0
"""The pipeline's timeout (and the process group's) in stop cases: what bounds their detection."""
KILL_BOUND_S = 1.0
STOP_SLACK_S = 1.5
"""A stopped rank is named within `STOP_TIMEOUT_S` plus this (the poll, a loaded host)."""
SAVE_STOP_BOUND_S = 4 * STOP_TIMEOUT_S
"""A rank stopped in a checkpoint save leaves the others in gloo collectives, whose timeout
applies to each of their transfers, not to the whole collective: typically named after one
timeout (3.0 s), once after 9.8 s on a host at load average 32."""
CONCURRENT = 4
"""Cases run at once: their ranks mostly wait (on a kill's detection or a stop's timeout)."""
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Case:
    schedule: str
    num_ranks: int
    kind: str
    how: str  # "kill" or "stop"

    @property
    def name(self) -> str:
        return f"{self.schedule}-{self.num_ranks}-{self.kind.replace(' ', '_')}-{self.how}"


def applies(schedule: str, kind: str) -> bool:
    """Whether `schedule` has actions of `kind` (1f1b has no split backward: no I, no W)."""
    if kind not in _fault_cases.KINDS:
        return True
    from pipefold.schedule import build, lower  # noqa: PLC0415

    program = lower(build(schedule, num_ranks=2, num_microbatches=_fault_cases.NUM_MICROBATCHES))
    return any(a.op in _fault_cases.KINDS[kind] for row in program.instructions for a in row)


def plan() -> list[Case]:
    """Every (schedule, ranks, kind) killed; every kind stopped too, for each schedule at one size."""
    cases = []
    for schedule in SCHEDULES:
        for num_ranks in RANKS:
            for kind in KIND_NAMES:
                if not applies(schedule, kind):
                    continue
                cases.append(Case(schedule, num_ranks, kind, "kill"))
                stop_at = 4 if schedule == "zb-h1" else 2
                if num_ranks == stop_at:
                    cases.append(Case(schedule, num_ranks, kind, "stop"))
    return cases


@dataclass
class Outcome:
    case: Case
    at: str | None = None
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    fault_time: float | None = None
    ended_s: float | None = None
    """Seconds from the fault until every process of the case had ended."""
    leftover_files: list[str] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    directory: Path = Path()

    @property
    def victim(self) -> int:
        return _fault_cases.victim_of(self.case.num_ranks)

    @property
    def survivors(self) -> dict[int, dict[str, Any]]:
        return {r: rec for r, rec in self.records.items() if r != self.victim}

    @property
    def detection_s(self) -> float | None:
        """Seconds from the fault until the last survivor raised."""
        if self.fault_time is None or len(self.survivors) != self.case.num_ranks - 1:
            return None
        return max(rec["time"] for rec in self.survivors.values()) - self.fault_time


class _Running:
    def __init__(self, context: Any, case: Case, root: Path) -> None:
        self.case = case
        self.directory = root / case.name
        self.directory.mkdir()
        self.job = secrets.token_hex(6)
        timeout_s = KILL_TIMEOUT_S if case.how == "kill" else STOP_TIMEOUT_S
        init_file = str(self.directory / "rendezvous")
        self.processes = [
            context.Process(
                target=_fault_cases.run,
                args=(rank, case.num_ranks, init_file, str(self.directory)),
                kwargs=dict(
                    schedule=case.schedule, kind=case.kind, how=case.how, timeout_s=timeout_s, job=self.job
                ),
                daemon=True,
            )
            for rank in range(case.num_ranks)
        ]
        for process in self.processes:
            process.start()
        self.started = time.monotonic()
        self.timeout_s = timeout_s

    def fault(self) -> tuple[float | None, str | None]:
        """When and where the victim failed (None, None: it never got there)."""
        path = self.directory / "fault.json"
        try:
            fault = json.loads(path.read_text())
            return float(fault["time"]), str(fault["at"])
        except (OSError, ValueError, KeyError):
            return None, None

    def settled(self) -> bool:
        """Whether every survivor has reported (or the case is hopelessly late)."""
        victim = _fault_cases.victim_of(self.case.num_ranks)
        reported = all(
            (self.directory / f"rank{r}.json").exists() for r in range(self.case.num_ranks) if r != victim
        )
        survivors_gone = all(
            not p.is_alive() for r, p in enumerate(self.processes) if r != victim
        )
        return reported or survivors_gone or time.monotonic() - self.started > 120

    def finish(self) -> Outcome:
        outcome = Outcome(self.case, directory=self.directory)
        victim = self.processes[_fault_cases.victim_of(self.case.num_ranks)]
        # The launcher's part: a stopped rank never ends by itself; it is killed once the others stopped.
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for process in self.processes:
            process.join(timeout=10)
        ended = time.time()
        outcome.exit_codes = [p.exitcode for p in self.processes]
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        outcome.fault_time, outcome.at = self.fault()
        if outcome.fault_time is not None:
            outcome.ended_s = ended - outcome.fault_time
        for rank in range(self.case.num_ranks):
            path = self.directory / f"rank{rank}.json"
            if path.exists():
                record = json.loads(path.read_text())
                outcome.records[rank] = record
        outcome.leftover_files = sorted(p.name for p in SHM.glob(f"pipefold-{self.job}-*"))
        return outcome


def run_cases(cases: list[Case], root: Path) -> dict[Case, Outcome]:
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: the meta-device trace of the first step imports it (seconds), so every case would.
    context.set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "pipefold.runtime", "_fault_cases"]
    )
    pending = list(cases)
    # Stopped cases wait out their timeout: start them first, beside the quick kills.
    pending.sort(key=lambda c: c.how != "stop")
    running: list[_Running] = []
    outcomes: dict[Case, Outcome] = {}
    while pending or running:
        while pending and len(running) < CONCURRENT:
            running.append(_Running(context, pending.pop(0), root))
        time.sleep(0.02)
        for item in [r for r in running if r.settled()]:
            running.remove(item)
            outcomes[item.case] = item.finish()
    return outcomes


def expected_where(outcome: Outcome) -> str:
    """How the survivors must name the victim: rank, stage, micro-batch and action (or phase)."""
    at = outcome.at or "?"
    if outcome.case.kind in _fault_cases.KINDS:
        from pipefold.schedule import Action  # noqa: PLC0415

        action = Action.parse(at)
        return f"rank {outcome.victim}, stage {action.stage}, micro-batch {action.microbatch} failed at {at}"
    return f"rank {outcome.victim} failed at {at}"


def checkpoint_problem(directory: Path, reference: dict[str, Any]) -> str | None:
    """None when the case's checkpoint loads into one process and equals the reference after step 1."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    from pipefold.runtime import Pipeline, load_checkpoint  # noqa: PLC0415
    from pipefold.runtime.options import LayoutOptions  # noqa: PLC0415

    pipe = Pipeline(
        _fault_cases.layers(), loss_fn=F.mse_loss, schedule="gpipe",
        num_microbatches=_fault_cases.NUM_MICROBATCHES, layout=LayoutOptions(seed=1),
    )
    try:
        info = load_checkpoint(pipe, directory / "checkpoint")
    except Exception as error:  # reported as the failure
        return f"{type(error).__name__}: {error}"
    if info.step != 1:
        return f"the latest checkpoint is of step {info.step}, not 1"
    for name, value in pipe.state_dict().items():
        torch.testing.assert_close(value, reference[name], msg=lambda m, n=name: f"{n}: {m}")
    return None


def one_process_reference() -> dict[str, Any]:
    """The weights after one step of the same model and batch on one process."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    from pipefold.runtime import Pipeline  # noqa: PLC0415
    from pipefold.runtime.options import LayoutOptions  # noqa: PLC0415

    pipe = Pipeline(
        _fault_cases.layers(), loss_fn=F.mse_loss, schedule="gpipe",
        num_microbatches=_fault_cases.NUM_MICROBATCHES, layout=LayoutOptions(seed=0),
    )
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
    inputs, targets = _fault_cases.batch()
    pipe.step(inputs, targets)
    optimizer.step()
    return {name: value.clone() for name, value in pipe.state_dict().items()}


def problems(outcome: Outcome, reference: dict[str, Any]) -> list[str]:
    """What the case did wrong (empty: it passed)."""
    case, found = outcome.case, []
    if outcome.fault_time is None:
        return [f"the fault never fired; records: {outcome.records}"]
    bound = KILL_BOUND_S if case.how == "kill" else STOP_TIMEOUT_S + STOP_SLACK_S
    if case.how == "stop" and case.kind == "checkpoint save":
        bound = SAVE_STOP_BOUND_S
    detection = outcome.detection_s
    if detection is None:
        found.append(f"not every survivor reported: {outcome.records}")
    elif detection > bound:
        found.append(f"detected after {detection:.2f}s (bound {bound}s)")
    if any(code is None for code in outcome.exit_codes):
        found.append(f"a process did not end: exit codes {outcome.exit_codes}")
    where = expected_where(outcome)
    for rank, record in outcome.survivors.items():
        if record.get("error") != "PeerFailure" or where not in record.get("message", ""):
            raised = f"{record.get('error')}: {record.get('message')!r}"
            found.append(f"rank {rank} raised {raised}; expected {where!r}")
        elif record.get("failed_rank") != outcome.victim:
            found.append(f"rank {rank}'s failed_rank is {record.get('failed_rank')}, not {outcome.victim}")
    if outcome.leftover_files:
        found.append(f"left in /dev/shm: {outcome.leftover_files}")
    checkpoint = checkpoint_problem(outcome.directory, reference)
    if checkpoint is not None:
        found.append(f"checkpoint: {checkpoint}")
    return found


CASES = plan()


@pytest.fixture(scope="module")
def outcomes():
    with tempfile.TemporaryDirectory(prefix="pipefold-faults-") as root:
        started = time.monotonic()
        results = run_cases(CASES, Path(root))
        print(f"\nfault suite: {len(CASES)} cases in {time.monotonic() - started:.1f}s")
        reference = one_process_reference()
        yield {case: (outcome, problems(outcome, reference)) for case, outcome in results.items()}


def test_every_kind_schedule_and_size_is_tried():
    tried = {(c.schedule, c.num_ranks, c.kind) for c in CASES}
    spared = {
        (schedule, kind)
        for schedule in SCHEDULES
        for num_ranks in RANKS
        for kind in KIND_NAMES
        if (schedule, num_ranks, kind) not in tried
    }
    # Only kinds a schedule has no action of: 1f1b never splits its backward; zb-h1 (unfused)
    # always does.
    assert spared == {("1f1b", "I"), ("1f1b", "W"), ("zb-h1", "B")}
    assert not any(applies(schedule, kind) for schedule, kind in spared)
    assert {c.how for c in CASES} == {"kill", "stop"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_failed_rank_is_named_and_everything_ends(outcomes, case):
    outcome, found = outcomes[case]
    assert not found, f"{case.name}: " + "; ".join(found)


def table(outcomes: dict[Case, tuple[Outcome, list[str]]]) -> str:
    """The markdown table of docs/reliability.md, "Fault injection"."""
    lines = [
        "| schedule | ranks | fault | at (victim's action) | survivors raised after | all ended after "
        "| outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        outcome, found = outcomes[case]
        detection = "-" if outcome.detection_s is None else f"{outcome.detection_s:.2f} s"
        ended = "-" if outcome.ended_s is None else f"{outcome.ended_s:.2f} s"
        verdict = "ok" if not found else "FAILED: " + "; ".join(found)
        lines.append(
            f"| {case.schedule} | {case.num_ranks} | {'SIGKILL' if case.how == 'kill' else 'SIGSTOP'} rank "
            f"{outcome.victim} | {outcome.at} | {detection} | {ended} | {verdict} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="pipefold-faults-") as root:
        started = time.monotonic()
        results = run_cases(CASES, Path(root))
        wall = time.monotonic() - started
        reference = one_process_reference()
        judged = {case: (outcome, problems(outcome, reference)) for case, outcome in results.items()}
    print(table(judged))
    print(f"\n{len(CASES)} cases in {wall:.1f}s")
    example = next(o for o, f in judged.values() if o.case.how == "stop" and o.survivors)
    print("\nexample message:", next(iter(example.survivors.values())).get("message"))
