"""The tied gradient's sum through the owners' shared-memory exchange (runtime/tied.py,
runtime/transport/shm_owners.py, `ShmExchange.sum_in_rank_order`).

The exchange's sum with ranks as threads of this process (chunks, dtypes, in place, a dead
peer); then four ranks of the session's pool (`WorkerPool(4, cases=__name__)`): the tied
transformer over ranks 0 and 3 (no stage-to-stage channel between them) sums through shared
memory, bit for bit as through the process group, and both match one process.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch
from _cases import _batch, _loss_fn, transformer
from _workers import WorkerPool

from pipefold.errors import PeerFailure
from pipefold.runtime.failure import FailureBoard, Watchdog
from pipefold.runtime.transport.shm import new_token, shm_supported
from pipefold.runtime.transport.shm_exchange import ShmExchange

pytestmark = pytest.mark.skipif(not shm_supported(), reason="shared memory needs x86-64 Linux")


def _exchanges(tmp_path, num_ranks, capacity):
    token = new_token()
    first = ShmExchange.create(tmp_path, "tied", num_ranks=num_ranks, capacity=capacity, token=token)
    others = [
        ShmExchange.open(tmp_path, "tied", num_ranks=num_ranks, rank=r, capacity=capacity, token=token)
        for r in range(1, num_ranks)
    ]
    first.unlink()
    return [first, *others]


def _watchdog(rank, timeout_s=20.0):
    return Watchdog(FailureBoard(None, "unused"), rank=rank, timeout_s=timeout_s, poll_completion=False)


def _threads(target, num_ranks):
    results, errors = [None] * num_ranks, []

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_the_sum_is_in_rank_order_on_every_rank_across_chunks(tmp_path, num_ranks, dtype):
    """Tensors of 1000 elements through 256-byte chunks (not a multiple), many sums in a row
    (each buffer reused while slower ranks read), into a new tensor and in place: every rank
    gets `t0 + t1 (+ t2)` bit for bit."""
    exchanges = _exchanges(tmp_path, num_ranks, capacity=256)
    values = [
        [torch.randn(10, 100, generator=torch.Generator().manual_seed(100 * op + rank)).to(dtype) * 10 ** rank
         for rank in range(num_ranks)]
        for op in range(6)
    ]

    def rank_body(rank):
        watchdog, sums = _watchdog(rank), []
        for op, row in enumerate(values):
            mine = row[rank].clone()
            in_place = op % 2 == 1
            total = exchanges[rank].sum_in_rank_order(
                mine, watchdog=watchdog, what="tied", out=mine if in_place else None
            )
            assert (total is mine) == in_place
            sums.append(total)
            if rank == 0 and op % 2 == 0:
                time.sleep(0.002)  # rank 0 lags now and then
        return sums

    results = _threads(rank_body, num_ranks)
    for op, row in enumerate(values):
        expected = row[0] + row[1]
        for part in row[2:]:
            expected = expected + part
        for sums in results:
            assert sums[op].dtype == dtype and sums[op].shape == (10, 100)
            assert torch.equal(sums[op], expected), op
    for exchange in exchanges:
        exchange.close()


def test_a_dead_owner_is_noticed_before_the_timeout(tmp_path):
    exchanges = _exchanges(tmp_path, 2, capacity=256)
    exchanges[0].peer_alive = lambda: False
    start = time.monotonic()
    with pytest.raises(PeerFailure, match="tied-gradient exchange"):
        exchanges[0].sum_in_rank_order(torch.ones(10), watchdog=_watchdog(0, 30.0),
                                       what="tied-gradient exchange")
    assert time.monotonic() - start < 5.0


def test_out_must_match(tmp_path):
    exchanges = _exchanges(tmp_path, 2, capacity=256)
    with pytest.raises(ValueError, match="out must be"):
        exchanges[0].sum_in_rank_order(torch.ones(4), watchdog=_watchdog(0), what="tied", out=torch.ones(5))


# -- four ranks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)
    yield pool
    pool.close()


def _digest(tensor):
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _step_doorbell(pipe):
    base = pipe.transport.collectives.exchange
    return None if base is None else base.doorbell


def tied_paths(num_steps: int = 2) -> dict:
    """Rank side: the tied transformer on four ranks (1f1b), through shared memory and then through
    the process group; each rank's path, the tied gradient's digest, and the gradients against
    one process."""
    from pipefold.model import build_reference
    from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions, TransportOptions

    result: dict = {}
    for shared_memory in (True, False):
        pipe = Pipeline(
            transformer(), loss_fn=_loss_fn("transformer"), schedule="1f1b", num_microbatches=4,
            layout=LayoutOptions(seed=7), runtime=RuntimeOptions(timeout_s=60),
            transport=TransportOptions(shared_memory=shared_memory),
        )
        reference = build_reference(transformer(), seed=7)
        for step in range(num_steps):  # gradients accumulate: the second step sums on top of the first
            inputs, targets = _batch("transformer", 9, seed=step)
            loss = pipe.step(inputs, targets)
            expected = _loss_fn("transformer")(reference(inputs), targets)
            expected.backward()
            torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        wanted = dict(reference.named_parameters())
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(param.grad, wanted[name].grad, rtol=1e-4, atol=1e-5, msg=name)
        result[shared_memory] = {
            "paths": ["shared memory" if e is not None else "process group" for e in pipe.tied.exchanges],
            "owners": [list(owners) for owners, _ in pipe.tied.groups],
            "digests": [_digest(p.grad) for _, params in pipe.tied.groups for p in params],
            # The other owner's process watched (a dead one fails the wait), and the step
            # exchange's doorbell borrowed where it has one (ranks sharing cores).
            "peer_alive": [e.peer_alive() for e in pipe.tied.exchanges if e is not None and e.peer_alive],
            "doorbell": [e.doorbell is _step_doorbell(pipe) for e in pipe.tied.exchanges if e is not None],
        }
    return result


@pytest.mark.multiprocess
def test_tied_owners_sum_through_shared_memory_bit_for_bit_as_through_the_group(pool4):
    results = pool4.run("tied_paths")
    owners = [r for r, result in enumerate(results) if result[True]["owners"]]
    assert owners == [0, 3]
    for rank in owners:
        assert results[rank][True]["owners"] == [[0, 3]]
        assert results[rank][True]["paths"] == ["shared memory"]
        assert results[rank][True]["peer_alive"] == [True] and results[rank][True]["doorbell"] == [True]
        assert results[rank][False]["paths"] == ["process group"]
        # The same bits either way, on both owners.
        assert results[rank][True]["digests"] == results[rank][False]["digests"]
        assert results[rank][True]["digests"] == results[owners[0]][True]["digests"]
    for rank in (1, 2):
        assert results[rank][True]["paths"] == [] and results[rank][False]["paths"] == []
