"""Write a hardware file from what `pipefold profile --hardware` measured: no torch.

    table = efficiency_table(samples, peak)            # [flops, efficiency] points, one per octave
    sources = link_sources("cuda", 1, given={}, links_from="a100-80gb")
    text = render_hardware(MeasuredHardware(...))      # TOML that `load_hardware` accepts
    write_atomically(path, text)                       # a temporary file, then os.replace

The planner prices a matrix product by its FLOPs (`Hardware.matmul_for(dtype)(flops)`), so the
products measured at many shapes become one curve over FLOPs: the samples are grouped by octave
of FLOPs (2^k <= flops < 2^(k+1)) and each octave keeps the median speed of its shapes at the
geometric mean of their FLOPs. Shapes of equal FLOPs but different speed (an MLP's up and down
projections, a wide and a narrow product) so count alike; the file lists every sample in its
comments, so what the median hides can be read there.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipefold.errors import ConfigError
from pipefold.plan.hardware import Hardware, hardware_from_mapping
from pipefold.plan.units import format_bytes
from pipefold.simulate import Link

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser under its PyPI name.
    import tomli as tomllib

__all__ = [
    "DTYPE_NAMES", "LINKS", "MatmulSample", "MeasuredHardware", "efficiency_table", "link_sources",
    "render_hardware",
    "write_atomically",
]

LINKS = ("intra_node", "inter_node")
"""The links a hardware file gives, as its [links.NAME] tables name them."""

DTYPE_NAMES = ("fp32", "tf32", "bf16", "fp16")
"""The dtypes whose products `pipefold profile --hardware` times (`[compute.peak_flops]`'s keys)."""

LINK_FLAGS = {"intra_node": "--intra-node", "inter_node": "--inter-node"}
"""The `pipefold profile` flag that gives each link by hand."""


@dataclass(frozen=True)
class MatmulSample:
    """One timed product: `batch` products of (m x k) @ (k x n), `seconds` for all of them."""

    name: str
    """What the product is in a transformer layer: "qkv", "proj", "mlp_up", "mlp_down", "scores",
    "context"."""
    m: int
    k: int
    n: int
    seconds: float
    batch: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n

    @property
    def rate(self) -> float:
        return self.flops / self.seconds

    def describe(self) -> str:
        batch = f"{self.batch} x " if self.batch > 1 else ""
        return f"{self.name} {batch}({self.m} x {self.k}) @ ({self.k} x {self.n})"


def efficiency_table(samples: Sequence[MatmulSample], peak: float, *, what: str = "peak"
                     ) -> tuple[tuple[float, float], ...]:
    """[flops, efficiency] points, flops ascending: per octave of FLOPs the median speed of its
    samples over `peak`, at the geometric mean of their FLOPs (3 significant digits each).

    An efficiency above 1 (a sample's octave faster than `peak`) is refused naming `what`: a
    given peak below what was measured is not the device's peak."""
    if not samples:
        raise ConfigError(f"no matrix product was measured for {what}; give a larger budget (--budget)")
    octaves: dict[int, list[MatmulSample]] = {}
    for sample in samples:
        octaves.setdefault(math.floor(math.log2(sample.flops)), []).append(sample)
    table: list[tuple[float, float]] = []
    for octave in sorted(octaves):
        group = octaves[octave]
        flops = math.exp(statistics.fmean(math.log(s.flops) for s in group))
        rate = statistics.median(s.rate for s in group)
        efficiency = float(f"{rate / peak:.3g}")
        if efficiency > 1:
            raise ConfigError(
                f"{what} = {peak:.3g} FLOP/s, but products of about {flops:.3g} FLOPs ran at "
                f"{rate:.3g} FLOP/s; "
                "give the device's dense peak for this dtype (a datasheet figure), or leave it out to take "
                "the fastest measured"
            )
        point = float(f"{flops:.3g}")
        if table and point <= table[-1][0]:
            # Two octaves' means rounded to one number (both at an octave's edge): the loader needs
            # flops strictly ascending, and the lower octave's point stands for both.
            continue
        table.append((point, max(efficiency, 1e-6)))
    return tuple(table)


def link_sources(device: str, num_devices: int, *, given: Mapping[str, Link], links_from: str | None
                 ) -> dict[str, str]:
    """Where each link of the file comes from: "flag" (given by hand), "measured", or
    "links-from" (copied from `--links-from`'s preset or file); decided before measuring.

    Measurable here: on CPU both (ranks are processes of one host: every rank is in one node and
    sends through shared memory); on CUDA with two devices or more the link inside the node (a
    device-to-device copy). One GPU, or the link across nodes, cannot be measured from one
    machine: it must be given, else a `ConfigError` names the flags that give it."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device = {device!r}; give cpu or cuda")
    if num_devices < 1:
        raise ConfigError(f"{device} devices = {num_devices}; profile needs at least one device")
    measurable = set(LINKS) if device == "cpu" else ({"intra_node"} if num_devices >= 2 else set())
    sources = {}
    for link in LINKS:
        if link in given:
            sources[link] = "flag"
        elif link in measurable:
            sources[link] = "measured"
        elif links_from is not None:
            sources[link] = "links-from"
        else:
            why = ("one device is visible, so no link between two can be timed" if num_devices == 1
                   else "one machine cannot time a link to another node")
            raise ConfigError(
                f"links.{link} cannot be measured on {device} with {num_devices} device(s) ({why}); give it "
                f"with --links-from PRESET_OR_FILE (e.g. --links-from h100-80gb: the preset's published "
                f"figures) or {LINK_FLAGS[link]} BANDWIDTH,LATENCY (bytes/s per device one way, seconds, "
                "e.g. 50e9,1e-5)"
            )
    return sources


@dataclass(frozen=True)
class MeasuredHardware:
    """Everything a measured hardware file says, each figure with how it was obtained."""

    name: str
    device_name: str
    """The device in words: "cuda:0 NVIDIA H100 80GB HBM3", "cpu, 1 thread(s)"."""
    torch_version: str
    date: str
    default_dtype: str
    peak_flops: Mapping[str, float]
    peak_notes: Mapping[str, str]
    """Per dtype: "fastest measured ..." or "given by --peak-flops"."""
    samples: Mapping[str, Sequence[MatmulSample]]
    """Per dtype, every product timed, in the order measured."""
    memory_bandwidth: float
    memory_bandwidth_note: str
    memory_bytes: int
    memory_note: str
    reserve_bytes: int
    reserve_note: str
    devices_per_node: int
    devices_note: str
    links: Mapping[str, Link]
    link_notes: Mapping[str, str]
    notes: Sequence[str] = field(default_factory=tuple)
    """Other lines for the file's head: the command, the budget, the timing method."""

    def tables(self) -> dict[str, tuple[tuple[float, float], ...]]:
        return {dtype: efficiency_table(self.samples[dtype], self.peak_flops[dtype],
                                        what=f"peak_flops.{dtype}")
                for dtype in self.peak_flops}


def _number(value: float) -> str:
    """A TOML float with 4 significant digits (3 for the table points, which `efficiency_table`
    has rounded already)."""
    text = f"{value:.4g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _string(text: str) -> str:
    """A TOML basic string (no newlines; quotes and backslashes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def render_hardware(measured: MeasuredHardware) -> str:
    """The hardware file's TOML: comments saying what was measured and what assumed, then the
    fields `pipefold.plan.hardware.load_hardware` reads. The result is parsed back and checked
    with the loader before it is returned, so a file that the planner would refuse is never
    written."""
    tables = measured.tables()
    lines = [f"# {measured.name}: measured by pipefold profile --hardware on {measured.date}",
             f"# device: {measured.device_name}; torch {measured.torch_version}"]
    lines += [f"# {note}" for note in measured.notes]
    lines += ["# Measured (M), assumed or given (A):"]
    for dtype in measured.peak_flops:
        lines.append(f"#   peak_flops.{dtype}: {measured.peak_notes[dtype]}")
    lines += [
        "#   matmul: products of a transformer layer's shapes (M = rows x tokens; K, N multiples of the",
        "#     width h: qkv M x h x 3h, proj M x h x h, mlp_up M x h x 4h, mlp_down M x 4h x h; the",
        "#     attention core's batched scores and context, heads of 64), each the best of its repeats,",
        "#     a new result allocated per call as a layer does;",
        "#     per octave of FLOPs the MEDIAN speed of its shapes (the planner prices a product by FLOPs",
        "#     alone), at the geometric mean of their FLOPs, over the dtype's peak. Every sample below.",
        f"#   memory_bandwidth (M): {measured.memory_bandwidth_note}",
        f"#   memory.bytes: {measured.memory_note}",
        f"#   memory.reserve (A): {measured.reserve_note}",
        f"#   devices_per_node: {measured.devices_note}",
    ]
    lines += [f"#   links.{link}: {measured.link_notes[link]}" for link in LINKS]
    lines += [
        f"name = {_string(measured.name)}",
        "source = "
        + _string(f"measured on {measured.device_name} by pipefold profile --hardware, {measured.date}"),
        f"device = {_string('cpu' if measured.device_name.startswith('cpu') else 'cuda')}",
        f"devices_per_node = {measured.devices_per_node}",
        "",
        "[compute]",
        f"default_dtype = {_string(measured.default_dtype)}",
        f"memory_bandwidth = {_number(measured.memory_bandwidth)}",
        "",
        "[compute.peak_flops]",
        *(f"{dtype} = {_number(peak)}" for dtype, peak in measured.peak_flops.items()),
    ]
    for dtype in [measured.default_dtype] + [d for d in measured.peak_flops if d != measured.default_dtype]:
        header = "[compute.matmul]" if dtype == measured.default_dtype else f"[compute.matmul.{dtype}]"
        points = ", ".join(f"[{_number(flops)}, {_number(eff)}]" for flops, eff in tables[dtype])
        lines += ["", f"{header}  # {dtype}, efficiency over peak_flops.{dtype}", f"table = [{points}]"]
        for sample in sorted(measured.samples[dtype], key=lambda s: s.flops):
            lines.append(f"# {dtype} {sample.describe()}: {sample.flops:.3g} FLOPs, "
                         f"{sample.seconds * 1e6:.4g} us, {sample.rate:.3g} FLOP/s")
    lines += [
        "",
        "[memory]",
        f"bytes = {measured.memory_bytes}  # {format_bytes(measured.memory_bytes)}",
        f"reserve = {measured.reserve_bytes}  # {format_bytes(measured.reserve_bytes)}",
    ]
    for link in LINKS:
        value = measured.links[link]
        lines += ["", f"[links.{link}]", f"bandwidth = {_number(value.bandwidth)}",
                  f"latency = {_number(value.latency)}"]
    text = "\n".join(lines) + "\n"
    check_hardware_text(text, measured.name)
    return text


def check_hardware_text(text: str, origin: str) -> Hardware:
    """`text` as the loader reads it (a `ConfigError` where it would refuse it)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # a bug of render_hardware, not the user's
        raise ConfigError(f"hardware {origin!r}: the rendered file is not valid TOML: {error}") from None
    return hardware_from_mapping(data, repr(origin))


def check_writable(path: str | Path, flag: str = "--hardware") -> Path:
    """`path` if a file can be created there (its folder exists): checked before minutes of
    measuring, so a typo fails at once."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} = {str(path)!r} is a folder; give a file name such as "
                          f"{target / 'machine.toml'}")
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} = {str(path)!r}: its folder {str(target.parent)!r} does not exist; "
                          "create it or write the file elsewhere")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} = {str(path)!r}: its folder is not writable; write the file elsewhere")
    return target


def write_atomically(path: str | Path, text: str, flag: str = "--hardware") -> None:
    """`text` into `path` through a temporary file in the same folder and `os.replace`: a reader
    sees the old file or the whole new one, and a failure leaves no partial file behind."""
    target = check_writable(path, flag)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise ConfigError(f"{flag} = {str(path)!r}: cannot write the hardware file: {error}") from None
        raise
