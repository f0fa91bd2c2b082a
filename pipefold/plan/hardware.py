"""`Hardware`: one machine type as the planner prices it, read from a TOML file or a preset.

    >>> from pipefold.plan.hardware import load_hardware
    >>> a100 = load_hardware("a100-80gb")            # a preset, or a path to a TOML file
    >>> a100.devices_per_node, a100.peak("bf16")
    (8, 312000000000000.0)

A file gives peak FLOP/s per dtype, how efficiently a matrix product of a given size runs
(a saturating curve or a table), memory bandwidth, memory per device and what the runtime
reserves of it, devices per node, and the links inside a node and across nodes. Every field
is checked: a missing or non-positive one is a `ConfigError` naming the file, the field, the
value and the fix. The format, the presets and their sources: docs/plan.md, "Hardware files".
A mix of device kinds (`[[device_groups]]`: count, speed or peak FLOP/s, memory per group) gives
each pipeline rank its own speed and memory: docs/plan.md, "Heterogeneous devices". No torch.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pipefold.errors import ConfigError
from pipefold.plan.units import parse_bytes
from pipefold.simulate import Link

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser under its PyPI name.
    import tomli as tomllib

__all__ = ["DEVICE_KINDS", "DeviceGroup", "Hardware", "MatmulEfficiency", "PRESETS", "load_hardware",
           "hardware_from_mapping"]

PRESETS = ("a100-80gb", "h100-80gb", "cpu")
DEVICE_KINDS = ("cuda", "cpu")
"""A hardware file's `device`."""
"""Hardware files shipped with pipefold (pipefold/plan/presets/NAME.toml)."""


@dataclass(frozen=True)
class MatmulEfficiency:
    """The fraction of peak a matrix product of `flops` FLOPs (2 M N K) runs at.

    Either a saturating curve, `max_efficiency * flops / (flops + half_flops)` (half of the
    maximum at `half_flops`), or a table of (flops, efficiency) points read with log-linear
    interpolation and held flat past its ends.
    """

    max_efficiency: float = 1.0
    half_flops: float = 0.0
    table: tuple[tuple[float, float], ...] = ()

    def __call__(self, flops: float) -> float:
        if self.table:
            sizes = [point[0] for point in self.table]
            if flops <= sizes[0]:
                return self.table[0][1]
            if flops >= sizes[-1]:
                return self.table[-1][1]
            index = bisect.bisect_right(sizes, flops)
            (x0, y0), (x1, y1) = self.table[index - 1], self.table[index]
            share = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + share * (y1 - y0)
        if flops <= 0:
            return self.max_efficiency
        return self.max_efficiency * flops / (flops + self.half_flops)

    def describe(self) -> str:
        if self.table:
            low, high = self.table[0][1], self.table[-1][1]
            return f"table of {len(self.table)} points, {low:.0%} to {high:.0%} of peak"
        return f"{self.max_efficiency:.0%} of peak at most, half that at {self.half_flops:.3g} FLOPs"


@dataclass(frozen=True)
class DeviceGroup:
    """Devices of one kind in a mix (`[[device_groups]]`): numbered after the groups before it."""

    name: str
    count: int
    """Devices of this kind: whole nodes (a multiple of devices_per_node)."""
    speed: float
    """Compute speed relative to the file's [compute] device: every stage on it takes 1 / speed as
    long (a group's `peak_flops` gives peak_flops / compute.peak_flops[default_dtype])."""
    memory_bytes: int
    reserve_bytes: int

    @property
    def usable_memory(self) -> int:
        return self.memory_bytes - self.reserve_bytes


@dataclass(frozen=True)
class Hardware:
    """A machine type: its devices, their speed and memory, and the links between them."""

    name: str
    peak_flops: Mapping[str, float]
    """FLOP/s of dense matrix products per dtype ("bf16", "fp16", "tf32", "fp32")."""
    matmul: MatmulEfficiency
    memory_bandwidth: float
    """Bytes/s of device memory: what element-wise work (norms, softmax, GELU, dropout) runs at."""
    memory_bytes: int
    """Memory per device."""
    reserve_bytes: int
    """What the runtime holds beyond the planner's accounting (CUDA context, allocator cache
    and fragmentation, communication buffers); the plan's default limit is memory - reserve."""
    devices_per_node: int
    intra_node: Link
    """Between two devices of one node (per device, one direction)."""
    inter_node: Link
    """Between devices of different nodes (per device, one direction)."""
    default_dtype: str
    source: str = ""
    """Where the figures come from."""
    device_groups: tuple[DeviceGroup, ...] = ()
    """A mix of device kinds, in device order (docs/plan.md, "Heterogeneous devices"); empty:
    every device is the file's [compute] and [memory] device, in any number."""
    matmul_by_dtype: Mapping[str, MatmulEfficiency] = field(default_factory=dict)
    """Curves of their own for some dtypes (`[compute.matmul.DTYPE]`, as `pipefold profile
    --hardware` measures each dtype); a dtype without one uses `matmul`."""
    device: str = "cuda"
    """What runs the ranks, "cuda" or "cpu" (the file's `device`; "cuda" where it gives none):
    torch's AdamW takes its foreach path on CUDA and its single-tensor one on CPU, whose
    temporaries differ (`pipefold.plan.update_memory`)."""

    def matmul_for(self, dtype: str) -> MatmulEfficiency:
        """The efficiency curve of products in `dtype`: its own where the file gives one."""
        return self.matmul_by_dtype.get(dtype, self.matmul)

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ConfigError(
                f"dtype = {dtype!r}: hardware {self.name!r} gives peak_flops for {sorted(self.peak_flops)}; "
                "pick one of them, or add it to the file's [compute.peak_flops]"
            )
        return float(self.peak_flops[dtype])

    @property
    def usable_memory(self) -> int:
        """What the plan may use of one device; in a mix, of the largest (each rank is then held to
        its own devices' `device_memory`)."""
        if self.device_groups:
            return max(group.usable_memory for group in self.device_groups)
        return self.memory_bytes - self.reserve_bytes

    @property
    def num_devices(self) -> int | None:
        """The devices of a mix (the sum of its groups' counts); None: any number."""
        return sum(group.count for group in self.device_groups) if self.device_groups else None

    @property
    def is_mixed(self) -> bool:
        """Whether some device differs from the reference device ([compute] at speed 1, [memory])
        in speed or usable memory: then each pipeline rank has its own (`pipefold.plan.topology`)."""
        reference = (1.0, self.memory_bytes - self.reserve_bytes)
        return any((group.speed, group.usable_memory) != reference for group in self.device_groups)

    def group_of(self, device: int) -> DeviceGroup | None:
        """The group of device `device` (numbered group by group); None without groups."""
        for group in self.device_groups:
            if device < group.count:
                return group
            device -= group.count
        return None

    def device_speed(self, device: int) -> float:
        group = self.group_of(device)
        return 1.0 if group is None else group.speed

    def device_memory(self, device: int) -> int:
        """What the plan may use of device `device`: its memory less its reserve."""
        group = self.group_of(device)
        return self.usable_memory if group is None else group.usable_memory

    def check_devices(self, num_devices: int, what: str = "num_devices") -> None:
        """Refuse a device count that does not fill whole nodes (one partial node is fine), and in a
        mix any count but the mix's own: the mesh is placed on every device of it."""
        total = self.num_devices
        if total is not None and num_devices != total:
            counts = " + ".join(f"{group.count} {group.name}" for group in self.device_groups)
            raise ConfigError(
                f"{what} = {num_devices}, but hardware {self.name!r} has {total} devices in device_groups "
                f"({counts}) and the mesh is placed on all of them; give {what} = {total} (--devices "
                f"{total}), or edit the groups' counts to the devices you use"
            )
        per_node = self.devices_per_node
        if num_devices > per_node and num_devices % per_node:
            lower = num_devices // per_node * per_node
            raise ConfigError(
                f"{what} = {num_devices} is not a multiple of hardware {self.name!r}'s devices_per_node = "
                f"{per_node}; use whole nodes ({lower} or {lower + per_node}) or fewer than one node"
            )


def _where(origin: str, field: str) -> str:
    return f"hardware {origin}: {field}"


def _table(origin: str, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(origin, key)} is missing; add a [{key}] table (see docs/plan.md, "
                          "'Hardware files')")
    return value


def _positive(origin: str, data: Mapping[str, Any], key: str, field: str, *, fraction: bool = False,
              size: bool = False) -> float:
    if key not in data:
        raise ConfigError(f"{_where(origin, field)} is missing; give it (see docs/plan.md, 'Hardware files')")
    value = data[key]
    if size and isinstance(value, str):
        return float(parse_bytes(value, what=f"hardware {origin}: {field}"))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{_where(origin, field)} = {value!r}; give a finite number > 0"
                          + (" (or a size such as '80GiB')" if size else ""))
    if fraction and value > 1:
        raise ConfigError(f"{_where(origin, field)} = {value!r}; give a fraction of peak in (0, 1]")
    return float(value)


def _link(origin: str, links: Mapping[str, Any], key: str) -> Link:
    data = _table(origin, links, key) if key in links else None
    if data is None:
        raise ConfigError(f"{_where(origin, 'links.' + key)} is missing; add [links.{key}] with bandwidth "
                          "(bytes/s per device) and latency (s)")
    bandwidth = _positive(origin, data, "bandwidth", f"links.{key}.bandwidth")
    if "latency" not in data:
        raise ConfigError(f"{_where(origin, f'links.{key}.latency')} is missing; give seconds >= 0")
    latency = data["latency"]
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not (
        math.isfinite(latency) and latency >= 0
    ):
        raise ConfigError(f"{_where(origin, f'links.{key}.latency')} = {latency!r}; give seconds >= 0")
    return Link(latency=float(latency), bandwidth=bandwidth)


_CURVE_KEYS = ("table", "max_efficiency", "half_flops")


def _matmul(origin: str, compute: Mapping[str, Any]) -> MatmulEfficiency:
    data = compute.get("matmul")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(origin, 'compute.matmul')} is missing; add [compute.matmul] with "
                          "max_efficiency and half_flops, or a table of [flops, efficiency] points")
    return _curve(origin, data, "compute.matmul")


def _matmul_by_dtype(origin: str, compute: Mapping[str, Any], peaks: Mapping[str, float]
                     ) -> dict[str, MatmulEfficiency]:
    """The `[compute.matmul.DTYPE]` sub-tables: a curve per dtype that has a peak."""
    data = compute["matmul"]
    curves = {}
    for key, value in data.items():
        if key in _CURVE_KEYS:
            continue
        if key not in peaks or not isinstance(value, Mapping):
            raise ConfigError(
                f"{_where(origin, 'compute.matmul.' + key)} = {value!r}: unknown; [compute.matmul] holds "
                f"{', '.join(_CURVE_KEYS)} and [compute.matmul.DTYPE] curves for a dtype of "
                f"[compute.peak_flops] ({', '.join(sorted(peaks))})"
            )
        curves[key] = _curve(origin, value, f"compute.matmul.{key}")
    return curves


def _curve(origin: str, data: Mapping[str, Any], where: str) -> MatmulEfficiency:
    if "table" in data:
        points = data["table"]
        if not isinstance(points, list) or not points or not all(
            isinstance(p, list) and len(p) == 2 for p in points
        ):
            raise ConfigError(f"{_where(origin, where + '.table')} = {points!r}; give a list of "
                              "[flops, efficiency] pairs, flops ascending")
        table = []
        for index, (flops, efficiency) in enumerate(points):
            entry = {"flops": flops, "efficiency": efficiency}
            table.append((
                _positive(origin, entry, "flops", f"{where}.table[{index}][0]"),
                _positive(origin, entry, "efficiency", f"{where}.table[{index}][1]", fraction=True),
            ))
        if any(b[0] <= a[0] for a, b in zip(table, table[1:], strict=False)):
            raise ConfigError(f"{_where(origin, where + '.table')}: flops must ascend strictly; "
                              "sort the points by size")
        return MatmulEfficiency(table=tuple(table))
    return MatmulEfficiency(
        max_efficiency=_positive(origin, data, "max_efficiency", f"{where}.max_efficiency", fraction=True),
        half_flops=_positive(origin, data, "half_flops", f"{where}.half_flops"),
    )


def _device_groups(origin: str, data: Any, per_node: int, peak: float, reserve: int
                   ) -> tuple[DeviceGroup, ...]:
    """The `[[device_groups]]` of a mix: each with name, count (whole nodes), speed or peak_flops
    (at the file's default dtype), memory and an optional reserve (default: memory.reserve)."""
    if not isinstance(data, list) or not data or not all(isinstance(entry, Mapping) for entry in data):
        raise ConfigError(f"{_where(origin, 'device_groups')} = {data!r}; give one or more [[device_groups]] "
                          "tables (name, count, speed or peak_flops, memory)")
    groups = []
    known = {"name", "count", "speed", "peak_flops", "memory", "reserve"}
    for index, entry in enumerate(data):
        where = f"device_groups[{index}]"
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"{_where(origin, where)}: unknown field(s) {unknown}; known: {sorted(known)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{_where(origin, where + '.name')} = {name!r}; give the device kind's name "
                              "(e.g. 'a100-40gb')")
        count = entry.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{_where(origin, where + '.count')} = {count!r}; give the number of devices "
                              f"of this kind, an integer >= 1 (whole nodes of {per_node})")
        if count % per_node:
            lower = count // per_node * per_node
            raise ConfigError(
                f"{_where(origin, where + '.count')} = {count} is not a multiple of devices_per_node = "
                f"{per_node}; a node holds one kind of device: give whole nodes "
                f"({' or '.join(str(n) for n in (lower, lower + per_node) if n > 0)})"
            )
        given = [key for key in ("speed", "peak_flops") if key in entry]
        if len(given) != 1:
            raise ConfigError(
                f"{_where(origin, where)} gives {' and '.join(given) or 'neither speed nor peak_flops'}; "
                "give exactly one: speed (relative to [compute], e.g. 0.5) or peak_flops (FLOP/s at "
                "compute.default_dtype)"
            )
        if given == ["speed"]:
            speed = _positive(origin, entry, "speed", where + ".speed")
        else:
            speed = _positive(origin, entry, "peak_flops", where + ".peak_flops") / peak
        memory_bytes = int(_positive(origin, entry, "memory", where + ".memory", size=True))
        group_reserve = (int(_positive(origin, entry, "reserve", where + ".reserve", size=True))
                         if "reserve" in entry else reserve)
        if group_reserve >= memory_bytes:
            raise ConfigError(f"{_where(origin, where + '.reserve')} = {group_reserve} is not below its "
                              f"memory = {memory_bytes}; give a smaller reserve (or set it on the group)")
        groups.append(DeviceGroup(name, count, speed, memory_bytes, group_reserve))
    return tuple(groups)


def hardware_from_mapping(data: Mapping[str, Any], origin: str = "<mapping>") -> Hardware:
    """A `Hardware` from parsed TOML; `origin` names the file in errors."""
    known = {"name", "source", "device", "devices_per_node", "compute", "memory", "links", "device_groups"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"hardware {origin}: unknown field(s) {unknown}; known: {sorted(known)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{_where(origin, 'name')} = {name!r}; give the machine type's name")
    device = data.get("device", "cuda")
    if device not in DEVICE_KINDS:
        raise ConfigError(f"{_where(origin, 'device')} = {device!r}; give one of {', '.join(DEVICE_KINDS)} "
                          "(what runs the ranks; it sets which optimizer path the plan prices)")
    per_node = data.get("devices_per_node")
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise ConfigError(f"{_where(origin, 'devices_per_node')} = {per_node!r}; give an integer >= 1")
    compute = _table(origin, data, "compute")
    peaks = compute.get("peak_flops")
    if not isinstance(peaks, Mapping) or not peaks:
        raise ConfigError(f"{_where(origin, 'compute.peak_flops')} is missing; add e.g. "
                          "[compute.peak_flops] bf16 = 312e12")
    peak_flops = {
        str(dtype): _positive(origin, peaks, dtype, f"compute.peak_flops.{dtype}") for dtype in peaks
    }
    default_dtype = compute.get("default_dtype")
    if default_dtype not in peak_flops:
        raise ConfigError(f"{_where(origin, 'compute.default_dtype')} = {default_dtype!r}; give one of "
                          f"{sorted(peak_flops)}")
    memory = _table(origin, data, "memory")
    memory_bytes = int(_positive(origin, memory, "bytes", "memory.bytes", size=True))
    reserve = int(_positive(origin, memory, "reserve", "memory.reserve", size=True))
    if reserve >= memory_bytes:
        raise ConfigError(f"{_where(origin, 'memory.reserve')} = {reserve} is not below memory.bytes = "
                          f"{memory_bytes}; the reserve is the part the planner may not use")
    links = _table(origin, data, "links")
    groups: tuple[DeviceGroup, ...] = ()
    if "device_groups" in data:
        groups = _device_groups(origin, data["device_groups"], per_node,
                                peak_flops[str(default_dtype)], reserve)
    return Hardware(
        name=name,
        peak_flops=peak_flops,
        matmul=_matmul(origin, compute),
        memory_bandwidth=_positive(origin, compute, "memory_bandwidth", "compute.memory_bandwidth"),
        memory_bytes=memory_bytes,
        reserve_bytes=reserve,
        devices_per_node=per_node,
        intra_node=_link(origin, links, "intra_node"),
        inter_node=_link(origin, links, "inter_node"),
        default_dtype=str(default_dtype),
        source=str(data.get("source", "")),
        device_groups=groups,
        matmul_by_dtype=_matmul_by_dtype(origin, compute, peak_flops),
        device=str(device),
    )


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A preset by name (`PRESETS`) or a TOML file by path."""
    text_name = str(name_or_path)
    if text_name in PRESETS:
        text = resources.files("pipefold.plan").joinpath(f"presets/{text_name}.toml").read_text("utf-8")
        origin = f"preset {text_name!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"--hardware = {text_name!r} is neither a preset ({', '.join(PRESETS)}) nor a file; give a "
                "preset name or the path of a hardware TOML file"
            )
        text = path.read_text("utf-8")
        origin = repr(str(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"hardware {origin} is not valid TOML: {error}") from None
    return hardware_from_mapping(data, origin)
