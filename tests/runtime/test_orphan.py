"""Ranks must not outlive a supervisor that was killed outright (pipefold/runtime/processes/orphan.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipefold.runtime.processes.orphan import arm_orphan_guard, die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")

_SLEEPER = """
    import os, sys, time
    def sleeper(out):
        with open(os.path.join(out, "pid%d" % os.getpid()), "w"):
            pass
        time.sleep(120)
    if __name__ == "__main__":
        sleeper(sys.argv[1])
"""

_SUPERVISORS = {
    "script": """
        import sys
        from pipefold.runtime.processes.launch import launch_script
        launch_script([sys.argv[2] + "/helper.py", sys.argv[1]], 2, num_threads=None)
    """,
    "function": """
        import sys
        from pipefold.runtime.processes.launch import spawn
        if __name__ == "__main__":  # spawned children import this file again
            sys.path.insert(0, sys.argv[2])
            from helper import sleeper
            spawn(sleeper, 2, args=(sys.argv[1],), num_threads=None)
    """,
}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]  # a zombie has exited; only its entry waits for a reaper


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_guard_is_available_and_checks_the_parent():
    assert arm_orphan_guard()
    assert die_with_parent(os.getppid())  # our parent is alive: armed, no exit


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(_SUPERVISORS))
def test_ranks_die_when_their_supervisor_is_killed(tmp_path, kind):
    (tmp_path / "helper.py").write_text(textwrap.dedent(_SLEEPER))
    supervisor_path = tmp_path / "supervisor.py"
    supervisor_path.write_text(textwrap.dedent(_SUPERVISORS[kind]))
    out = tmp_path / "out"
    out.mkdir()
    supervisor = subprocess.Popen([sys.executable, str(supervisor_path), str(out), str(tmp_path)])
    try:
        assert _wait_for(lambda: len(list(out.iterdir())) == 2, 60), "the ranks did not start"
        pids = [int(path.name[3:]) for path in out.iterdir()]
        assert all(_alive(pid) for pid in pids)
        # SIGKILL: the supervisor runs no cleanup at all, only the kernel can stop the ranks.
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(timeout=10)
        assert _wait_for(lambda: not any(_alive(pid) for pid in pids), 10), (
            f"ranks {[pid for pid in pids if _alive(pid)]} outlived their killed supervisor"
        )
    finally:
        supervisor.kill()
        for path in out.iterdir():
            try:
                os.kill(int(path.name[3:]), signal.SIGKILL)
            except ProcessLookupError:
                pass
