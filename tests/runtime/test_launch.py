import ipaddress
import multiprocessing.forkserver
import os
import socket
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch.distributed

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.runtime.processes.fork_server import stop_fork_server
from pipefold.runtime.processes.launch import (
    LaunchResult,
    free_port,
    is_loopback,
    launch_script,
    loopback_store,
    script_command,
    spawn,
    worker_env,
)


def _script(tmp_path, body, name="job.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_worker_env_is_torchrun_style():
    env = worker_env(1, 3, 29555, 1)
    assert env["RANK"] == "1" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "3"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29555"
    assert env["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in worker_env(0, 1, 1, None)


def test_script_command():
    assert script_command(["a.py", "x"]) == [sys.executable, "a.py", "x"]
    assert script_command(["-m", "pkg", "x"]) == [sys.executable, "-m", "pkg", "x"]
    assert script_command(["echo", "hi"]) == ["echo", "hi"]
    with pytest.raises(ConfigError, match="no command"):
        script_command([])


def test_bad_rank_count_is_refused():
    with pytest.raises(ConfigError, match="num_ranks"):
        launch_script(["x.py"], 0)


@pytest.mark.timeout(60)
def test_success_gives_each_rank_its_environment(tmp_path):
    script = _script(tmp_path, """
        import os, sys
        out = sys.argv[1]
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
        with open(os.path.join(out, "rank" + os.environ["RANK"]), "w") as f:
            f.write(",".join(os.environ[k] for k in keys))
    """)
    result = launch_script([script, str(tmp_path)], 3)
    assert result == LaunchResult(exit_code=0)
    seen = sorted((tmp_path / f"rank{rank}").read_text().split(",") for rank in range(3))
    assert [row[0] for row in seen] == ["0", "1", "2"]
    assert {row[2] for row in seen} == {"3"}
    assert len({row[4] for row in seen}) == 1  # one rendezvous port
    assert {row[5] for row in seen} == {"1"}


@pytest.mark.timeout(40)
def test_a_failing_rank_stops_the_others_and_is_named(tmp_path):
    # Rank 0 would sleep far past the test timeout unless the launcher stops it.
    script = _script(tmp_path, """
        import os, time
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
            raise ValueError("boom on rank one")
        time.sleep(300)
    """)
    result = launch_script([script], 2, grace_s=1.0)
    assert result.exit_code == 1
    assert result.failed_rank == 1
    assert any("boom on rank one" in line for line in result.error_lines)
    assert "rank 1 failed" in result.describe() and "boom on rank one" in result.describe()


@pytest.mark.timeout(40)
def test_a_worker_ignoring_sigterm_is_killed(tmp_path):
    script = _script(tmp_path, """
        import os, signal, sys, time
        if os.environ["RANK"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(300)
        time.sleep(0.5)
        sys.exit(3)
    """)
    result = launch_script([script], 2, grace_s=0.5)
    assert result.exit_code == 3 and result.failed_rank == 1


@pytest.mark.timeout(40)
def test_cli_exit_code_and_message(tmp_path, capsys):
    script = _script(tmp_path, """
        import os, sys
        sys.exit(int(os.environ["RANK"]) * 2)
    """)
    assert main(["launch", "-n", "2", "--", script]) == 2
    assert "rank 1 failed with exit code 2" in capsys.readouterr().err
    ok = _script(tmp_path, "print('fine')\n", name="ok.py")
    assert main(["launch", "-n", "2", "--", ok]) == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_workers_join_a_gloo_group(tmp_path):
    script = _script(tmp_path, """
        import sys, torch, torch.distributed as dist
        from pipefold.runtime.processes.launch import init_process_group_from_env
        init_process_group_from_env("gloo")  # explicit: on a GPU host the default is NCCL
        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)
        assert torch.get_num_threads() == 1
        assert value.item() == 3.0, value
        if dist.get_rank() == 0:
            import os, socket
            port = int(os.environ["MASTER_PORT"])
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            address = sys.argv[1]
            if address != "none":
                try:
                    socket.create_connection((address, port), timeout=5).close()
                except ConnectionRefusedError:
                    pass
                else:
                    raise AssertionError(f"the store answered on {address}:{port}")
        dist.barrier()
        dist.destroy_process_group()
    """)
    assert launch_script([script, _routable_address() or "none"], 2).ok


def _routable_address():
    """One of this host's non-loopback IPv4 addresses (None on a host without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: picks the route's source address, sends nothing
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_store_of_a_local_job_refuses_other_addresses():
    """The attack as reported: a plain TCPStore client from another address of the host.
    rank 0's store must accept loopback only."""
    address = _routable_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to connect from")
    port = free_port()
    server = loopback_store("127.0.0.1", port, 0, 1, 10.0)
    server.set("job/key", "value")
    client = torch.distributed.TCPStore("127.0.0.1", port, 1, False, timedelta(seconds=5))
    assert client.get("job/key") == b"value"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, port), timeout=5).close()
    with pytest.raises(Exception, match="(?i)connect|refused|timed out|timeout"):
        torch.distributed.TCPStore(address, port, 1, False, timedelta(seconds=2)).set("job/failure", "fake")
    assert client.get("job/key") == b"value"
    del client, server


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("127.0.0.2", True),
     ("10.0.0.1", False), ("node-0", False), ("0.0.0.0", False)],
)
def test_loopback_addresses(address, expected):
    assert is_loopback(address) is expected


def _raise_on_rank_one(marker):
    if os.environ["RANK"] == "1":
        raise RuntimeError(f"function failed: {marker}")
    time.sleep(300)


def _write_rank(directory):
    import torch

    with open(os.path.join(directory, os.environ["RANK"]), "w") as f:
        f.write(f"{os.environ['WORLD_SIZE']},{torch.get_num_threads()}")


@pytest.mark.timeout(90)
def test_spawn_function_success_and_failure(tmp_path):
    assert spawn(_write_rank, 2, (str(tmp_path),)).ok
    assert (tmp_path / "0").read_text() == "2,1" and (tmp_path / "1").read_text() == "2,1"
    # num_threads=None: these workers never import torch, which keeps the test fast.
    result = spawn(_raise_on_rank_one, 2, ("marker-42",), num_threads=None, grace_s=1.0)
    assert result.exit_code == 1 and result.failed_rank == 1
    assert any("function failed: marker-42" in line for line in result.error_lines)


def _bad_input_on_rank_one(marker):
    if os.environ["RANK"] == "1":
        raise ConfigError(f"resume={marker!r} does not fit; pass another checkpoint")
    time.sleep(300)


@pytest.mark.timeout(60)
def test_a_config_error_on_a_rank_is_reported_as_its_message_alone(tmp_path, capfd):
    result = spawn(_bad_input_on_rank_one, 2, ("marker-7",), num_threads=None, grace_s=1.0)
    assert result.exit_code == 1 and result.failed_rank == 1
    assert result.error_lines == ("ConfigError: resume='marker-7' does not fit; pass another checkpoint",)
    assert "Traceback" not in capfd.readouterr().err  # neither the rank nor multiprocessing printed one


def test_interrupt_stops_everyone(tmp_path, monkeypatch):
    script = _script(tmp_path, "import time\ntime.sleep(300)\n")
    calls = []

    def fake_sleep(seconds, real=time.sleep):
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(seconds)

    monkeypatch.setattr("pipefold.runtime.processes.launch.time.sleep", fake_sleep)
    result = launch_script([script], 2, grace_s=5.0)
    assert result.interrupted and result.exit_code == 130


@pytest.mark.timeout(30)
def test_the_fork_server_is_stopped_without_its_slow_exit(tmp_path, monkeypatch):
    # A server whose interpreter exit takes two minutes (as torch's takes about half a second):
    # stopping it must not wait for that exit, or the launcher's end would leave it running
    # beside whatever the user starts next.
    (tmp_path / "slow_exit.py").write_text("import atexit, time\natexit.register(time.sleep, 120)\n")
    # The server's interpreter reads PYTHONPATH (this Python's server ignores a sys.path passed).
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = multiprocessing.forkserver.ForkServer()
    server.set_forkserver_preload(["slow_exit"])
    monkeypatch.setattr(multiprocessing.forkserver, "_forkserver", server)
    server.ensure_running()
    pid = server._forkserver_pid
    assert stop_fork_server()
    assert server._forkserver_pid is None  # forgotten: a later launch starts a new one
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not stop_fork_server()
