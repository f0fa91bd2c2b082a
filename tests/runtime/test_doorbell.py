"""Doorbells (pipefold.runtime.transport.doorbell): a blocking wake-up beside a shared-memory flag."""

from __future__ import annotations

import threading
import time

import pytest

from pipefold.runtime.failure import FailureBoard, Watchdog
from pipefold.runtime.processes.cores import ranks_share_cores
from pipefold.runtime.transport.doorbell import Doorbell, Ringer
from pipefold.runtime.transport.shm import shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="doorbells are used with shared memory only")


@pytest.fixture
def bell(tmp_path):
    doorbell = Doorbell.create(tmp_path, "bell")
    ringer = Ringer.open(tmp_path, "bell")
    assert ringer is not None
    doorbell.unlink()
    yield doorbell, ringer
    doorbell.close()
    ringer.close()


def test_a_ring_before_the_wait_is_not_lost(bell):
    doorbell, ringer = bell
    ringer.ring()
    start = time.monotonic()
    doorbell.wait(5.0)
    assert time.monotonic() - start < 1.0
    # Drained: the next wait blocks until its timeout.
    start = time.monotonic()
    doorbell.wait(0.05)
    assert time.monotonic() - start >= 0.04


def test_ringing_a_full_pipe_does_not_raise(bell):
    doorbell, ringer = bell
    for _ in range(70_000):  # more than a pipe holds (64 KiB)
        ringer.ring()
    doorbell.wait(0.0)


def test_ringer_of_a_missing_or_plain_file_is_none(tmp_path):
    assert Ringer.open(tmp_path, "missing") is None
    (tmp_path / "plain").write_text("x")
    assert Ringer.open(tmp_path, "plain") is None


def test_wait_until_blocks_on_the_doorbell_and_wakes_when_rung(bell):
    """With a 5 s poll interval the wait can only end early if the ring wakes it."""
    doorbell, ringer = bell
    board = FailureBoard(None, "unused")
    watchdog = Watchdog(board, rank=0, timeout_s=30.0, poll_completion=False, poll_s=5.0)
    flag = threading.Event()

    def producer():
        time.sleep(0.1)
        flag.set()
        ringer.ring()

    thread = threading.Thread(target=producer)
    start = time.monotonic()
    thread.start()
    watchdog.wait_until(flag.is_set, what="test", peer=1, block=doorbell.wait)
    elapsed = time.monotonic() - start
    thread.join()
    assert 0.09 <= elapsed < 2.0


def test_ranks_share_cores_counts_against_the_usable_cores():
    assert not ranks_share_cores(1)
    assert ranks_share_cores(10_000)
