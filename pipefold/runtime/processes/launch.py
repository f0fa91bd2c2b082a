"""Local launcher: N worker processes on this machine, rendezvous like torchrun.

    pipefold launch -n 4 -- train.py --steps 100        # a script, one process per rank
    pipefold launch -n 2 -- -m mypackage.job --flag     # a module
    spawn(fn, num_ranks=2, args=(config,))              # a picklable function, from Python

Every worker gets torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, so the same
script runs unchanged under `torchrun`. `init_process_group_from_env()` joins the
group with gloo on CPU or NCCL on CUDA. On CPU each worker uses one intra-op
thread by default (OMP_NUM_THREADS=1 and torch.set_num_threads), because N
workers on N cores each spawning a thread per core oversubscribe the machine.

Failure is bounded: when any worker exits non-zero the others get SIGTERM, then
SIGKILL after `grace_s`, and the result names the rank at the root of the failure
(a rank killed by a signal by the signal's name; otherwise the rank the workers' failure
notes blame, e.g. the stuck rank a pipeline waited on, see `write_failure_note`) and the
first failed rank's last error lines. Ctrl-C stops every worker the same way.

Several machines: use torchrun, which sets the same variables, e.g. on each node

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 train.py
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import multiprocessing
import multiprocessing.reduction
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Protocol

from pipefold.errors import ConfigError, PeerFailure, PipefoldError
from pipefold.runtime.processes.elastic import record_for_torchrun
from pipefold.runtime.processes.fork_server import launcher_output, rank_context
from pipefold.runtime.processes.janitor import start_janitor, sweep
from pipefold.runtime.processes.orphan import arm_orphan_guard, die_with_parent, die_with_supervisor
from pipefold.runtime.transport.shm import JOB_ENV, job_prefix

__all__ = [
    "LaunchResult",
    "free_port",
    "worker_env",
    "script_command",
    "launch_script",
    "spawn",
    "init_process_group_from_env",
    "is_loopback",
    "loopback_store",
    "signal_name",
    "write_failure_note",
    "FAILURE_NOTES_ENV",
]

logger = logging.getLogger(__name__)

_NUM_ERROR_LINES = 20
_POLL_S = 0.05


FAILURE_NOTES_ENV = "PIPEFOLD_FAILURE_NOTES"
"""The directory where a worker leaves its failure note (`write_failure_note`), set by the launcher."""


@dataclass(frozen=True)
class LaunchResult:
    """How a launch ended. `exit_code` 0 means every worker succeeded.

    `failed_rank` is the first rank seen to fail (by a signal: 128 + its number, as a shell
    reports it, and `signal_name`); `culprit` and `cause` the rank at the root of the failure
    and why, where the workers' notes tell (a peer failure names the rank it blames).
    """

    exit_code: int
    failed_rank: int | None = None
    error_lines: tuple[str, ...] = ()
    interrupted: bool = False
    signal_name: str | None = None
    culprit: int | None = None
    cause: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """One paragraph for the terminal: which rank is to blame, and how the first one ended."""
        if self.ok:
            return "all ranks finished"
        if self.interrupted:
            return "interrupted: all ranks stopped"
        how = (
            f"was killed by {self.signal_name}"
            if self.signal_name is not None
            else f"failed with exit code {self.exit_code}"
        )
        first = f"rank {self.failed_rank} {how}; the other ranks were stopped"
        if self.culprit is not None and self.culprit != self.failed_rank:
            said = self.cause or "named by the other ranks"
            head = f"{said} ({first})" if said.startswith(f"rank {self.culprit}") else (
                f"rank {self.culprit} failed: {said} ({first})"
            )
        elif self.cause is not None:
            head = f"rank {self.failed_rank} {how}: {self.cause}; the other ranks were stopped"
        else:
            head = first
        if not self.error_lines or self.cause is not None and len(self.error_lines) == 1:
            return head
        return head + f"\nlast lines of rank {self.failed_rank}:\n" + "\n".join(
            "  " + line for line in self.error_lines
        )


def write_failure_note(error: BaseException) -> None:
    """Leave this rank's failure for the launcher (no-op unless it set `FAILURE_NOTES_ENV`, or
    torchrun's `TORCHELASTIC_ERROR_FILE`: see pipefold/runtime/processes/elastic.py).

    The note holds the message and, for a pipeline failure, the world rank it blames
    (`PipelineError.failed_rank`), so the launcher's final message names the root cause,
    not whichever rank gave up first.
    """
    # Under torchrun: its error files, so that torchrun lists the culprit as the root cause.
    record_for_torchrun(error)
    directory = os.environ.get(FAILURE_NOTES_ENV)
    rank = os.environ.get("RANK")
    if not directory or rank is None:
        return
    note = {
        "type": type(error).__name__,
        "message": str(error),
        "failed_rank": getattr(error, "failed_rank", None),
    }
    try:
        Path(directory, f"rank{rank}.json").write_text(json.dumps(note), encoding="utf-8")
    except OSError:
        pass  # the launcher has gone (its directory with it): nobody to tell


def _read_notes(directory: str) -> dict[int, dict[str, Any]]:
    notes: dict[int, dict[str, Any]] = {}
    for path in Path(directory).glob("rank*.json"):
        try:
            notes[int(path.stem[len("rank") :])] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return notes


def _root_cause(first: int, code: int, notes: dict[int, dict[str, Any]]) -> tuple[int | None, str | None]:
    """(the rank to blame, why) from how the first failed rank ended and every rank's note."""
    if code < 0:
        return first, None  # a signal death leaves no note: it is the root
    note = notes.get(first)
    culprit = note.get("failed_rank") if note is not None else None
    if not isinstance(culprit, int):
        named = [n.get("failed_rank") for n in notes.values() if isinstance(n.get("failed_rank"), int)]
        culprit = max(set(named), key=named.count) if named else None
    if culprit is None:
        return None, None if note is None else str(note.get("message"))
    own = notes.get(culprit)
    if own is not None and own.get("failed_rank") in (None, culprit):
        return culprit, str(own.get("message"))  # the culprit's own words
    for source in (note, *notes.values()):
        if source is not None and source.get("failed_rank") == culprit:
            return culprit, str(source.get("message"))
    return culprit, None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def worker_env(rank: int, num_ranks: int, port: int, num_threads: int | None) -> dict[str, str]:
    """The variables torchrun would give `rank` (merged over the current environment)."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(num_ranks),
        "LOCAL_WORLD_SIZE": str(num_ranks),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


def _check_num_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise ConfigError(f"launch: num_ranks must be >= 1; got {num_ranks} (e.g. -n 2)")


class _Worker(Protocol):
    rank: int

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def error_lines(self) -> tuple[str, ...]: ...


class _ScriptWorker:
    """A subprocess whose stderr is copied to ours (prefixed with the rank) and its tail kept."""

    def __init__(self, rank: int, command: Sequence[str], env: dict[str, str]) -> None:
        self.rank = rank
        self._tail: collections.deque[str] = collections.deque(maxlen=_NUM_ERROR_LINES)
        parent_pid = os.getpid()
        arm_orphan_guard()  # resolve prctl here, not in the forked child
        self._process = subprocess.Popen(
            list(command),
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            # Only a prctl call between fork and exec (no locks, no imports), so it is safe
            # though the launcher has threads; see pipefold/runtime/processes/orphan.py.
            preexec_fn=lambda: die_with_parent(parent_pid),  # noqa: PLW1509
        )
        assert self._process.stderr is not None  # set by stderr=PIPE; narrows the type
        self._reader = threading.Thread(target=self._copy, args=(self._process.stderr,), daemon=True)
        self._reader.start()

    def _copy(self, stream: IO[str]) -> None:
        for line in stream:
            self._tail.append(line.rstrip("\n"))
            sys.stderr.write(f"[rank {self.rank}] {line}")
            sys.stderr.flush()

    def poll(self) -> int | None:
        return self._process.poll()

    def terminate(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()

    def error_lines(self) -> tuple[str, ...]:
        self._reader.join(timeout=1.0)
        return tuple(self._tail)


def _run_function(
    fn: Callable[..., object],
    rank: int,
    env: dict[str, str],
    num_threads: int | None,
    args: tuple[Any, ...],
    error_path: str,
    output: tuple[int, int] | None = None,
) -> None:
    if output is not None:
        # The launcher's stdout and stderr as they are now (a fork server's are those of when
        # it started, which a caller may have redirected since).
        sys.stdout.flush()
        sys.stderr.flush()
        for received, target in zip(output, (1, 2), strict=True):
            if received != target:  # a spawned rank receives them under their own numbers
                os.dup2(received, target)
                os.close(received)
    launcher = multiprocessing.parent_process()
    if launcher is not None and launcher.pid is not None and launcher.pid != os.getppid():
        die_with_supervisor(launcher.pid)  # forked from the fork server (orphan.py says why)
    else:
        die_with_parent()
    # The launcher's environment as it is now, not the server's from when it started.
    os.environ.clear()
    os.environ.update(env)
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    try:
        fn(*args)
    except PipefoldError as error:
        # Bad input found on the ranks (a checkpoint that does not fit the model, ...) or a
        # pipeline failure: the message names the field, value and fix, or the rank, stage,
        # micro-batch and action, and a traceback printed by every rank would bury it. Exit 1
        # without one; the supervisor prints the root cause.
        write_failure_note(error)
        Path(error_path).write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
        sys.exit(1)
    except BaseException as error:
        write_failure_note(error)
        Path(error_path).write_text(traceback.format_exc(), encoding="utf-8")
        raise


class _FunctionWorker:
    """A spawned process running fn(*args); an exception's traceback is kept in a file."""

    def __init__(
        self,
        rank: int,
        fn: Callable[..., object],
        args: tuple[Any, ...],
        env: dict[str, str],
        num_threads: int | None,
        error_dir: str,
    ) -> None:
        self.rank = rank
        self._error_path = os.path.join(error_dir, f"rank{rank}.err")
        self._process: multiprocessing.process.BaseProcess = rank_context().Process(  # type: ignore[attr-defined]
            target=_run_function,
            args=(fn, rank, env, num_threads, args, self._error_path, launcher_output()),
            name=f"pipefold-rank{rank}",
        )
        self._process.start()

    def poll(self) -> int | None:
        return self._process.exitcode

    def terminate(self) -> None:
        if self._process.exitcode is None:
            self._process.terminate()

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()

    def error_lines(self) -> tuple[str, ...]:
        try:
            text = Path(self._error_path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return ()
        return tuple(text.splitlines()[-_NUM_ERROR_LINES:])


def _stop(workers: Sequence[_Worker], grace_s: float) -> None:
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(worker.poll() is None for worker in workers):
        time.sleep(_POLL_S)
    for worker in workers:
        worker.kill()
    for worker in workers:
        # SIGKILL cannot be refused; this only reaps the process.
        while worker.poll() is None:
            time.sleep(_POLL_S)


def signal_name(code: int) -> str | None:
    """The signal's name for a negative exit code (Popen's and multiprocessing's way of saying
    "killed by a signal"); None for a plain exit code."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _supervise(workers: Sequence[_Worker], grace_s: float, notes_dir: str) -> LaunchResult:
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            for worker, code in zip(workers, codes, strict=True):
                if code is not None and code != 0:
                    name = signal_name(code)
                    logger.error(
                        "rank %d %s; stopping the other ranks",
                        worker.rank,
                        f"was killed by {name}" if name else f"exited with code {code}",
                    )
                    _stop(workers, grace_s)
                    culprit, cause = _root_cause(worker.rank, code, _read_notes(notes_dir))
                    return LaunchResult(
                        # A shell's convention for a signal death: 128 + the signal's number.
                        exit_code=code if code > 0 else 128 - code,
                        failed_rank=worker.rank,
                        error_lines=worker.error_lines(),
                        signal_name=name,
                        culprit=culprit,
                        cause=cause,
                    )
            if all(code == 0 for code in codes):
                return LaunchResult(exit_code=0)
            time.sleep(_POLL_S)
    except KeyboardInterrupt:
        _stop(workers, grace_s)
        return LaunchResult(exit_code=130, interrupted=True)


def script_command(argv: Sequence[str]) -> list[str]:
    """What one worker runs: `x.py args` and `-m module args` with this Python, anything else as is."""
    if not argv:
        raise ConfigError("launch: no command given; write e.g. pipefold launch -n 2 -- train.py")
    first = argv[0]
    if first == "-m" or first.endswith(".py"):
        return [sys.executable, *argv]
    return list(argv)


def launch_script(
    argv: Sequence[str], num_ranks: int, *, num_threads: int | None = 1, grace_s: float = 3.0
) -> LaunchResult:
    """Run `argv` (see `script_command`) as `num_ranks` workers and wait for all of them.

    `num_threads=None` leaves the workers' thread count to torch (use it on GPU hosts).
    """
    _check_num_ranks(num_ranks)
    command = script_command(argv)
    port = free_port()
    workers: list[_Worker] = []
    job = secrets.token_hex(6)
    with tempfile.TemporaryDirectory(prefix="pipefold-launch-") as notes_dir, _janitor(job):
        try:
            for rank in range(num_ranks):
                env = {
                    **os.environ,
                    **worker_env(rank, num_ranks, port, num_threads),
                    FAILURE_NOTES_ENV: notes_dir,
                    JOB_ENV: job,
                }
                workers.append(_ScriptWorker(rank, command, env))
        except OSError as error:
            _stop(workers, grace_s)
            raise ConfigError(f"launch: cannot start {command[0]!r}: {error}") from None
        return _supervise(workers, grace_s, notes_dir)


def spawn(
    fn: Callable[..., object],
    num_ranks: int,
    args: tuple[Any, ...] = (),
    *,
    num_threads: int | None = 1,
    grace_s: float = 3.0,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run `fn(*args)` in `num_ranks` fresh processes; `fn` must be importable by name.

    The processes are forked from a server that has imported torch (see `rank_context`), or
    spawned where the platform has no fork server.

    `env`: more variables for every worker (over the current environment and torchrun's).
    """
    _check_num_ranks(num_ranks)
    port = free_port()
    job = secrets.token_hex(6)
    with tempfile.TemporaryDirectory(prefix="pipefold-launch-") as error_dir, _janitor(job):
        workers: list[_Worker] = [
            _FunctionWorker(
                rank,
                fn,
                args,
                {
                    **os.environ,
                    **worker_env(rank, num_ranks, port, num_threads),
                    FAILURE_NOTES_ENV: error_dir,
                    JOB_ENV: job,
                    **(env or {}),
                },
                num_threads,
                error_dir,
            )
            for rank in range(num_ranks)
        ]
        return _supervise(workers, grace_s, error_dir)


@contextlib.contextmanager
def _janitor(job: str) -> Iterator[None]:
    """While the ranks of `job` run: a janitor that sweeps their /dev/shm files if this process
    dies; at a normal end (every rank stopped and reaped) the sweep happens here."""
    prefix = job_prefix(job)
    janitor = start_janitor(prefix)
    try:
        yield
    finally:
        removed = sweep(prefix)
        if removed:
            logger.info("removed %d shared-memory file(s) the stopped ranks left: %s", len(removed), removed)
        janitor.stop()


def is_loopback(address: str) -> bool:
    """Whether `address` (a MASTER_ADDR) names this host's loopback interface."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_store(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """The rendezvous store of a job whose ranks all run on this host.

    torch's own TCPStore server listens on every interface without authentication, so
    anyone on the network could write the job's keys (fake failure reports included).
    Here rank 0 binds the listening socket to `address` (a loopback address) itself and
    hands it to the server; the other ranks connect as clients.
    """
    from torch.distributed import TCPStore  # type: ignore[attr-defined]  # exported, not in __all__

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        try:
            return TCPStore(host, port, world_size, False, timeout)
        except Exception:
            raise PeerFailure(
                f"rank {rank}: the rendezvous store that rank 0 serves at {host}:{port} did not answer "
                f"within {timeout_s:g}s; rank 0 is stuck, stopped or did not start (its own output says "
                "why); raise the timeout if its start-up legitimately takes longer",
                failed_rank=0,
            ) from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(max(128, world_size))
    except OSError as error:
        listener.close()
        raise ConfigError(
            f"MASTER_PORT={port}: cannot listen on {host}:{port} ({error}); pick a free port"
        ) from None
    # The server owns the descriptor from here on and closes it when the store goes.
    fd = listener.detach()
    return TCPStore(
        host, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=fd
    )


def _pin_transports_to_loopback() -> None:
    """gloo and NCCL pick their interface from the host name; a local job keeps them on
    loopback too (unless the user already chose an interface)."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    if "lo" in names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def init_process_group_from_env(backend: str | None = None, timeout_s: float = 60.0) -> None:
    """Join the default process group from torchrun's variables (no-op when already joined).

    `backend=None` picks NCCL when CUDA is available, else gloo. Where MASTER_ADDR is a
    loopback address (`pipefold launch`, `pipefold train`, `torchrun --standalone` with
    its default) the rendezvous store listens on loopback only (`loopback_store`); under
    torchrun's agent, or with a routable MASTER_ADDR (several hosts), torch's store is
    used as is, and listens on every interface (README, "Security").
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [name for name in required if name not in os.environ]
    if missing:
        raise ConfigError(
            f"environment variable(s) {', '.join(missing)} not set: start this program with "
            "`pipefold launch -n N -- …` or `torchrun`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    address = os.environ["MASTER_ADDR"]
    # torchrun's agent serves the store itself (its workers only connect to it).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if is_loopback(address) and not agent_store:
        _pin_transports_to_loopback()
        store = loopback_store(address, int(os.environ["MASTER_PORT"]), rank, world_size, timeout_s)
        store.set(f"{_JOINED}/{rank}", "1")
        try:
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
        except Exception as error:
            raise _not_formed(rank, world_size, timeout_s, error, store) from None
        return
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as error:
        raise _not_formed(rank, world_size, timeout_s, error, None) from None


_JOINED = "pipefold/joined"
"""Store keys each rank sets before joining the process group, so a start-up timeout can say who
never arrived."""


def _not_formed(rank: int, world_size: int, timeout_s: float, error: Exception, store: Any) -> PeerFailure:
    """The start-up failure as one typed message naming the ranks that did not join, instead of
    torch's store timeout with its C++ frames."""
    missing: list[int] = []
    if store is not None:
        try:
            missing = [r for r in range(world_size) if not store.check([f"{_JOINED}/{r}"])]
        except Exception:  # the store went with rank 0
            missing = []
    if not missing:
        # gloo's and NCCL's rendezvous keys end in the rank they wait for ("keys: /0//cpu//0/2").
        text = str(error)
        found = re.findall(r"/(\d+)\b(?=[^/]*$)", text.split("keys:")[-1]) if "keys:" in text else []
        missing = sorted({int(r) for r in found if int(r) < world_size and int(r) != rank})
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    who = (
        f"rank(s) {', '.join(map(str, missing))} did not join (stuck, stopped or not started; "
        "its own output says why)"
        if missing
        else f"torch said: {first_line}"
    )
    return PeerFailure(
        f"rank {rank}: the process group of {world_size} ranks did not form within {timeout_s:g}s: {who}; "
        "raise the timeout if start-up legitimately takes longer",
        failed_rank=missing[0] if len(missing) == 1 else None,
    )
