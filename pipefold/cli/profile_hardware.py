"""`pipefold profile --hardware FILE`: measure this machine's device and write a hardware file.

    pipefold profile --hardware here.toml                       # CPU: fp32, one thread, ~30 s
    pipefold profile --hardware h100.toml --device cuda --links-from h100-80gb --devices-per-node 8
    pipefold profile --hardware h100.toml --device cuda --dtypes bf16,fp32 \\
        --peak-flops bf16=989e12,fp32=67e12 --inter-node 50e9,1e-5 --intra-node 450e9,5e-6
    pipefold plan --hardware here.toml --model gpt --ranks 4 ...

What is measured, what assumed, and why: pipefold.plan.hardware_file, docs/plan.md "Hardware files".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipefold.errors import ConfigError
from pipefold.plan.hardware import PRESETS, load_hardware
from pipefold.plan.hardware_file import (
    DTYPE_NAMES,
    LINKS,
    MatmulSample,
    MeasuredHardware,
    check_writable,
    link_sources,
    render_hardware,
    write_atomically,
)
from pipefold.plan.units import format_bytes, parse_bytes, parse_rate
from pipefold.simulate import Link

__all__ = ["add_hardware_arguments", "measure_hardware", "reserve_bytes", "parse_link", "parse_peaks"]

DEFAULT_BUDGET_S = 30.0

CPU_RESERVE = 300 * 2**20
"""What a CPU rank holds beyond the planner's accounting: the interpreter, torch and the
transport's buffers (the cpu preset's assumption, not measured)."""

CPU_RANKS_PER_CORE = 2
"""A CPU rank's memory is the host's divided among two ranks per core at most (the cpu preset's
assumption: more ranks than that run too slowly to be planned for)."""

CPU_HANDSHAKE_S = 5e-5
"""The shared-memory channel's handshake per message (doorbell and wake-up), added to the
measured copies of a small tensor: assumed, as the cpu preset does (50 us)."""

CUDA_CONTEXT_BYTES = 2**30
CUDA_NCCL_BYTES = 2**30
CUDA_FRAGMENTATION = 0.05
"""The CUDA reserve: the context and cuBLAS workspaces (~0.5-1 GiB with lazy module loading),
NCCL's buffers for a few communicators (~1 GiB), and 5% of the memory lost to the caching
allocator's fragmentation. On an 80 GiB device: 6 GiB, the a100-80gb and h100-80gb presets'."""

COPY_BYTES = {"cpu": 64 * 2**20, "cuda": 2**30}
"""The bandwidth copy's size: well past the last-level cache (CPU: tens of MiB; H100: 50 MiB L2)."""

MATMUL_MEMORY_SHARE = 4
"""The products' operands take at most this share (1/4) of the free device memory (CUDA) or of a
rank's memory (CPU), and at most `MATMUL_MAX_BYTES`."""
MATMUL_MAX_BYTES = {"cpu": 512 * 2**20, "cuda": 16 * 2**30}


def add_hardware_arguments(parser: Any) -> None:
    group = parser.add_argument_group(
        "hardware file (--hardware FILE: measure this device, write a file pipefold plan --hardware reads)")
    group.add_argument("--hardware", metavar="FILE",
                       help="measure the device (--device) and write a hardware TOML here (atomically); "
                       "the layers are measured too only with --out or --json")
    group.add_argument("--dtypes", metavar="LIST",
                       help="dtypes whose products are timed, the first the file's default "
                       "(fp32, tf32, bf16, fp16; default: fp32 on CPU, bf16,fp32 on CUDA)")
    group.add_argument("--peak-flops", action="append", metavar="DTYPE=FLOPS",
                       help="a dtype's peak FLOP/s (a datasheet figure; efficiencies are then against it); "
                       "default: the fastest product measured. Repeat it or separate by commas")
    group.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                       help=f"time for the whole measurement (default {DEFAULT_BUDGET_S:.0f}): products grow "
                       "until the next would not fit; longer reaches larger products")
    group.add_argument("--links-from", metavar="PRESET_OR_FILE",
                       help="take the links that cannot be measured here from a preset "
                       f"({', '.join(PRESETS)}) "
                       "or hardware file (on CUDA: inter_node, and intra_node with one GPU)")
    group.add_argument("--intra-node", metavar="BANDWIDTH,LATENCY",
                       help="the link inside a node, bytes/s per device one way and seconds "
                       "(e.g. 450e9,5e-6); "
                       "overrides what is measured or taken from --links-from")
    group.add_argument("--inter-node", metavar="BANDWIDTH,LATENCY",
                       help="the link across nodes (e.g. 50e9,1e-5)")
    group.add_argument("--memory-per-device", metavar="SIZE",
                       help="memory per device (default: CUDA's total memory; CPU: the host's memory over "
                       f"{CPU_RANKS_PER_CORE} ranks per core)")
    group.add_argument("--reserve", metavar="SIZE",
                       help="what the runtime holds beyond the planner's accounting (default: CPU 300MiB; "
                       "CUDA 2GiB + 5%% of the memory)")
    group.add_argument("--devices-per-node", type=int, metavar="N",
                       help="devices per node (default: CUDA's visible device count; CPU 64, every rank on "
                       "this host)")


def parse_link(flag: str, text: str) -> Link:
    """`"50e9,1e-5"` -> Link(bandwidth=50e9, latency=1e-5)."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 2:
        raise ConfigError(f"{flag} = {text!r}; give BANDWIDTH,LATENCY: bytes/s per device one way and "
                          "seconds, e.g. 50e9,1e-5")
    bandwidth = parse_rate(parts[0], what=f"{flag} bandwidth")
    try:
        latency = float(parts[1])
    except ValueError:
        latency = -1.0
    if not latency >= 0 or latency == float("inf"):
        raise ConfigError(f"{flag} = {text!r}: latency {parts[1]!r}; give seconds >= 0, e.g. 1e-5")
    return Link(latency=latency, bandwidth=bandwidth)


def parse_peaks(values: list[str] | None, dtypes: list[str]) -> dict[str, float]:
    """`--peak-flops bf16=989e12,fp32=67e12` (repeatable) -> {dtype: FLOP/s}, each of `dtypes`."""
    peaks: dict[str, float] = {}
    for value in values or ():
        for item in str(value).split(","):
            dtype, equals, number = item.partition("=")
            dtype = dtype.strip()
            if not equals:
                raise ConfigError(f"--peak-flops = {item!r}; give DTYPE=FLOPS, e.g. bf16=989e12")
            if dtype not in dtypes:
                raise ConfigError(f"--peak-flops {dtype}: not among the measured --dtypes "
                                  f"({','.join(dtypes)}); add it to --dtypes or drop its peak")
            peaks[dtype] = parse_rate(number.strip(), what=f"--peak-flops {dtype}")
    return peaks


def parse_dtypes(text: str | None, device: str, bf16_supported: bool) -> list[str]:
    if text is None:
        if device == "cpu":
            return ["fp32"]
        return ["bf16" if bf16_supported else "fp16", "fp32"]
    dtypes = [part.strip() for part in text.split(",") if part.strip()]
    bad = [dtype for dtype in dtypes if dtype not in DTYPE_NAMES]
    if not dtypes or bad or len(set(dtypes)) != len(dtypes):
        raise ConfigError(f"--dtypes = {text!r}; give distinct dtypes among {', '.join(DTYPE_NAMES)}, "
                          "separated by commas, the default first (e.g. bf16,fp32)")
    if device == "cpu" and "tf32" in dtypes:
        raise ConfigError("--dtypes: tf32 is a mode of CUDA's tensor cores; on CPU give fp32 (or bf16)")
    if device == "cuda" and "bf16" in dtypes and not bf16_supported:
        raise ConfigError("--dtypes: bf16, but this GPU has no bf16 products; give fp16 instead")
    return dtypes


def reserve_bytes(device: str, memory_bytes: int) -> tuple[int, str]:
    """The reserve this command assumes, and the reason written into the file."""
    if device == "cpu":
        return CPU_RESERVE, "the interpreter, torch and the transport's buffers, assumed 300 MiB (cpu preset)"
    reserve = CUDA_CONTEXT_BYTES + CUDA_NCCL_BYTES + int(CUDA_FRAGMENTATION * memory_bytes)
    return reserve, ("assumed: 1 GiB CUDA context and cuBLAS workspaces + 1 GiB NCCL buffers + 5% of the "
                     f"memory for the caching allocator's fragmentation = {format_bytes(reserve)}")


def _positive_int(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} = {value!r}; give an integer >= 1")
    return value


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _device_facts(device: str, threads: int | None, num_visible: int) -> tuple[str, int, str, int, str]:
    """The device in words, its memory and devices per node, each with how it was obtained."""
    import torch

    if device == "cuda":
        index = torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return (f"cuda:{index} {properties.name}", int(properties.total_memory),
                "torch.cuda.get_device_properties().total_memory (M)", num_visible,
                "torch.cuda.device_count() (M)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host = _host_memory()
    return (f"cpu {_cpu_name()}, {cores} core(s), {threads or torch.get_num_threads()} thread(s)",
            host // (CPU_RANKS_PER_CORE * cores) // 2**20 * 2**20,
            f"the host's {format_bytes(host)} over {CPU_RANKS_PER_CORE} ranks per core x {cores} cores "
            "(A: the cpu preset's rule)",
            64, "every rank is a process of this host (A: the cpu preset's 64)")


def measure_hardware(args: argparse.Namespace, device: str, threads: int | None) -> MeasuredHardware:
    """Everything checked first (flags, the file's folder, where each link comes from), then the
    measurement within `--budget` seconds; nothing is written here."""
    import torch

    from pipefold.runtime import hardware_probe as probe

    check_writable(args.hardware)
    repeats = _positive_int("--repeats", args.repeats)
    budget = args.budget
    if not (isinstance(budget, (int, float)) and 0 < budget < float("inf")):
        raise ConfigError(f"--budget = {budget!r}; give seconds > 0 (default {DEFAULT_BUDGET_S:.0f})")
    cuda = device == "cuda"
    dtypes = parse_dtypes(args.dtypes, device, cuda and torch.cuda.is_bf16_supported())
    given_peaks = parse_peaks(args.peak_flops, dtypes)
    given_links = {link: parse_link(flag, value) for link, flag, value in (
        ("intra_node", "--intra-node", args.intra_node), ("inter_node", "--inter-node", args.inter_node))
        if value is not None}
    num_visible = torch.cuda.device_count() if cuda else 1
    sources = link_sources(device, num_visible, given=given_links, links_from=args.links_from)
    reference = load_hardware(args.links_from) if args.links_from else None
    device_name, memory, memory_note, per_node, per_node_note = _device_facts(device, threads, num_visible)
    if args.memory_per_device is not None:
        memory = parse_bytes(args.memory_per_device, what="--memory-per-device")
        memory_note = "given by --memory-per-device"
    reserve, reserve_note = reserve_bytes(device, memory)
    if args.reserve is not None:
        reserve, reserve_note = parse_bytes(args.reserve, what="--reserve"), "given by --reserve"
    if reserve >= memory:
        raise ConfigError(f"--reserve = {format_bytes(reserve)} is not below the memory per device "
                          f"({format_bytes(memory)}); give a smaller --reserve or a larger "
                          "--memory-per-device")
    if args.devices_per_node is not None:
        per_node = _positive_int("--devices-per-node", args.devices_per_node)
        per_node_note = "given by --devices-per-node"

    previous_threads = torch.get_num_threads()
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        timer = probe.Timer(device)
        bandwidth, copy_s = probe.copy_bandwidth(timer, COPY_BYTES[device], repeats)
        links, link_notes = _links(sources, given_links, reference, args.links_from,
                                   lambda: _measured_link(device, repeats, probe))
        free = torch.cuda.mem_get_info()[0] if cuda else memory
        max_bytes = min(free // MATMUL_MEMORY_SHARE, MATMUL_MAX_BYTES[device])
        samples: dict[str, list[MatmulSample]] = {}
        for position, dtype in enumerate(dtypes):
            # What is left of the budget, shared by the dtypes still to measure.
            left = budget - (time.perf_counter() - started)
            shapes = probe.layer_shapes(max_bytes, probe.DTYPES[dtype].itemsize)
            samples[dtype] = probe.time_matmuls(timer, dtype, shapes, repeats=repeats,
                                                budget_s=left / (len(dtypes) - position),
                                                min_sample_s=1e-3 if cuda else 2e-3)
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    peaks, peak_notes = {}, {}
    for dtype in dtypes:
        fastest = max(samples[dtype], key=lambda sample: sample.rate)
        if dtype in given_peaks:
            peaks[dtype], peak_notes[dtype] = given_peaks[dtype], (
                f"given by --peak-flops (A); the fastest measured {fastest.rate:.3g} FLOP/s")
        else:
            peaks[dtype] = fastest.rate
            peak_notes[dtype] = f"the fastest product measured (M), {fastest.describe()}"
    largest = {dtype: max(s.flops for s in samples[dtype]) for dtype in dtypes}
    notes = [
        f"measured in {elapsed:.1f} s (--budget {budget:g}), best of {repeats} repeats per figure; "
        f"load average {load:.2f} at the start"
        + ("" if cuda else " (CPU figures move with other processes on the host)"),
        "largest product timed: "
        + ", ".join(f"{dtype} {flops:.3g} FLOPs" for dtype, flops in largest.items())
        + f" (operands within {format_bytes(max_bytes)}; a longer --budget reaches larger ones, and "
        "the table holds flat past its last point)",
    ]
    if cuda and args.devices_per_node is None and num_visible == 1:
        notes.append("devices_per_node = 1: one GPU is visible here; a node of 8 (DGX, HGX) wants "
                     "--devices-per-node 8, or tensor parallelism is priced across nodes")
    if cuda and "fp32" in dtypes:
        notes.append("fp32 products are timed with TF32 off (torch's default, as pipefold train runs)")
    return MeasuredHardware(
        name=Path(args.hardware).stem or "measured",
        device_name=device_name, torch_version=str(torch.__version__),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        default_dtype=dtypes[0], peak_flops=peaks, peak_notes=peak_notes, samples=samples,
        memory_bandwidth=bandwidth,
        memory_bandwidth_note=f"a copy of {format_bytes(COPY_BYTES[device])} in {copy_s * 1e3:.3g} ms, "
        "read + write bytes",
        memory_bytes=memory, memory_note=memory_note, reserve_bytes=reserve, reserve_note=reserve_note,
        devices_per_node=per_node, devices_note=per_node_note, links=links, link_notes=link_notes,
        notes=notes,
    )


def _links(sources: dict[str, str], given: dict[str, Link], reference: Any, reference_name: str | None,
           measure: Callable[[], tuple[Link, str]]) -> tuple[dict[str, Link], dict[str, str]]:
    """Each link from where `link_sources` decided, with a note for the file."""
    links: dict[str, Link] = {}
    notes: dict[str, str] = {}
    measured: tuple[Link, str] | None = None
    for link in LINKS:
        source = sources[link]
        if source == "flag":
            links[link], notes[link] = given[link], f"given by --{link.replace('_', '-')} (A)"
        elif source == "links-from":
            links[link] = getattr(reference, link)
            notes[link] = f"taken from --links-from {reference_name} (A: not measurable here)"
        else:
            if measured is None:
                measured = measure()
                links[link], notes[link] = measured
            else:  # CPU: one host is one node, so both links are its shared-memory path
                links[link], notes[link] = measured[0], "the same path as links.intra_node (M)"
    return links, notes


def _measured_link(device: str, repeats: int, probe: Any) -> tuple[Link, str]:
    size = COPY_BYTES[device]
    if device == "cpu":
        bandwidth, small = probe.shared_memory_copy(size, repeats)
        return Link(latency=small + CPU_HANDSHAKE_S, bandwidth=bandwidth), (
            f"ranks on this host pass tensors through shared memory: a copy in and a copy out, "
            f"{format_bytes(size)} at {bandwidth:.3g} B/s (M); latency = the two copies of 64 bytes, "
            f"{small * 1e6:.2g} us (M), + the channel's handshake, assumed "
            f"{CPU_HANDSHAKE_S * 1e6:.0f} us (A)")
    bandwidth, small = probe.peer_copy(size, repeats)
    return Link(latency=small, bandwidth=bandwidth), (
        f"a copy of {format_bytes(size)} from cuda:0 to cuda:1 (M, one direction); latency: one 64-byte copy "
        "waited for (M); NCCL's collectives may reach less or more")


def write_hardware(measured: MeasuredHardware, path: str) -> str:
    """Render, check with the loader, and write atomically; the text written."""
    text = render_hardware(measured)
    write_atomically(path, text)
    return text


def summary(measured: MeasuredHardware, path: str) -> list[str]:
    """What the command prints: the figures and the next command."""
    lines = [f"{measured.device_name}, torch {measured.torch_version}"]
    for dtype, table in measured.tables().items():
        points = ", ".join(f"{flops:.2g}: {efficiency:.2f}" for flops, efficiency in table)
        lines.append(f"{dtype}: peak {measured.peak_flops[dtype]:.3g} FLOP/s ({measured.peak_notes[dtype]}); "
                     f"efficiency by FLOPs {points}")
    lines.append(f"memory bandwidth {measured.memory_bandwidth:.3g} B/s; memory "
                 f"{format_bytes(measured.memory_bytes)}, reserve {format_bytes(measured.reserve_bytes)}; "
                 f"{measured.devices_per_node} devices per node")
    for link in LINKS:
        value = measured.links[link]
        lines.append(f"{link}: {value.bandwidth:.3g} B/s, {value.latency * 1e6:.3g} us "
                     f"({measured.link_notes[link]})")
    lines += [f"note: {note}" for note in measured.notes]
    lines.append(f"wrote {path}; plan with: pipefold plan --hardware {path} --model gpt --ranks 2 ...")
    return lines
