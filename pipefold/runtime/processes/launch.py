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
SIGKILL after `grace_s`, and the result names the first failed rank and its last
error lines. Ctrl-C stops every worker the same way.

Several machines: use torchrun, which sets the same variables, e.g. on each node

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 train.py
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Protocol

from pipefold.errors import ConfigError
from pipefold.runtime.processes.orphan import arm_orphan_guard, die_with_parent

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
]

logger = logging.getLogger(__name__)

_NUM_ERROR_LINES = 20
_POLL_S = 0.05


@dataclass(frozen=True)
class LaunchResult:
    """How a launch ended. `exit_code` 0 means every worker succeeded."""

    exit_code: int
    failed_rank: int | None = None
    error_lines: tuple[str, ...] = ()
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """One paragraph for the terminal: which rank failed and how."""
        if self.ok:
            return "all ranks finished"
        if self.interrupted:
            return "interrupted: all ranks stopped"
        head = f"rank {self.failed_rank} failed with exit code {self.exit_code}; the other ranks were stopped"
        if not self.error_lines:
            return head
        return head + f"\nlast lines of rank {self.failed_rank}:\n" + "\n".join(
            "  " + line for line in self.error_lines
        )


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
) -> None:
    die_with_parent()
    os.environ.update(env)
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    try:
        fn(*args)
    except ConfigError as error:
        # Bad input found on the ranks (a checkpoint that does not fit the model, ...): the
        # message names the field, the value and the fix, and a traceback printed by every
        # rank would bury it. Exit 1 without one; the supervisor prints the message.
        Path(error_path).write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
        sys.exit(1)
    except BaseException:
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
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_run_function,
            args=(fn, rank, env, num_threads, args, self._error_path),
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


def _supervise(workers: Sequence[_Worker], grace_s: float) -> LaunchResult:
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            for worker, code in zip(workers, codes, strict=True):
                if code is not None and code != 0:
                    logger.error("rank %d exited with code %d; stopping the other ranks", worker.rank, code)
                    _stop(workers, grace_s)
                    # A signal death reads as a negative code; report it as a plain failure.
                    return LaunchResult(
                        exit_code=code if code > 0 else 1,
                        failed_rank=worker.rank,
                        error_lines=worker.error_lines(),
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
    try:
        for rank in range(num_ranks):
            env = {**os.environ, **worker_env(rank, num_ranks, port, num_threads)}
            workers.append(_ScriptWorker(rank, command, env))
    except OSError as error:
        _stop(workers, grace_s)
        raise ConfigError(f"launch: cannot start {command[0]!r}: {error}") from None
    return _supervise(workers, grace_s)


def spawn(
    fn: Callable[..., object],
    num_ranks: int,
    args: tuple[Any, ...] = (),
    *,
    num_threads: int | None = 1,
    grace_s: float = 3.0,
) -> LaunchResult:
    """Run `fn(*args)` in `num_ranks` fresh processes ("spawn"); `fn` must be importable by name."""
    _check_num_ranks(num_ranks)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pipefold-launch-") as error_dir:
        workers: list[_Worker] = [
            _FunctionWorker(
                rank, fn, args, worker_env(rank, num_ranks, port, num_threads), num_threads, error_dir
            )
            for rank in range(num_ranks)
        ]
        return _supervise(workers, grace_s)


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
        return TCPStore(host, port, world_size, False, timeout)
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
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        return
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
