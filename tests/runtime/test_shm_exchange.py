"""The shared-memory step exchange (runtime/transport/shm_exchange.py), ranks as threads of this process."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipefold.errors import PeerFailure
from pipefold.runtime.failure import FailureBoard, Watchdog
from pipefold.runtime.transport.doorbell import Doorbell, Ringer
from pipefold.runtime.transport.shm import new_token, shm_supported
from pipefold.runtime.transport.shm_exchange import ShmExchange

pytestmark = pytest.mark.skipif(not shm_supported(), reason="shared memory needs x86-64 Linux")

CAPACITY = 256


def _exchanges(tmp_path, num_ranks, doorbells=False):
    token = new_token()
    first = ShmExchange.create(tmp_path, "exchange", num_ranks=num_ranks, capacity=CAPACITY, token=token)
    others = [
        ShmExchange.open(tmp_path, "exchange", num_ranks=num_ranks, rank=r, capacity=CAPACITY, token=token)
        for r in range(1, num_ranks)
    ]
    assert all(other is not None for other in others)
    first.unlink()
    exchanges = [first, *others]
    if doorbells:
        for rank, exchange in enumerate(exchanges):
            exchange.doorbell = Doorbell.create(tmp_path, f"bell-{rank}")
        for rank, exchange in enumerate(exchanges):
            others = [other for other in range(num_ranks) if other != rank]
            exchange.ringers = [Ringer.open(tmp_path, f"bell-{other}") for other in others]
    return exchanges


def _watchdog(rank, timeout_s=10.0):
    return Watchdog(FailureBoard(None, "unused"), rank=rank, timeout_s=timeout_s, poll_completion=False)


def _run_ranks(target, num_ranks):
    results = [None] * num_ranks
    errors = []

    def body(rank):
        try:
            results[rank] = target(rank)
        except BaseException as error:  # reported below, with the rank
            errors.append((rank, error))

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(num_ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("doorbells", [False, True], ids=["polling", "doorbells"])
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_many_broadcasts_and_gathers_in_a_row_keep_every_value(tmp_path, num_ranks, doorbells):
    """Operations alternate fast, so buffers are reused while slower ranks still read:
    every value must come out as sent, payloads too large for shared memory included."""
    exchanges = _exchanges(tmp_path, num_ranks, doorbells)
    num_ops = 200

    def rank_body(rank):
        exchange, watchdog = exchanges[rank], _watchdog(rank)
        seen = []
        for op in range(num_ops):
            if op % 3 == 2:
                row = torch.full((4,), float(rank * 1000 + op), dtype=torch.float64)
                gathered = exchange.all_gather(row, watchdog=watchdog, what="gather")
                seen.append([float(g[0]) for g in gathered])
            else:
                src = op % num_ranks
                # Every 7th payload exceeds the capacity: None on every rank.
                size = CAPACITY + 1 if op % 7 == 0 else op % 50
                payload = bytes([op % 251]) * size if rank == src else None
                seen.append(exchange.broadcast(payload, src=src, watchdog=watchdog, what="broadcast"))
            if rank == 0 and op % 10 == 0:
                time.sleep(0.001)  # rank 0 lags now and then
        return seen

    results = _run_ranks(rank_body, num_ranks)
    for op in range(num_ops):
        if op % 3 == 2:
            expected = [float(r * 1000 + op) for r in range(num_ranks)]
        else:
            expected = None if op % 7 == 0 else bytes([op % 251]) * (op % 50)
        assert all(result[op] == expected for result in results), op
    for exchange in exchanges:
        exchange.close()


def test_an_all_gather_too_large_returns_none_everywhere_and_uses_no_operation(tmp_path):
    exchanges = _exchanges(tmp_path, 2)

    def rank_body(rank):
        watchdog = _watchdog(rank)
        big = exchanges[rank].all_gather(torch.zeros(CAPACITY), watchdog=watchdog, what="gather")
        small = exchanges[rank].all_gather(torch.tensor([rank]), watchdog=watchdog, what="gather")
        return big, small

    for big, small in _run_ranks(rank_body, 2):
        assert big is None
        assert [int(t) for t in small] == [0, 1]


def test_a_missing_peer_times_out_naming_the_wait(tmp_path):
    exchanges = _exchanges(tmp_path, 2)
    watchdog = _watchdog(0, timeout_s=0.3)
    with pytest.raises(PeerFailure, match="step start"):
        exchanges[0].all_gather(torch.zeros(2), watchdog=watchdog, what="step start")


def test_a_dead_peer_is_noticed_before_the_timeout(tmp_path):
    exchanges = _exchanges(tmp_path, 2)
    exchanges[1].peer_alive = lambda: False
    watchdog = _watchdog(1, timeout_s=30.0)
    start = time.monotonic()
    with pytest.raises(PeerFailure, match="exited"):
        exchanges[1].broadcast(None, src=0, watchdog=watchdog, what="step start")
    assert time.monotonic() - start < 5.0


def test_open_refuses_another_file(tmp_path):
    token = new_token()
    ShmExchange.create(tmp_path, "exchange", num_ranks=2, capacity=CAPACITY, token=token)
    wrong = token + 1
    assert ShmExchange.open(tmp_path, "exchange", num_ranks=2, rank=1, capacity=CAPACITY, token=wrong) is None
    assert ShmExchange.open(tmp_path, "exchange", num_ranks=3, rank=1, capacity=CAPACITY, token=token) is None
    assert ShmExchange.open(tmp_path, "missing", num_ranks=2, rank=1, capacity=CAPACITY, token=token) is None


def test_last_pickle_reuses_only_what_is_equal():
    # The step's batch description is broadcast with it (Collectives.broadcast_object(immutable=True)).
    from pipefold.model import TensorMeta
    from pipefold.runtime.transport.comm import LastPickle

    sender, receiver = LastPickle(), LastPickle()
    first = TensorMeta(shapes=((64, 8),), dtypes=(torch.float32,), is_tuple=False)
    payload = sender.dumps(first)
    value = receiver.loads(payload)
    assert value == first
    # The next step's equal description (a new object): the same payload, the same value back.
    again = sender.dumps(TensorMeta(shapes=((64, 8),), dtypes=(torch.float32,), is_tuple=False))
    assert again is payload and receiver.loads(bytes(again)) is value
    # Another shape, or an equal tuple that is not the same type: pickled and unpickled anew.
    other = TensorMeta(shapes=((32, 8),), dtypes=(torch.float32,), is_tuple=False)
    assert receiver.loads(sender.dumps(other)) == other
    assert sender.dumps((1, 2)) != sender.dumps([1, 2])
    assert receiver.loads(sender.dumps([1, 2])) == [1, 2]
