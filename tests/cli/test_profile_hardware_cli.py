"""`pipefold profile --hardware FILE` end to end on this CPU: tiny budget, one repeat."""

import re

import pytest

from pipefold.cli.main import EXIT_USAGE, main
from pipefold.cli.profile_hardware import parse_dtypes, parse_link, reserve_bytes
from pipefold.errors import ConfigError
from pipefold.plan.hardware import load_hardware
from pipefold.runtime import hardware_probe
from pipefold.runtime.hardware_probe import layer_shapes

QUICK = ["--device", "cpu", "--budget", "0.3", "--repeats", "1"]


@pytest.fixture(scope="module")
def measured_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardware") / "here.toml"
    assert main(["profile", "--hardware", str(path), *QUICK]) == 0
    return path


def test_the_written_file_loads_with_every_field(measured_file):
    hardware = load_hardware(measured_file)
    assert hardware.name == "here" and hardware.default_dtype == "fp32"
    assert set(hardware.peak_flops) == {"fp32"} and hardware.peak("fp32") > 0
    table = hardware.matmul.table
    flops = [point[0] for point in table]
    assert len(table) >= 2 and flops == sorted(set(flops))
    assert all(0 < efficiency <= 1 for _, efficiency in table)
    assert max(efficiency for _, efficiency in table) > 0.5  # the peak is a measured product's speed
    assert hardware.memory_bandwidth > 0 and 0 < hardware.usable_memory < hardware.memory_bytes
    assert hardware.reserve_bytes == reserve_bytes("cpu", hardware.memory_bytes)[0]
    assert hardware.devices_per_node == 64
    assert hardware.intra_node == hardware.inter_node and hardware.intra_node.latency >= 5e-5
    text = measured_file.read_text()
    for said in ("torch ", "load average", "shared memory", "assumed 300 MiB",
                 "the fastest product measured"):
        assert said in text


def test_the_planner_reads_the_file(measured_file, capsys):
    assert main(["plan", "--hardware", str(measured_file), "--model", "gpt", "--num-layers", "2", "--d-model",
                 "32", "--num-heads", "2", "--seq-len", "16", "--vocab-size", "64", "--ranks", "2",
                 "--batch-size", "4", "--json"]) == 0
    assert '"num_ranks": 2' in capsys.readouterr().out


def test_a_given_peak_is_what_efficiencies_are_against(tmp_path):
    path = tmp_path / "slow.toml"
    peak = 1e14  # far above what one CPU thread reaches
    assert main(["profile", "--hardware", str(path), *QUICK, "--peak-flops", "fp32=1e14", "--reserve", "1GiB",
                 "--memory-per-device", "8GiB", "--devices-per-node", "4", "--inter-node", "1e9,2e-5"]) == 0
    hardware = load_hardware(path)
    assert hardware.peak("fp32") == peak
    assert all(efficiency < 0.1 for _, efficiency in hardware.matmul.table)
    assert (hardware.memory_bytes, hardware.reserve_bytes, hardware.devices_per_node) == (8 * 2**30, 2**30, 4)
    assert hardware.inter_node.bandwidth == 1e9 and hardware.inter_node.latency == 2e-5
    assert "given by --peak-flops" in path.read_text()


def test_a_failed_measurement_writes_nothing(tmp_path, monkeypatch):
    def fail(*_args, **_kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(hardware_probe, "time_matmuls", fail)
    path = tmp_path / "x.toml"
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["profile", "--hardware", str(path), *QUICK])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--peak-flops", "bf16=1e12"], r"--peak-flops bf16: not among the measured --dtypes \(fp32\)"),
    (["--peak-flops", "fp32"], r"--peak-flops = 'fp32'; give DTYPE=FLOPS"),
    (["--peak-flops", "fp32=-1"], r"--peak-flops fp32 = '-1'; give a positive number"),
    (["--dtypes", "fp32,int8"], r"--dtypes = 'fp32,int8'; give distinct dtypes among"),
    (["--dtypes", "tf32"], r"tf32 is a mode of CUDA"),
    (["--budget", "0"], r"--budget = 0.0; give seconds > 0"),
    (["--inter-node", "fast"], r"--inter-node = 'fast'; give BANDWIDTH,LATENCY"),
    (["--reserve", "9GiB", "--memory-per-device", "8GiB"], r"--reserve = 9 GiB is not below"),
    (["--devices-per-node", "0"], r"--devices-per-node = 0; give an integer >= 1"),
    (["--links-from", "nosuch"], r"--hardware = 'nosuch' is neither a preset"),
])
def test_bad_flags_are_refused_before_measuring(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(hardware_probe, "copy_bandwidth", None)  # measuring would fail differently
    assert main(["profile", "--hardware", str(tmp_path / "x.toml"), *QUICK, *flags]) == EXIT_USAGE
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_cuda_defaults_and_link_parsing():
    assert parse_dtypes(None, "cpu", False) == ["fp32"]
    assert parse_dtypes(None, "cuda", True) == ["bf16", "fp32"]
    assert parse_dtypes(None, "cuda", False) == ["fp16", "fp32"]
    with pytest.raises(ConfigError, match="no bf16 products; give fp16"):
        parse_dtypes("bf16", "cuda", False)
    assert parse_link("--intra-node", "450e9, 5e-6").bandwidth == 450e9
    with pytest.raises(ConfigError, match=r"--intra-node = '1e9,-1': latency"):
        parse_link("--intra-node", "1e9,-1")
    # An 80 GiB GPU keeps 6 GiB back, the A100 and H100 presets' reserve.
    assert reserve_bytes("cuda", 80 * 2**30)[0] == 6 * 2**30


def test_layer_shapes_ascend_and_fit():
    shapes = layer_shapes(max_bytes=2**20, value_bytes=4)
    assert [s.flops for s in shapes] == sorted(s.flops for s in shapes)
    assert all(s.num_bytes(4) <= 2**20 for s in shapes)
    assert {s.name for s in shapes} == {"qkv", "proj", "mlp_up", "mlp_down", "scores", "context"}
    assert shapes[0].flops == 2 * 32**3


def test_products_are_timed_until_the_budget_and_at_least_a_few():
    shapes = layer_shapes(max_bytes=2**20, value_bytes=4)[:hardware_probe.MIN_PRODUCTS + 3]
    timer = hardware_probe.Timer("cpu")
    timed = hardware_probe.time_matmuls(timer, "fp32", shapes, budget_s=0, repeats=1)
    assert len(timed) == hardware_probe.MIN_PRODUCTS
    samples = hardware_probe.time_matmuls(timer, "fp32", shapes, budget_s=60, repeats=1)
    assert [(s.name, s.m, s.k, s.n) for s in samples] == [(s.name, s.m, s.k, s.n) for s in shapes]
    assert all(s.seconds > 0 for s in samples)


def test_one_gpu_without_a_link_source_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """As on a machine lent one GPU: CUDA reported present with one device, nothing timed."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_args, **_kwargs: True)
    monkeypatch.setattr(hardware_probe, "copy_bandwidth", None)
    assert main(["profile", "--hardware", str(tmp_path / "h100.toml"), "--device", "cuda"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "links.intra_node cannot be measured on cuda with 1 device(s)" in err
    assert "--links-from PRESET_OR_FILE" in err and "--intra-node BANDWIDTH,LATENCY" in err
    assert list(tmp_path.iterdir()) == []


def test_cuda_samples_are_read_from_events_after_the_end_event(monkeypatch):
    """The CUDA timer's calls on a stand-in for torch.cuda's events: record, then the end event
    waited for, then the elapsed milliseconds read."""
    import time as clock

    import torch

    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = clock.perf_counter()
            calls.append("record")

        def synchronize(self):
            calls.append("synchronize")

        def elapsed_time(self, end):
            assert calls[-1] == "synchronize"  # read only after the end event completed
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_args: None)
    timer = hardware_probe.Timer("cuda")
    assert timer.per_call(lambda: sum(range(100)), repeats=2, min_sample_s=1e-4) > 0
    assert calls[:3] == ["record", "record", "synchronize"]
