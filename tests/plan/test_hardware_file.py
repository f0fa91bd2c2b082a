"""`pipefold.plan.hardware_file`: the measured hardware file's table, links, text and atomic write."""

import os
from pathlib import Path

import pytest

from pipefold.errors import ConfigError
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.hardware_file import (
    MatmulSample,
    MeasuredHardware,
    efficiency_table,
    link_sources,
    render_hardware,
    write_atomically,
)
from pipefold.simulate import Link

LINK = Link(latency=1e-5, bandwidth=5e10)


def sample(flops_m: int, seconds: float, name: str = "proj") -> MatmulSample:
    """A product of 2 x m x 64 x 64 FLOPs."""
    return MatmulSample(name, flops_m, 64, 64, seconds)


def test_table_keeps_each_octaves_median_speed_at_its_mean_flops():
    # Three products in one octave (m = 64: 524288 FLOPs) at three speeds, one twice as large.
    samples = [sample(64, 1e-5), sample(64, 2e-5, "qkv"), sample(64, 4e-5, "mlp_up"), sample(128, 1e-5)]
    peak = max(s.rate for s in samples)
    table = efficiency_table(samples, peak)
    assert [flops for flops, _ in table] == [5.24e5, 1.05e6]  # 2 x 64 x 64 x 64, 3 significant digits
    assert table[0][1] == pytest.approx(samples[1].rate / peak, rel=1e-2)  # the median of the three
    assert table[1][1] == 1.0
    assert all(0 < efficiency <= 1 for _, efficiency in table)


def test_a_given_peak_below_a_measured_speed_is_refused():
    samples = [sample(64, 1e-5)]
    assert efficiency_table(samples, 10 * samples[0].rate)[0][1] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"peak_flops.fp32 = .*datasheet"):
        efficiency_table(samples, samples[0].rate / 2, what="peak_flops.fp32")


def test_links_are_measured_where_they_can_be_and_else_refused_naming_the_flags():
    assert link_sources("cpu", 1, given={}, links_from=None) == {"intra_node": "measured",
                                                                  "inter_node": "measured"}
    # One GPU: no link between two devices can be timed here.
    with pytest.raises(ConfigError, match=r"links.intra_node .*one device.*--links-from.*--intra-node"):
        link_sources("cuda", 1, given={}, links_from=None)
    assert link_sources("cuda", 1, given={}, links_from="h100-80gb") == {"intra_node": "links-from",
                                                                         "inter_node": "links-from"}
    # Two GPUs: the node's link is measured; across nodes still needs a source.
    with pytest.raises(ConfigError, match=r"links.inter_node .*another node.*--inter-node"):
        link_sources("cuda", 2, given={}, links_from=None)
    assert link_sources("cuda", 2, given={"inter_node": LINK}, links_from=None) == {
        "intra_node": "measured", "inter_node": "flag"}
    assert link_sources("cuda", 8, given={"intra_node": LINK}, links_from="a100-80gb") == {
        "intra_node": "flag", "inter_node": "links-from"}


def measured(**changes) -> MeasuredHardware:
    fields = dict(
        name="toy", device_name="cuda:0 Toy GPU", torch_version="2.x", date="2026-12-07",
        default_dtype="bf16", peak_flops={"bf16": 5e11, "fp32": 1e11},
        peak_notes={"bf16": "fastest", "fp32": "fastest"},
        samples={"bf16": [sample(64, 4e-6), sample(1024, 2e-5)],
                 "fp32": [sample(64, 1e-5), sample(1024, 1e-4)]},
        memory_bandwidth=2e12, memory_bandwidth_note="copy", memory_bytes=80 * 2**30, memory_note="total",
        reserve_bytes=6 * 2**30, reserve_note="assumed", devices_per_node=8, devices_note="count",
        links={"intra_node": Link(5e-6, 3e11), "inter_node": LINK},
        link_notes={"intra_node": "measured", "inter_node": "taken from --links-from h100-80gb"},
    )
    fields.update(changes)
    return MeasuredHardware(**fields)


def test_the_rendered_file_loads_with_every_field_and_a_curve_per_dtype(tmp_path):
    path = tmp_path / "toy.toml"
    write_atomically(path, render_hardware(measured()))
    hardware = load_hardware(path)
    assert (hardware.name, hardware.default_dtype, hardware.devices_per_node) == ("toy", "bf16", 8)
    assert hardware.peak("bf16") == 5e11 and hardware.peak("fp32") == 1e11
    assert (hardware.memory_bytes, hardware.reserve_bytes) == (80 * 2**30, 6 * 2**30)
    assert hardware.memory_bandwidth == 2e12
    assert hardware.intra_node == Link(5e-6, 3e11) and hardware.inter_node == LINK
    bf16, fp32 = hardware.matmul_for("bf16"), hardware.matmul_for("fp32")
    assert bf16 is hardware.matmul and set(hardware.matmul_by_dtype) == {"fp32"}
    big = sample(1024, 1).flops
    # Each dtype's curve is its own speed over its own peak.
    assert bf16(big) == pytest.approx(big / 2e-5 / 5e11, rel=1e-3)
    assert fp32(big) == pytest.approx(big / 1e-4 / 1e11, rel=1e-3)
    for curve in (bf16, fp32):
        flops = [point[0] for point in curve.table]
        assert flops == sorted(flops) and all(0 < point[1] <= 1 for point in curve.table)
    text = path.read_text()
    assert "taken from --links-from h100-80gb" in text and "MEDIAN" in text and "2.x" in text
    # The planner prices a product in a dtype with that dtype's curve.
    estimate = GptEstimate(num_layers=1, d_model=64, num_heads=1, seq_len=16, vocab_size=64,
                           hardware=hardware, dtype="fp32")
    assert estimate._gemm(big) == pytest.approx(big / (1e11 * fp32(big)))


def test_the_file_says_which_device_it_measured(tmp_path):
    # The planner prices AdamW's foreach path on CUDA and its single-tensor one on CPU.
    for device_name, device in (("cuda:0 Toy GPU", "cuda"), ("cpu, 1 thread(s)", "cpu")):
        path = tmp_path / f"{device}.toml"
        write_atomically(path, render_hardware(measured(device_name=device_name)))
        assert load_hardware(path).device == device


def test_a_curve_for_a_dtype_without_a_peak_is_refused(tmp_path):
    text = render_hardware(measured()).replace("[compute.matmul.fp32]", "[compute.matmul.fp16]")
    (tmp_path / "x.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"compute.matmul.fp16 .*unknown.*\[compute.matmul.DTYPE\]"):
        load_hardware(tmp_path / "x.toml")


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    path = tmp_path / "machine.toml"
    path.write_text("old")

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ConfigError, match=r"--hardware = .*machine.toml.*disk full"):
        write_atomically(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["machine.toml"]


def test_a_file_the_loader_would_refuse_is_never_rendered():
    with pytest.raises(ConfigError, match="memory.reserve"):
        render_hardware(measured(reserve_bytes=100 * 2**30))


def test_an_unwritable_target_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--hardware = .*does not exist; create it"):
        write_atomically(tmp_path / "no" / "x.toml", "x")
    with pytest.raises(ConfigError, match="is a folder"):
        write_atomically(Path(tmp_path), "x")
