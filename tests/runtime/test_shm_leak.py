"""No /dev/shm leak: a rank or the launcher killed right after a channel file appears leaves no
`pipefold-*` file behind (the launcher sweeps its job's files; its janitor does when the
launcher itself is killed). Ranks here are plain scripts (no torch): a few seconds in all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipefold.runtime.processes.janitor import start_janitor, sweep
from pipefold.runtime.processes.launch import launch_script
from pipefold.runtime.transport import comm
from pipefold.runtime.transport.shm import JOB_ENV, SHM_DIR, job_prefix, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="needs /dev/shm")

# A rank that creates a file as a channel does (the job's prefix, sparse 64 MiB) and is
# killed at once: the window in which unlinking after the handshake cannot help.
_RANK = textwrap.dedent("""
    import os, signal, sys, time
    path = f"/dev/shm/pipefold-{os.environ['PIPEFOLD_JOB']}-{os.environ['RANK']}-test"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 64 << 20)
    # Written under another name, then renamed: the test reads a marker as soon as it appears,
    # and a marker created empty and filled afterwards read as "" once (a flaky count).
    partial = sys.argv[1] + f"/partial{os.environ['RANK']}"
    with open(partial, "w") as marker:
        marker.write(path)
    os.rename(partial, sys.argv[1] + f"/created{os.environ['RANK']}")
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)
""")


def _leftovers(tmp_path: Path) -> list[str]:
    return [path for path in (f.read_text() for f in tmp_path.glob("created*")) if os.path.exists(path)]


def test_channel_names_carry_the_job_token(monkeypatch):
    monkeypatch.setenv(JOB_ENV, "a1b2c3")
    assert comm._channel_name(0xFF, 0, 1).startswith("pipefold-a1b2c3-ff-0-1")
    monkeypatch.delenv(JOB_ENV)
    assert job_prefix() == "pipefold-" and job_prefix("x1") == "pipefold-x1-"


@pytest.mark.timeout(60)
def test_a_rank_killed_right_after_creating_a_file_leaves_none(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    result = launch_script([str(script), str(tmp_path)], 2, grace_s=1.0)
    assert result.signal_name == "SIGKILL" and result.failed_rank == 1
    assert list(tmp_path.glob("created*")), "the ranks ran"
    assert _leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_a_killed_launcher_leaves_no_files(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK.replace('os.environ["RANK"] == "1"', "False"))
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipefold.runtime.processes.launch import launch_script; "
         f"launch_script([{str(script)!r}, {str(tmp_path)!r}], 2)"],
    )
    deadline = time.monotonic() + 45
    while len(list(tmp_path.glob("created*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("created*"))) == 2
    assert len(_leftovers(tmp_path)) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while _leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(tmp_path) == []


def test_the_janitor_sweeps_only_its_own_prefix(tmp_path):
    mine, other = tmp_path / "pipefold-job1-x", tmp_path / "pipefold-job2-x"
    mine.write_text("")
    other.write_text("")
    janitor = start_janitor("pipefold-job1-", str(tmp_path))
    janitor.stop()
    assert not mine.exists() and other.exists()
    with pytest.raises(ValueError, match="broad prefix"):
        start_janitor("pipefold-")
    assert sweep("pipefold-none-", str(SHM_DIR)) == []
