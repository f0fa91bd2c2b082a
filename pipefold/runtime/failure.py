"""Loud, bounded failure: publish a rank's error, and never block without a deadline.

A rank that raises publishes a `FailureReport` on the `FailureBoard` (a key of the
rendezvous store); every other rank's `Watchdog` reads it while waiting and stops naming
that rank. A rank that stops answering publishes nothing, so a wait that lasts announces
itself ("rank 1 waits on rank 2 at B1.3") under the board's waiting keys, and the first
wait to time out follows those announcements to the rank at the end of the chain, the one
that waits on nobody, and publishes it as the culprit (docs/reliability.md).

Design notes: docs/decisions.md, "bounded waits".
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from pipefold.errors import PeerFailure
from pipefold.runtime.progress import Progress
from pipefold.schedule import Action

__all__ = ["BUSY_POLL_S", "FailureReport", "FailureBoard", "WaitNotice", "Watchdog"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailureReport:
    """Where a rank failed. `stage`/`microbatch` are None outside a stage's action."""

    rank: int
    stage: int | None
    microbatch: int | None
    action: str
    message: str
    world_rank: int | None = None
    """`rank` in the default process group, where it differs or is known (the launcher's rank)."""

    @classmethod
    def of(
        cls, rank: int, action: Action | None, error: BaseException, *, replica: int | None = None
    ) -> FailureReport:
        """`error` raised on pipeline rank `rank` during `action` (None: outside any action);
        `replica` names the data-parallel replica (every replica has a rank 0)."""
        where = "" if replica is None else f" (data-parallel replica {replica})"
        return cls(
            rank=rank,
            stage=None if action is None else action.stage,
            microbatch=None if action is None else action.microbatch,
            action="step setup" if action is None else str(action),
            message=f"{type(error).__name__}: {error}{where}",
            world_rank=dist.get_rank() if dist.is_initialized() else None,
        )

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> FailureReport:
        data = json.loads(text)
        world_rank = data.get("world_rank")
        return cls(
            rank=int(data["rank"]),
            stage=data["stage"],
            microbatch=data["microbatch"],
            action=str(data["action"]),
            message=str(data["message"]),
            world_rank=None if world_rank is None else int(world_rank),
        )

    @property
    def culprit(self) -> int:
        """The world rank to blame."""
        return self.rank if self.world_rank is None else self.world_rank

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

    def announce_wait(self, rank: int, notice: WaitNotice) -> None:
        """Say that world rank `rank` is waiting (a wait that lasts; see `Watchdog`)."""
        if self._store is None:
            return
        try:
            self._store.set(f"{self._key}/waiting/{rank}", notice.encode())
        except Exception as error:
            self._lose("announcing a wait beside", error)

    def withdraw_wait(self, rank: int) -> None:
        if self._store is None:
            return
        try:
            # Emptied, never deleted: another rank may have just found the key (`waiting`'s
            # check) and be about to get it, and a store's get of a missing key blocks for the
            # store's whole timeout, far past the watchdog's (docs/decisions.md, "order of timeouts").
            self._store.set(f"{self._key}/waiting/{rank}", "")
        except Exception as error:
            self._lose("withdrawing a wait beside", error)

    def waiting(self, rank: int) -> WaitNotice | None:
        """What world rank `rank` last announced it waits for, if it is waiting."""
        if self._store is None:
            return None
        key = f"{self._key}/waiting/{rank}"
        try:
            if not self._store.check([key]):
                return None
            raw = self._store.get(key)
        except Exception as error:
            self._lose("reading a wait beside", error)
            return None
        if not raw:  # withdrawn
            return None
        try:
            return WaitNotice.decode(raw)
        except (ValueError, KeyError, TypeError):
            return None

    def read(self) -> FailureReport | None:
        if self._store is None:
            return None
        try:
            # Safe to get once found: the failure key is only ever written (`publish`), never removed.
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


@dataclass(frozen=True)
class WaitNotice:
    """A rank's announcement that it has been waiting a while: on `peer` (a world rank; None for
    a collective, which waits on everyone) at action `what`, refreshed at wall-clock `time`."""

    peer: int | None
    what: str
    time: float

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> WaitNotice:
        data = json.loads(text)
        peer = data["peer"]
        return cls(peer=None if peer is None else int(peer), what=str(data["what"]), time=float(data["time"]))


_COMPUTE = re.compile(r"^([FBI])(\d+)\.(\d+)$")


def _awaited(what: str) -> tuple[int | None, int | None, str]:
    """What a wait at action `what` expects from its peer: (stage, micro-batch, action).

    F s.m waits for stage s-1's output of micro-batch m; B or I s.m for stage s+1's input
    gradient. Other waits (a collective, the step start) name no stage.
    """
    match = _COMPUTE.match(what)
    if match is None:
        return None, None, what
    op, stage, microbatch = match.group(1), int(match.group(2)), int(match.group(3))
    if op == "F":
        return stage - 1, microbatch, f"the send of F{stage - 1}.{microbatch}'s output"
    return stage + 1, microbatch, f"the send of the input gradient of B{stage + 1}.{microbatch}"


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
        world_ranks: Sequence[int] | None = None,
    ) -> None:
        self._board = board
        self._rank = rank
        self._timeout_s = timeout_s
        self._poll_completion = poll_completion
        self._poll_s = poll_s
        self._world_ranks = tuple(world_ranks) if world_ranks is not None else None
        """World rank of each pipeline rank (the waits' `peer`s are pipeline ranks)."""
        self._announce_every_s = min(0.5, timeout_s / 8)
        """A wait this long announces itself on the board, and refreshes the announcement as often."""
        self._announced_at: float | None = None
        """When (monotonic) the current wait last announced itself; None: not announced."""
        self._waiter: _Waiter | None = None
        self._spin = 200
        self.max_pause_s = 2e-4
        """Longest sleep between checks of a shared-memory flag: the latency it may add."""
        self._busy_poll_s = busy_poll_s
        self.busy_yield = True
        """Whether a busy-polling wait yields its core (`sched_yield`) between batches of checks
        (docs/decisions.md, "busy polling"); False spins without giving the core up."""
        self.progress: Progress | None = None
        """Where each rank is (set by the pipeline once its transport is up): names the action a
        killed or stopped peer was at, and which peer is gone when a collective's wait fails."""
        """How long a shared-memory wait without a doorbell keeps checking its flag without
        sleeping before it starts the growing pauses (docs/decisions.md, "busy polling"); 0 sleeps at once."""

    def set_timeout(self, timeout_s: float) -> None:
        """Bound every wait from the next one on by `timeout_s`."""
        self._timeout_s = timeout_s
        self._announce_every_s = min(0.5, timeout_s / 8)

    def wait(self, work: dist.Work, *, what: str, peer: int | None) -> None:
        """Block until `work` completes; raise PeerFailure if a peer failed or `timeout_s` passed.

        `what` names the action waiting (e.g. "F2.5"); `peer` the rank it waits for
        (None for a collective).
        """
        try:
            if self._poll_completion:
                self._wait_polling(work, what, peer)
            else:
                self._wait_threaded(work, what, peer)
        finally:
            if self._announced_at is not None:
                self._withdraw()

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
        try:
            while not ready():
                now = time.monotonic()
                if now >= next_check:
                    self._check_waiting(what, peer, deadline, now, peer_alive)
                    next_check = now + self._poll_s
                if now < busy_until:
                    for _ in range(_BUSY_CHECKS):
                        if ready():
                            return
                    if self.busy_yield:
                        # Lets another runnable process on this core (the peer, on a host whose
                        # other work outnumbers the cores) run; alone on it, returns at once.
                        os.sched_yield()
                    continue
                if block is not None:
                    block(max(next_check - now, 0.0))
                    continue
                time.sleep(pause)
                pause = min(pause * 2, self.max_pause_s)
        finally:
            if self._announced_at is not None:
                self._withdraw()

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
            report = self._board.read() or self._publish_gone(what, peer)
            if report is not None:
                raise PeerFailure(
                    f"{report}; rank {self._rank} stopped while waiting at {what}", failed_rank=report.culprit
                )
            raise PeerFailure(
                f"rank {self._rank}: rank {peer} exited while rank {self._rank} waited at {what}; "
                f"its own output says why",
                failed_rank=None if peer is None else self._world(peer),
            )

    def _publish_gone(self, what: str, peer: int | None) -> FailureReport | None:
        """Publish (unless a report is there first) and return the failure of the peer whose
        process exited or stopped while this rank waited at `what` on `peer` (None: a
        collective); None when no such peer is known. `peer` itself is blamed when it is gone,
        else the one gone rank (a collective, or a dead rank further down the pipeline)."""
        progress = self.progress
        gone = dict(progress.gone()) if progress is not None else {}
        if peer is not None and peer in gone:
            culprit = peer
        elif len(gone) == 1:
            culprit = next(iter(gone))
        else:
            return None
        where = progress.where(culprit) if progress is not None else None
        if where is None:
            where = _awaited(what) if culprit == peer else (None, None, "an unknown point")
        how = "was stopped (SIGSTOP)" if gone[culprit] == "stopped" else "exited (killed or crashed)"
        report = FailureReport(
            rank=culprit,
            stage=where[0],
            microbatch=where[1],
            action=where[2],
            message=f"rank {culprit} {how} while rank {self._rank} waited at {what}; its own output "
            f"(or the launcher's) says why",
            world_rank=self._world(culprit),
        )
        self._board.publish(report)
        return self._board.read() or report

    def _culprit_after_error(self, what: str, peer: int | None) -> FailureReport | None:
        """The published failure or a gone peer, looked for a little while: a broken connection
        arrives as the dying peer's sockets close, before its process shows as exited."""
        deadline = time.monotonic() + min(1.0, self._timeout_s)
        while True:
            report = self._board.read() or self._publish_gone(what, peer)
            if report is not None or time.monotonic() >= deadline:
                return report
            time.sleep(0.01)

    def explain(self, error: BaseException, what: str) -> PeerFailure | None:
        """The peer failure behind `error`, raised outside a bounded wait (a collective of a
        checkpoint save): a failure another rank published, or a peer whose process exited or
        stopped; None when there is neither (`error` is this rank's own)."""
        report = self._culprit_after_error(what, None)
        if report is None:
            return None
        return PeerFailure(
            f"{report}; rank {self._rank} stopped at {what} ({type(error).__name__}: {error})",
            failed_rank=report.culprit,
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

    def _world(self, rank: int) -> int:
        return self._world_ranks[rank] if self._world_ranks is not None else rank

    def _pipeline_rank(self, world_rank: int) -> int:
        if self._world_ranks is not None and world_rank in self._world_ranks:
            return self._world_ranks.index(world_rank)
        return world_rank

    def _announce(self, what: str, peer: int | None, now: float) -> None:
        self._announced_at = now
        notice = WaitNotice(None if peer is None else self._world(peer), what, time.time())
        self._board.announce_wait(self._world(self._rank), notice)

    def _withdraw(self) -> None:
        self._announced_at = None
        self._board.withdraw_wait(self._world(self._rank))

    def _check(self, what: str, peer: int | None, deadline: float, now: float) -> None:
        report = self._board.read()
        if report is not None:
            raise PeerFailure(
                f"{report}; rank {self._rank} stopped while waiting at {what}", failed_rank=report.culprit
            )
        announced = self._announced_at
        if announced is None:
            if now - (deadline - self._timeout_s) >= self._announce_every_s:
                self._announce(what, peer, now)
        elif now - announced >= self._announce_every_s:
            self._announce(what, peer, now)
        if now >= deadline:
            self._time_out(what, peer)

    def _time_out(self, what: str, peer: int | None) -> None:
        """Blame the rank at the end of the chain of waits that starts at `peer`, publish it as the
        job's failure (unless another rank published one first) and raise."""
        source = "the other ranks" if peer is None else f"rank {peer}"
        lost = self._board.lost
        if lost is not None:
            raise PeerFailure(
                f"rank {self._rank} waited {self._timeout_s:g}s at {what} for {source} without an answer; "
                f"the rendezvous store, which rank 0's process serves, stopped answering ({lost}), "
                f"so rank 0 has most likely exited",
                failed_rank=self._world(0),
            )
        culprit = self._follow(peer, what)
        if culprit is None:
            gone = self._publish_gone(what, peer)
            if gone is not None:
                raise PeerFailure(
                    f"{gone}; rank {self._rank} stopped while waiting at {what}", failed_rank=gone.culprit
                )
            raise PeerFailure(
                f"rank {self._rank} waited {self._timeout_s:g}s at {what} for {source} without an answer; "
                f"{source} is stuck or died without reporting an error (raise timeout_s if its work "
                f"legitimately takes longer)"
            )
        blamed, chain, waited_at = culprit
        where = self.progress.where(blamed) if self.progress is not None else None
        stage, microbatch, action = where if where is not None else _awaited(waited_at)
        via = "".join(f", which waits on rank {link}" for link in chain[1:])
        report = FailureReport(
            rank=blamed,
            stage=stage,
            microbatch=microbatch,
            action=action,
            message=(
                f"rank {blamed} is stuck or stopped: it answered nothing for {self._timeout_s:g}s and waits "
                f"on no other rank (rank {self._rank} waited at {what} on rank {chain[0]}{via}); raise "
                f"timeout_s if its work legitimately takes longer"
            ),
            world_rank=self._world(blamed),
        )
        self._board.publish(report)
        first = self._board.read() or report
        raise PeerFailure(
            f"{first}; rank {self._rank} stopped while waiting at {what}", failed_rank=first.culprit
        )

    def _follow(self, peer: int | None, what: str) -> tuple[int, list[int], str] | None:
        """(the rank to blame, the chain of pipeline ranks that led there, the action its waiter
        waits at) from the announcements on the board; None where they name nobody.

        A notice stays until its wait ends, so a rank stopped in the middle of a wait still
        shows one: the chain then closes into a cycle (which live ranks cannot form), and the
        member whose notice was refreshed longest ago, the one that stopped, is blamed.
        """
        notices: dict[int, WaitNotice | None] = {}

        def notice_of(rank: int) -> WaitNotice | None:
            if rank not in notices:
                notices[rank] = self._board.waiting(self._world(rank))
            return notices[rank]

        def age_key(rank: int) -> float:
            notice = notices.get(rank)
            return notice.time if notice is not None else float("inf")

        if peer is None:
            # A collective waits on everyone: the suspects are the ranks not waiting themselves.
            if self._world_ranks is None:
                return None
            idle = [r for r in range(len(self._world_ranks)) if r != self._rank and notice_of(r) is None]
            return (idle[0], [idle[0]], what) if len(idle) == 1 else None
        chain = [peer]
        waited_at = {peer: what}
        current = peer
        while True:
            notice = notice_of(current)
            if notice is None:
                return current, chain, waited_at[current]
            if notice.peer is None:
                # It waits in a collective: on whichever rank is not waiting at all.
                found = self._follow(None, notice.what)
                return found if found is not None else (current, chain, waited_at[current])
            following = self._pipeline_rank(notice.peer)
            if following == self._rank or following in chain:
                cycle = chain[chain.index(following) :] if following in chain else chain
                oldest = min(cycle, key=age_key)
                return oldest, chain[: chain.index(oldest) + 1], waited_at[oldest]
            chain.append(following)
            waited_at[following] = notice.what
            current = following

    def _raise_broken(self, error: BaseException, what: str, peer: int | None) -> None:
        report = self._culprit_after_error(what, peer)
        if report is not None:
            raise PeerFailure(
                f"{report}; rank {self._rank} stopped while waiting at {what}", failed_rank=report.culprit
            ) from error
        source = "a peer" if peer is None else f"rank {peer}"
        raise PeerFailure(
            f"rank {self._rank}: communication with {source} failed at {what} "
            f"({type(error).__name__}: {error}); {source} most likely died",
            failed_rank=None if peer is None else self._world(peer),
        ) from error
