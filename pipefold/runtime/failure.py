"""Loud, bounded failure: publish a rank's error, and never block without a deadline.

Design notes: docs/decisions.md, "bounded waits".
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from pipefold.errors import PeerFailure

__all__ = ["BUSY_POLL_S", "FailureReport", "FailureBoard", "Watchdog"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailureReport:
    """Where a rank failed. `stage`/`microbatch` are None outside a stage's action."""

    rank: int
    stage: int | None
    microbatch: int | None
    action: str
    message: str

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> FailureReport:
        data = json.loads(text)
        return cls(
            rank=int(data["rank"]),
            stage=data["stage"],
            microbatch=data["microbatch"],
            action=str(data["action"]),
            message=str(data["message"]),
        )

    def __str__(self) -> str:
        where = [f"rank {self.rank}"]
        if self.stage is not None:
            where.append(f"stage {self.stage}")
        if self.microbatch is not None:
            where.append(f"micro-batch {self.microbatch}")
        return f"{', '.join(where)} failed at {self.action}: {self.message}"


class FailureBoard:
    """One pipeline's failure key on the rendezvous store; the first report wins.

    Without a store (a single process) publishing is a no-op and nothing is ever read.
    Once the store fails to answer (its server lives in rank 0's process, so it goes when
    rank 0 does), the board stops asking: every later attempt would fail the same way and
    torch prints a stack trace for each, one per waiting rank every `poll_s`, burying the
    error that says what happened. The waits still notice a dead peer by its pid.
    """

    def __init__(self, store: Store | None, key: str) -> None:
        self._store = store
        self._key = key
        self.lost: str | None = None
        """Why the store stopped answering, once it has."""

    def _lose(self, doing: str, error: Exception) -> None:
        self.lost = f"{type(error).__name__}: {error}"
        self._store = None
        logger.warning(
            "the rendezvous store stopped answering (%s the failure key %s: %s); "
            "failures are no longer read from it",
            doing,
            self._key,
            error,
        )

    def publish(self, report: FailureReport) -> None:
        if self._store is None:
            return
        try:
            # compare_set with expected "" only writes a missing key: later reports (often
            # consequences of the first) never overwrite the root cause.
            self._store.compare_set(self._key, "", report.encode())
        except Exception as error:  # the store may be gone when the job is tearing down
            self._lose(f"publishing {report} under", error)

    def read(self) -> FailureReport | None:
        if self._store is None:
            return None
        try:
            if not self._store.check([self._key]):
                return None
            raw = self._store.get(self._key)
        except Exception as error:
            self._lose("reading", error)
            return None
        try:
            return FailureReport.decode(raw)
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("the failure key %s holds no report pipefold wrote: %s", self._key, error)
            return None


class _Waiter(threading.Thread):
    """Calls the blocking `Work.wait()` off the main thread (see docs/decisions.md, "bounded waits")."""

    def __init__(self) -> None:
        super().__init__(name="pipefold-waiter", daemon=True)
        self.requests: queue.SimpleQueue[dist.Work | None] = queue.SimpleQueue()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            work = self.requests.get()
            if work is None:  # the watchdog was collected: its pipeline is gone
                return
            try:
                work.wait()
            except BaseException as error:  # handed to the main thread, which raises it
                self.error = error
            # Drop the Work now: a reference kept by this thread would outlive the process
            # group and abort the interpreter at exit ("terminate called ...").
            del work
            self.done.set()


BUSY_POLL_S = 0.05
"""The longest a busy-polling wait checks without sleeping (docs/decisions.md, "busy polling"): as long
as a pipeline's fill waits last on the small models here, short enough that a long wait
(data loading, a slow peer) soon stops burning its core."""

_BUSY_CHECKS = 64
"""Flag checks between two reads of the clock while busy-polling (tens of microseconds)."""


class Watchdog:
    """Waits on `Work` with a deadline while watching the failure board."""

    def __init__(
        self,
        board: FailureBoard,
        *,
        rank: int,
        timeout_s: float,
        poll_completion: bool,
        poll_s: float = 0.05,
        busy_poll_s: float = 0.0,
    ) -> None:
        self._board = board
        self._rank = rank
        self._timeout_s = timeout_s
        self._poll_completion = poll_completion
        self._poll_s = poll_s
        self._waiter: _Waiter | None = None
        self._spin = 200
        self.max_pause_s = 2e-4
        """Longest sleep between checks of a shared-memory flag: the latency it may add."""
        self._busy_poll_s = busy_poll_s
        """How long a shared-memory wait without a doorbell keeps checking its flag without
        sleeping before it starts the growing pauses (docs/decisions.md, "busy polling"); 0 sleeps at once."""

    def wait(self, work: dist.Work, *, what: str, peer: int | None) -> None:
        """Block until `work` completes; raise PeerFailure if a peer failed or `timeout_s` passed.

        `what` names the action waiting (e.g. "F2.5"); `peer` the rank it waits for
        (None for a collective).
        """
        if self._poll_completion:
            self._wait_polling(work, what, peer)
        else:
            self._wait_threaded(work, what, peer)

    def wait_until(
        self,
        ready: Callable[[], bool],
        *,
        what: str,
        peer: int | None,
        peer_alive: Callable[[], bool] | None = None,
        block: Callable[[float], None] | None = None,
    ) -> None:
        """Block until `ready()` is true (a flag another process sets in shared memory).

        Spins briefly (a message usually lands within microseconds of the wait); then,
        without a doorbell, keeps checking without sleeping for `busy_poll_s` and after
        that sleeps in growing pauses up to `max_pause_s`, or, given `block(timeout_s)` (a
        doorbell the producer rings, see docs/decisions.md, "doorbells"), blocks in it;
        either way it checks the failure board, the deadline and `peer_alive()` every
        `poll_s`.

        Why it busy-polls: docs/decisions.md, "busy polling".
        """
        if ready():
            return
        for _ in range(self._spin):
            if ready():
                return
        now = time.monotonic()
        deadline = now + self._timeout_s
        next_check = now + self._poll_s
        busy_until = now + (self._busy_poll_s if block is None else 0.0)
        pause = 1e-5
        while not ready():
            now = time.monotonic()
            if now >= next_check:
                self._check_waiting(what, peer, deadline, now, peer_alive)
                next_check = now + self._poll_s
            if now < busy_until:
                for _ in range(_BUSY_CHECKS):
                    if ready():
                        return
                continue
            if block is not None:
                block(max(next_check - now, 0.0))
                continue
            time.sleep(pause)
            pause = min(pause * 2, self.max_pause_s)

    def _check_waiting(
        self,
        what: str,
        peer: int | None,
        deadline: float,
        now: float,
        peer_alive: Callable[[], bool] | None,
    ) -> None:
        self._check(what, peer, deadline, now)
        if peer_alive is not None and not peer_alive():
            # A peer that died publishes nothing; without this its neighbours would sit
            # out the whole timeout.
            report = self._board.read()
            if report is not None:
                raise PeerFailure(f"{report}; rank {self._rank} stopped while waiting at {what}")
            raise PeerFailure(
                f"rank {self._rank}: rank {peer} exited while rank {self._rank} waited at {what}; "
                f"its own output says why"
            )

    def _wait_polling(self, work: dist.Work, what: str, peer: int | None) -> None:
        deadline = time.monotonic() + self._timeout_s
        next_check = time.monotonic() + self._poll_s
        pause = 1e-5
        while not work.is_completed():
            now = time.monotonic()
            if now >= next_check:
                self._check(what, peer, deadline, now)
                next_check = now + self._poll_s
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        self._finish(work.wait, what, peer)

    def _wait_threaded(self, work: dist.Work, what: str, peer: int | None) -> None:
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = _Waiter()
            waiter.start()
            weakref.finalize(self, waiter.requests.put, None)
        waiter.done.clear()
        waiter.error = None
        waiter.requests.put(work)
        deadline = time.monotonic() + self._timeout_s
        while not waiter.done.wait(self._poll_s):
            self._check(what, peer, deadline, time.monotonic())
        error = waiter.error
        if error is not None:
            self._raise_broken(error, what, peer)

    def _finish(self, wait: Callable[[], object], what: str, peer: int | None) -> None:
        try:
            wait()
        except Exception as error:
            self._raise_broken(error, what, peer)

    def _check(self, what: str, peer: int | None, deadline: float, now: float) -> None:
        report = self._board.read()
        if report is not None:
            raise PeerFailure(f"{report}; rank {self._rank} stopped while waiting at {what}")
        if now >= deadline:
            source = "the other ranks" if peer is None else f"rank {peer}"
            lost = self._board.lost
            store = "" if lost is None else (
                f"; the rendezvous store, which rank 0's process serves, stopped answering ({lost}), "
                f"so rank 0 has most likely exited"
            )
            raise PeerFailure(
                f"rank {self._rank} waited {self._timeout_s:g}s at {what} for {source} without an answer; "
                f"{source} is stuck or died without reporting an error (raise timeout_s if its work "
                f"legitimately takes longer){store}"
            )

    def _raise_broken(self, error: BaseException, what: str, peer: int | None) -> None:
        report = self._board.read()
        if report is not None:
            raise PeerFailure(f"{report}; rank {self._rank} stopped while waiting at {what}") from error
        source = "a peer" if peer is None else f"rank {peer}"
        raise PeerFailure(
            f"rank {self._rank}: communication with {source} failed at {what} "
            f"({type(error).__name__}: {error}); {source} most likely died"
        ) from error
