"""Failure is loud and bounded: a failing, dead or stuck rank stops every rank with a named error.

Each test starts its own two ranks: after a failure the process group holds
abandoned receives, so it is not reused.
"""

from __future__ import annotations

import pytest
from _workers import WorkerPool

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def fresh_pool():
    pool = WorkerPool(2)
    yield pool
    pool.close(force=True)


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_raising_rank_stops_every_rank_with_peer_failure(fresh_pool, fail_rank):
    results = fresh_pool.run("failing", how="raise", fail_rank=fail_rank, step_timeout_s=60)
    failed, other = results[fail_rank], results[1 - fail_rank]
    assert failed["type"] == "PipelineError"
    assert f"rank {fail_rank}, stage {fail_rank}, micro-batch 0 failed at F{fail_rank}.0" in failed["message"]
    assert "ValueError: injected failure" in failed["message"]
    assert other["peer_failure"], other
    # The survivor learns the failure from the store, long before its 60 s timeout.
    assert f"rank {fail_rank}, stage {fail_rank}, micro-batch 0 failed at F{fail_rank}.0" in other["message"]
    assert other["elapsed"] < 50


def test_a_dead_rank_is_detected(fresh_pool):
    # Rank 1 exits inside its first forward; rank 0 must not wait for the full timeout of 60 s.
    results = fresh_pool.run_some(
        "failing", ranks=[0], timeout_s=60, how="exit", fail_rank=1, step_timeout_s=60
    )
    assert "rank 1" in results[0]["message"] and results[0]["peer_failure"], results[0]


def test_a_stuck_rank_times_out(fresh_pool):
    results = fresh_pool.run_some(
        # 60 s for the answer covers a fresh pool's start-up on a busy host; the 2 s step timeout
        # under test is what the message checks.
        "failing", ranks=[0], timeout_s=60, how="hang", fail_rank=1, step_timeout_s=2
    )
    assert results[0]["peer_failure"], results[0]
    message = results[0]["message"]
    assert message.startswith("rank 1, stage 1, micro-batch 0 failed at"), message
    assert "rank 1 is stuck or stopped: it answered nothing for 2s" in message


def test_a_boundary_shape_mismatch_names_both_sides(fresh_pool):
    sender, receiver = fresh_pool.run("mismatch")
    assert sender["type"] == "BoundaryMismatch"
    assert "stage 0 produced an output for micro-batch 0 that stage 1 on rank 1" in sender["message"]
    assert "expected float32[2, 7], got float32[2, 8]" in sender["message"]
    assert receiver["type"] == "PeerFailure" and "rank 0, stage 0, micro-batch 0" in receiver["message"]
