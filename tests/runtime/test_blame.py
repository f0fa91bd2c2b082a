"""The right culprit: a stuck rank is named by whichever rank gives up first (chains of waits
followed on the failure board), a start-up stall gives a typed message, and the launcher's
final message names the root cause (a signal by its name). One process, no torch ranks."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest

from pipefold.errors import PeerFailure
from pipefold.runtime.failure import FailureBoard, WaitNotice, Watchdog
from pipefold.runtime.processes import launch
from pipefold.runtime.processes.launch import _not_formed, _root_cause, launch_script, loopback_store

KEY = "pipefold/pipeline0/failure"


class _Store:
    """The rendezvous store's interface that the board uses, in memory (thread-safe enough)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self.data[key] = value

    def get(self, key: str) -> bytes:
        with self._lock:
            return self.data[key].encode()

    def check(self, keys: list[str]) -> bool:
        with self._lock:
            return all(key in self.data for key in keys)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        with self._lock:
            if self.data.get(key, "") == expected:
                self.data[key] = desired
            return self.data[key].encode()



def _watchdog(store: _Store, rank: int, timeout_s: float) -> Watchdog:
    board = FailureBoard(store, KEY)  # type: ignore[arg-type]
    return Watchdog(board, rank=rank, timeout_s=timeout_s, poll_completion=False, poll_s=0.01,
                    world_ranks=(0, 1, 2, 3))


def test_the_first_rank_to_give_up_names_the_stuck_rank_at_the_end_of_the_chain():
    """Rank 2 is stopped; rank 1 waits on it (B1.1), rank 3 too (F3.1), and rank 0 waits on rank 1
    (B0.1) with the shortest timeout, so it gives up first: it used to say "rank 1 is stuck"."""
    store = _Store()
    errors: dict[int, str] = {}

    def wait(rank: int, peer: int, what: str, timeout_s: float) -> None:
        try:
            _watchdog(store, rank, timeout_s).wait_until(lambda: False, what=what, peer=peer)
        except PeerFailure as error:
            errors[rank] = f"{error}|{error.failed_rank}"

    threads = [
        threading.Thread(target=wait, args=(1, 2, "B1.1", 30.0)),
        threading.Thread(target=wait, args=(3, 2, "F3.1", 30.0)),
    ]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    wait(0, 1, "B0.1", 1.5)
    for thread in threads:
        thread.join(timeout=10)
    assert time.monotonic() - start < 5, "the others learn the culprit from the board, not their timeout"
    assert sorted(errors) == [0, 1, 3]
    for rank, text in errors.items():
        assert text.startswith(
            "rank 2, stage 2, micro-batch 1 failed at the send of the input gradient of B2.1"
        )
        assert "rank 2 is stuck or stopped" in text and text.endswith("|2"), (rank, text)
    assert "rank 0 waited at B0.1 on rank 1, which waits on rank 2" in errors[0]
    notices = {key: value for key, value in store.data.items() if "/waiting/" in key}
    assert notices and not any(notices.values()), "every wait withdrew (emptied) its announcement"


def test_a_stale_announcement_of_a_stopped_rank_does_not_make_a_cycle():
    store = _Store()
    board = FailureBoard(store, KEY)  # type: ignore[arg-type]
    # Rank 2 announced a wait on rank 3 and was stopped in the middle of it, long ago.
    board.announce_wait(2, WaitNotice(peer=3, what="B2.0", time=time.time() - 60))
    expected = r"^rank 2, stage 2, micro-batch 4 failed at the send of F2.4"
    with pytest.raises(PeerFailure, match=expected) as caught:
        _watchdog(store, 3, 0.3).wait_until(lambda: False, what="F3.4", peer=2)
    assert caught.value.failed_rank == 2


def test_a_store_client_that_finds_no_rank_0_gets_a_typed_message():
    port = launch.free_port()  # nobody listens there
    start = time.monotonic()
    with pytest.raises(PeerFailure, match="rank 0 is stuck, stopped or did not start") as caught:
        loopback_store("127.0.0.1", port, rank=1, world_size=2, timeout_s=1.0)
    assert caught.value.failed_rank == 0 and time.monotonic() - start < 30


def test_a_process_group_that_does_not_form_names_the_missing_rank():
    store = _Store()
    for rank in (0, 1, 3):
        store.set(f"pipefold/joined/{rank}", "1")
    error = _not_formed(1, 4, 10.0, RuntimeError("wait timeout after 10000ms, keys: /0//cpu//0/2"), store)
    assert str(error).startswith(
        "rank 1: the process group of 4 ranks did not form within 10s: rank(s) 2 did not join"
    )
    assert error.failed_rank == 2
    # Without pipefold's keys (torchrun's store), the rank comes from torch's message.
    timeout = RuntimeError("wait timeout after 10000ms, keys: /0//cpu//0/2")
    assert _not_formed(1, 4, 10.0, timeout, None).failed_rank == 2


def test_root_cause_from_the_notes():
    blame = "rank 2, stage 2, micro-batch 1 failed at F2.1: stuck"
    notes = {
        0: {"message": f"{blame}; rank 0 stopped", "failed_rank": 2},
        3: {"message": blame, "failed_rank": 2},
    }
    assert _root_cause(0, 1, notes) == (2, f"{blame}; rank 0 stopped")
    assert _root_cause(1, -9, notes) == (1, None)
    own = {1: {"message": "ValueError: bad layer", "failed_rank": 1}, 0: {"message": "x", "failed_rank": 1}}
    assert _root_cause(0, 1, own) == (1, "ValueError: bad layer")


@pytest.mark.timeout(40)
def test_a_rank_killed_by_a_signal_is_reported_by_its_name(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)
    """))
    result = launch_script([str(script)], 2, grace_s=1.0)
    assert result.failed_rank == 1 and result.signal_name == "SIGKILL" and result.exit_code == 128 + 9
    assert result.describe().startswith("rank 1 was killed by SIGKILL; the other ranks were stopped")


def test_a_peer_failure_exits_with_the_runtime_code_not_the_usage_code(monkeypatch, capsys):
    from pipefold.cli import main as cli_main
    from pipefold.cli import train as cli_train

    def fail(args):
        raise PeerFailure("rank 1: rank 0 exited while rank 1 waited at F1.0", failed_rank=0)

    monkeypatch.setattr(cli_train, "run", fail)
    monkeypatch.setattr(sys, "argv", ["pipefold"])
    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: _with_func(parser, fail))
    assert cli_main.main(["train"]) == cli_main.EXIT_FAILURE != cli_main.EXIT_USAGE
    assert "rank 0 exited" in capsys.readouterr().err


def _with_func(parser, func):
    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.func = func
        return args

    parser.parse_args = parse_args
    return parser


def test_a_waiter_starved_of_cpu_still_leads_to_the_stuck_rank():
    """On a loaded host a waiting rank may refresh its notice late; an old notice without a
    cycle still counts (the first 4-rank reproduction blamed rank 1 when it did not)."""
    store = _Store()
    board = FailureBoard(store, KEY)  # type: ignore[arg-type]
    board.announce_wait(1, WaitNotice(peer=2, what="B1.0", time=time.time() - 5))
    with pytest.raises(PeerFailure, match=r"^rank 2, stage 2, micro-batch 0 failed") as caught:
        _watchdog(store, 0, 0.3).wait_until(lambda: False, what="B0.0", peer=1)
    assert caught.value.failed_rank == 2


def test_a_chain_ending_in_a_collective_blames_the_one_rank_not_waiting():
    store = _Store()
    board = FailureBoard(store, KEY)  # type: ignore[arg-type]
    board.announce_wait(1, WaitNotice(peer=None, what="loss and timeline gather", time=time.time()))
    board.announce_wait(2, WaitNotice(peer=None, what="loss and timeline gather", time=time.time()))
    with pytest.raises(PeerFailure, match=r"^rank 3 failed at loss and timeline gather") as caught:
        _watchdog(store, 0, 0.3).wait_until(lambda: False, what="B0.0", peer=1)
    assert caught.value.failed_rank == 3


def test_a_notice_withdrawn_between_check_and_get_reads_as_withdrawn_at_once(tmp_path):
    """Ranks that time out together (a collective's) read each other's notices while each
    withdraws its own; a store's get of a key removed since the check blocks for the store's
    whole timeout (60 s in the fault suite, whose zb-h1 4-rank stop at W once took 64 s so).
    A withdrawn notice must read as none, at once, and leave the store trusted."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    store.set_timeout(timedelta(seconds=5))
    peer = FailureBoard(store, KEY)
    peer.announce_wait(3, WaitNotice(peer=None, what="loss all-reduce", time=time.time()))

    class _WithdrawnAfterCheck:
        """The real store, but rank 3 withdraws its notice just after this rank's check."""

        def check(self, keys: list[str]) -> bool:
            found = store.check(keys)
            peer.withdraw_wait(3)
            return found

        def get(self, key: str) -> bytes:
            return store.get(key)

    board = FailureBoard(_WithdrawnAfterCheck(), KEY)  # type: ignore[arg-type]
    started = time.monotonic()
    assert board.waiting(3) is None
    assert time.monotonic() - started < 1.0
    assert board.lost is None
    peer.announce_wait(3, WaitNotice(peer=2, what="F3.1", time=time.time()))
    notice = FailureBoard(store, KEY).waiting(3)
    assert notice is not None and notice.peer == 2
