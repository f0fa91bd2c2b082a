"""torchrun lists the culprit, not a survivor, as the root cause (pipefold/runtime/processes/elastic.py).

One process plays two ranks of one node; torch's own reader of the error files
(`ProcessFailure`, `ChildFailedError.get_first_failure`, what torchrun prints) judges them.
"""

from __future__ import annotations

import json

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from pipefold.errors import PeerFailure, PipelineError
from pipefold.runtime.processes.elastic import record_for_torchrun


def _as_rank(monkeypatch, tmp_path, rank: int) -> str:
    # torchrun's layout: <attempt dir>/<local rank>/error.json
    path = tmp_path / "attempt_0" / str(rank) / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return str(path)


def _root_cause(tmp_path, exit_codes: dict[int, int]) -> tuple[int, ProcessFailure]:
    failures = {
        rank: ProcessFailure(
            local_rank=rank, pid=100 + rank, exitcode=code,
            error_file=str(tmp_path / "attempt_0" / str(rank) / "error.json"),
        )
        for rank, code in exit_codes.items()
    }
    return ChildFailedError("pipefold", failures).get_first_failure()


def test_a_survivor_names_a_killed_culprit_as_the_root_cause(monkeypatch, tmp_path):
    # Rank 1 was killed (SIGKILL: no file of its own); rank 0 noticed and raised naming it.
    _as_rank(monkeypatch, tmp_path, 0)
    notice = "rank 1, stage 1, micro-batch 1 failed at W1.1: rank 1 exited (killed or crashed)"
    record_for_torchrun(PeerFailure(notice, failed_rank=1))
    rank, failure = _root_cause(tmp_path, {0: 1, 1: -9})
    assert rank == 1
    assert notice in failure.message["message"]
    survivor = json.loads((tmp_path / "attempt_0" / "0" / "error.json").read_text())
    assert notice in survivor["message"]["message"]
    assert int(survivor["message"]["extraInfo"]["timestamp"]) > failure.timestamp


def test_a_raising_culprit_keeps_its_own_file(monkeypatch, tmp_path):
    # Rank 1 raised first and wrote its file; rank 0, a consequence, leaves it as it is.
    _as_rank(monkeypatch, tmp_path, 1)
    record_for_torchrun(PipelineError("rank 1, stage 1 failed at F1.0: ValueError: bad", failed_rank=1))
    _as_rank(monkeypatch, tmp_path, 0)
    notice = "rank 1, stage 1 failed at F1.0: ValueError: bad; rank 0 stopped"
    record_for_torchrun(PeerFailure(notice, failed_rank=1))
    rank, failure = _root_cause(tmp_path, {0: 1, 1: 1})
    assert rank == 1 and "ValueError: bad" in failure.message["message"]
    assert "PipelineError: rank 1" in failure.message["extraInfo"]["py_callstack"]


@pytest.mark.parametrize("env", [{}, {"TORCHELASTIC_ERROR_FILE": ""}])
def test_outside_torchrun_nothing_is_written(monkeypatch, tmp_path, env):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    record_for_torchrun(PeerFailure("x", failed_rank=1))
    assert list(tmp_path.iterdir()) == []
