"""Counting the processes that share a host's cores, and the pipeline's share of them."""

import pytest

from pipefold.runtime.processes import cores


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(cores, "usable_cores", lambda: 2)


def test_local_world_size_counts_every_process_on_the_host(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cores.processes_on_host(2) == 4
    # A pipeline never has fewer processes on the host than its own ranks there.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cores.processes_on_host(2) == 2


def test_without_local_world_size_replicas_are_assumed_on_the_host(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores.processes_on_host(2) == 2
    assert cores.processes_on_host(2, num_replicas=3) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert cores.processes_on_host(2, num_replicas=2) == 4


def test_a_pipeline_beside_replicas_gets_its_share_of_the_cores(two_cores):
    # Every process has a core: nothing to share.
    assert cores.shared_cores(2, threads_per_rank=1) is None
    assert cores.shared_cores(2, threads_per_rank=1, num_host_processes=2) is None
    # 4 pipeline ranks alone on 2 cores: 2 compute at once.
    assert cores.shared_cores(4, threads_per_rank=1) == 2
    # dp=2 x pp=2 on 2 cores: this pipeline's 2 ranks get 1 core between them.
    assert cores.shared_cores(2, threads_per_rank=1, num_host_processes=4) == 1
    # 2 threads per rank on 2 cores: one rank at a time, shared by 2 replicas.
    assert cores.shared_cores(2, threads_per_rank=2, num_host_processes=4) == 0.5
    assert cores.ranks_share_cores(4) and not cores.ranks_share_cores(2)
