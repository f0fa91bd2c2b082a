"""Mesh dimensions placed on nodes, and the link each collective and each send crosses.

    >>> from pipefold.plan.topology import place
    >>> links = place(hardware, num_data_parallel=2, num_ranks=4, num_tensor_parallel=8, inner="dp")

Devices are numbered node by node. tp is the innermost dimension (consecutive devices, so
inside a node wherever tp <= devices per node); then whichever of dp and pp moves more bytes per
step (`inner`), then the other. A group whose devices span two nodes is priced on the
inter-node link (its slowest hop: a ring is as fast as its slowest link); a pipeline send
between ranks on two nodes too, and on the intra-node link otherwise. docs/plan.md, "Topology".
On a mix of device kinds each pipeline rank runs at its slowest device's speed and fits its
smallest device's memory (its tp shards and dp replicas wait for each other): docs/plan.md,
"Heterogeneous devices".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipefold.plan.hardware import Hardware
from pipefold.simulate import Link

__all__ = ["MeshLinks", "place"]


@dataclass(frozen=True)
class MeshLinks:
    """The links one (dp, pp, tp) split uses on a hardware's nodes."""

    tensor_parallel: Link
    data_parallel: Link
    pipeline: Link
    """The link of a send between two pipeline ranks of one node (or every send, where none crosses)."""
    pipeline_overrides: tuple[tuple[tuple[int, int], Link], ...] = ()
    """(rank, rank) pairs whose sends cross nodes, with the inter-node link (symmetric)."""
    order: str = ""
    """The placement, innermost first: 'tp, dp, pp'."""
    crossing: tuple[str, ...] = ()
    """The dimensions some of whose groups (or sends) span nodes."""
    sizes: tuple[tuple[str, int], ...] = ()
    """(dimension, size) of each dimension, innermost first."""
    rank_speeds: tuple[float, ...] = ()
    """On a mix of device kinds: per pipeline rank, the speed of its slowest device (relative to
    the file's [compute]); empty where every device is the reference device."""
    rank_memory: tuple[int, ...] = ()
    """On a mix of device kinds: per pipeline rank, the usable memory of its smallest device;
    empty where every device is the reference device."""

    def describe(self) -> str:
        """'mesh tp=8, dp=2, pp=4 (innermost first): tp inside a node, dp and pp across nodes'."""
        used = [(name, size) for name, size in self.sizes if size > 1]
        inside = [f"{name}={size}" for name, size in used if name not in self.crossing]
        across = [f"{name}={size}" for name, size in used if name in self.crossing]
        parts = []
        if inside:
            parts.append(f"{' and '.join(inside)} inside a node")
        if across:
            parts.append(f"{' and '.join(across)} across nodes")
        order = ", ".join(f"{name}={size}" for name, size in self.sizes)
        return f"mesh {order} (innermost first): " + ("; ".join(parts) or "one device")


def _node(device: int, per_node: int) -> int:
    return device // per_node


def _group_crosses(size: int, stride: int, outer_stride: int, total: int, per_node: int) -> bool:
    """Whether any group of `size` devices `stride` apart spans two nodes."""
    if size <= 1:
        return False
    for base in range(0, total, outer_stride):
        for offset in range(stride):
            first = base + offset
            if _node(first, per_node) != _node(first + (size - 1) * stride, per_node):
                return True
    return False


def place(
    hardware: Hardware, *, num_data_parallel: int, num_ranks: int, num_tensor_parallel: int,
    inner: Literal["dp", "pp"] = "dp",
) -> MeshLinks:
    """The links of dp x pp x tp devices placed tp first, then `inner`, then the other."""
    dp, pp, tp = num_data_parallel, num_ranks, num_tensor_parallel
    per_node, total = hardware.devices_per_node, dp * pp * tp
    intra, inter = hardware.intra_node, hardware.inter_node
    tp_crosses = _group_crosses(tp, 1, tp, total, per_node)
    if inner == "dp":
        dp_stride, pp_stride = tp, tp * dp
        dp_crosses = _group_crosses(dp, tp, tp * dp, total, per_node)
        order = "tp, dp, pp"
    else:
        pp_stride, dp_stride = tp, tp * pp
        dp_crosses = _group_crosses(dp, dp_stride, total, total, per_node)
        order = "tp, pp, dp"

    def device(rank: int, replica: int, shard: int) -> int:
        return shard + rank * pp_stride + replica * dp_stride

    def crosses(a: int, b: int) -> bool:
        return any(
            _node(device(a, replica, shard), per_node) != _node(device(b, replica, shard), per_node)
            for replica in range(dp) for shard in range(tp)
        )

    # Sends go between neighbouring ranks, and from the last back to the first (looped and
    # interleaved placements); V placements only between neighbours.
    pairs = {(rank, rank + 1) for rank in range(pp - 1)}
    if pp > 2:
        pairs.add((0, pp - 1))
    crossing_pairs = sorted(pair for pair in pairs if crosses(*pair))
    overrides: tuple[tuple[tuple[int, int], Link], ...] = ()
    if crossing_pairs and len(crossing_pairs) == len(pairs):
        pipeline = inter
    else:
        pipeline, overrides = intra, tuple((pair, inter) for pair in crossing_pairs)
    crossing = tuple(
        name for name, flag in (("tp", tp_crosses), ("dp", dp_crosses), ("pp", bool(crossing_pairs)))
        if flag
    )
    rank_speeds: tuple[float, ...] = ()
    rank_memory: tuple[int, ...] = ()
    if hardware.is_mixed:
        devices = [[device(rank, replica, shard) for replica in range(dp) for shard in range(tp)]
                   for rank in range(pp)]
        rank_speeds = tuple(min(hardware.device_speed(d) for d in owned) for owned in devices)
        rank_memory = tuple(min(hardware.device_memory(d) for d in owned) for owned in devices)
    return MeshLinks(
        tensor_parallel=inter if tp_crosses else intra,
        data_parallel=inter if dp_crosses else intra,
        pipeline=pipeline,
        pipeline_overrides=overrides,
        order=order,
        crossing=crossing,
        sizes=tuple((name, {"tp": tp, "dp": dp, "pp": pp}[name]) for name in order.split(", ")),
        rank_speeds=rank_speeds,
        rank_memory=rank_memory,
    )
