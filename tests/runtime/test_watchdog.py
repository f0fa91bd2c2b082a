"""The watchdog's waits ([Note: busy polling] in pipefold/runtime/failure.py) and its failure board."""

from __future__ import annotations

import time

import pytest

from pipefold.errors import PeerFailure
from pipefold.runtime import failure
from pipefold.runtime.failure import FailureBoard, Watchdog


def _watchdog(*, busy_poll_s: float, poll_s: float = 5.0) -> Watchdog:
    board = FailureBoard(None, "unused")
    return Watchdog(
        board, rank=0, timeout_s=30.0, poll_completion=False, poll_s=poll_s, busy_poll_s=busy_poll_s
    )


class _Sleeps:
    """Stands in for time.sleep: records when each call came and returns at once."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.at.append(time.monotonic())


def _ready_after(num_checks: int):
    calls = 0

    def ready() -> bool:
        nonlocal calls
        calls += 1
        return calls > num_checks

    return ready


def test_a_busy_polling_wait_never_sleeps(monkeypatch):
    sleeps = _Sleeps()
    monkeypatch.setattr(failure.time, "sleep", sleeps)
    # Far more checks than the initial spin (200): a sleeping wait would have slept.
    _watchdog(busy_poll_s=10.0).wait_until(_ready_after(20_000), what="F1.0", peer=0)
    assert sleeps.at == []


def test_without_busy_polling_the_wait_sleeps_after_the_spin(monkeypatch):
    sleeps = _Sleeps()
    monkeypatch.setattr(failure.time, "sleep", sleeps)
    _watchdog(busy_poll_s=0.0).wait_until(_ready_after(20_000), what="F1.0", peer=0)
    assert sleeps.at


def test_busy_polling_gives_way_to_sleeps_after_its_budget(monkeypatch):
    sleeps = _Sleeps()
    monkeypatch.setattr(failure.time, "sleep", sleeps)
    start = time.monotonic()
    until = start + 0.3
    _watchdog(busy_poll_s=0.1).wait_until(lambda: time.monotonic() >= until, what="F1.0", peer=0)
    assert sleeps.at, "a wait longer than busy_poll_s must end up sleeping"
    assert sleeps.at[0] - start >= 0.1


def test_a_busy_polling_wait_still_notices_a_dead_peer():
    watchdog = _watchdog(busy_poll_s=60.0, poll_s=0.01)
    start = time.monotonic()
    with pytest.raises(PeerFailure, match="rank 1 exited while rank 0 waited at F1.0"):
        watchdog.wait_until(lambda: False, what="F1.0", peer=1, peer_alive=lambda: False)
    assert time.monotonic() - start < 5.0


def test_a_wait_with_a_doorbell_blocks_in_it_instead_of_busy_polling():
    blocked: list[float] = []
    watchdog = _watchdog(busy_poll_s=60.0, poll_s=0.01)
    watchdog.wait_until(lambda: len(blocked) >= 3, what="F1.0", peer=0, block=blocked.append)
    assert len(blocked) == 3


class _DeadStore:
    """A store whose server is gone: every call fails, as torch's TCPStore does then."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args):
        self.calls += 1
        raise RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed.")

    check = get = compare_set = _fail


def test_a_board_whose_store_died_stops_asking_it(caplog):
    """One warning, then silence: not one failed round trip (and torch stack trace) per poll."""
    store = _DeadStore()
    board = FailureBoard(store, "pipefold/pipeline0/failure")  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="pipefold.runtime.failure"):
        for _ in range(20):
            assert board.read() is None
    assert store.calls == 1
    assert board.lost is not None and "Failed to recv" in board.lost
    assert len([r for r in caplog.records if "stopped answering" in r.message]) == 1


def test_a_timeout_after_the_store_died_says_rank_0_most_likely_exited():
    board = FailureBoard(_DeadStore(), "pipefold/pipeline0/failure")  # type: ignore[arg-type]
    watchdog = Watchdog(board, rank=1, timeout_s=0.2, poll_completion=False, poll_s=0.01)
    with pytest.raises(PeerFailure, match="stopped answering .*rank 0 has most likely exited"):
        watchdog.wait_until(lambda: False, what="step start", peer=0)
