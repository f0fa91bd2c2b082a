"""`CostModel`: what each action costs in time and memory, and what a message costs.

All times are seconds, all sizes bytes, indexed by *virtual* stage (docs/decisions.md,
"Stage numbering"). A cost model is plain data: built by hand, from a measured profile, or
loaded from JSON. No torch import.

Messages: latency + bytes / bandwidth per link (docs/decisions.md, "Link model").

Executor time between actions and between steps: `action_overhead`, `step_overhead`, and the
time a rank spends sending an action's output to another rank, `send_overhead` plus
`send_seconds_per_byte` per byte (docs/decisions.md, "Runtime overheads").

Ranks sharing cores: `num_cores`, processor sharing (docs/decisions.md, "Shared cores").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipefold.errors import CostModelError
from pipefold.schedule.ir import Action, Op, Schedule

__all__ = ["Link", "CostModel", "sent_boundary"]


def sent_boundary(action: Action, placement: Sequence[int]) -> int:
    """The stage boundary across which `action`'s output goes to another rank (an F's to the next
    stage, a B's or I's gradient to the previous one, where that stage is on another rank; the
    boundary numbered by its lower stage), or -1 where it sends nothing to another rank."""
    stage = action.stage
    if action.op is Op.F:
        to = stage + 1
    elif action.op is Op.B or action.op is Op.I:
        to = stage - 1
    else:
        return -1
    if not 0 <= to < len(placement) or placement[to] == placement[stage]:
        return -1
    return min(stage, to)


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link: fixed `latency` (s) plus bytes / `bandwidth` (bytes/s)."""

    latency: float = 0.0
    bandwidth: float = math.inf

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise CostModelError(
                f"link latency = {self.latency!r} s; give a finite number >= 0 (0 for an ideal link)"
            )
        if not self.bandwidth > 0:
            raise CostModelError(
                f"link bandwidth = {self.bandwidth!r} bytes/s; give a number > 0 (inf for an ideal link)"
            )

    def transfer_time(self, num_bytes: int) -> float:
        return self.latency + (num_bytes / self.bandwidth if num_bytes else 0.0)


def _floats(name: str, values: Sequence[float], num_stages: int) -> tuple[float, ...]:
    if len(values) != num_stages:
        raise CostModelError(
            f"{name} has {len(values)} entries but num_stages is {num_stages}: give one per (virtual) stage"
        )
    result = tuple(map(float, values))
    # One check of all (a NaN or infinity makes the sum not finite); the loop names the entry.
    if result and not (min(result) >= 0 and math.isfinite(sum(result))):
        for stage, value in enumerate(result):
            if not (math.isfinite(value) and value >= 0):
                raise CostModelError(f"{name}[{stage}] = {value!r}; times must be finite and >= 0")
    return result


def _ints(name: str, values: Sequence[int], num_entries: int, what: str) -> tuple[int, ...]:
    if len(values) != num_entries:
        raise CostModelError(f"{name} has {len(values)} entries but needs {num_entries}: one per {what}")
    result = tuple(map(int, values))
    if result and (min(result) < 0 or result != tuple(values)):
        for index, value in enumerate(result):
            if value < 0 or value != values[index]:
                raise CostModelError(f"{name}[{index}] = {values[index]!r}; sizes must be whole bytes >= 0")
    return result


@dataclass(frozen=True)
class CostModel:
    """Per-stage times and sizes, and the link model (see docs/decisions.md, "Link model").

    Sequence fields left empty take their default: `b` is `i + w` per stage, the
    others are zeros. Every field is validated on construction.
    """

    num_stages: int
    f: tuple[float, ...]
    """Forward time per stage."""
    i: tuple[float, ...]
    """Input-gradient backward (I) time per stage."""
    w: tuple[float, ...]
    """Weight-gradient backward (W) time per stage."""
    b: tuple[float, ...] = ()
    """Full backward (B) time per stage; defaults to i + w."""
    step: tuple[float, ...] = ()
    """Optimizer update (STEP) time per stage; defaults to 0."""
    activation_bytes: tuple[int, ...] = ()
    """Bytes one in-flight micro-batch holds on a stage, from the end of F to the end of B or I."""
    weight_grad_bytes: tuple[int, ...] = ()
    """Bytes an I keeps for its W, held from the end of I to the end of W."""
    weight_bytes: tuple[int, ...] = ()
    """Bytes of one version of a stage's weights."""
    no_decay_weight_bytes: tuple[int, ...] = ()
    """The part of a stage's `weight_bytes` in the optimizer group without weight decay (embeddings,
    norms, biases): the planner prices the update's per-group temporaries on a rank's larger
    group; defaults 0 (all decayed)."""
    gradient_norm_bytes: tuple[int, ...] = ()
    """The most the gradient norm after a flush holds at once over a stage's gradients (its
    layers' largest): the planner prices a rank's update with its stages' largest; defaults 0
    (the model's one figure then)."""
    cast_bytes: tuple[int, ...] = ()
    """Bytes of the 16-bit copies of a stage's weights that mixed precision holds for a step
    (autocast's casts, made at the stage's first forward of the step); defaults 0."""
    backward_temporary_bytes: tuple[int, ...] = ()
    """The most bytes a stage's backward holds at once beyond its saved activations (the gradients
    it is handed and hands on, a new weight gradient, the loss's gradients on the last stage):
    the planner adds a rank's stages' largest to its pipeline call; defaults 0. The simulator's
    activation counts leave them out."""
    message_bytes: tuple[int, ...] = ()
    """Bytes crossing each stage boundary s -> s+1 (num_stages - 1 entries)."""
    link: Link = field(default_factory=Link)
    """The default link between two different ranks."""
    link_overrides: Mapping[tuple[int, int], Link] = field(default_factory=dict, hash=False)
    """Links for particular rank pairs, e.g. across nodes (left out of the hash: a dict has none)."""
    action_overhead: float = 0.0
    """Seconds between two compute actions of a rank that does not wait (docs/decisions.md,
    "Runtime overheads")."""
    step_overhead: float = 0.0
    """Seconds per step outside the actions, on every rank (docs/decisions.md, "Runtime overheads")."""
    send_overhead: float = 0.0
    """Seconds a rank spends handing an action's output to another rank before its next action
    (beyond `action_overhead`): charged after an F whose next stage, or a B or I whose previous
    stage, is on another rank (docs/decisions.md, "Runtime overheads"); 0: not priced."""
    send_seconds_per_byte: float = 0.0
    """The part of that time per byte of the message (`message_bytes` of the boundary crossed)."""
    num_cores: float | None = None
    """Ranks that can compute at full speed at once when they share cores; None: a device
    per rank (docs/decisions.md, "Shared cores")."""
    gather: tuple[float, ...] = ()
    """Full sharding: seconds to all-gather a stage's whole weights from its data-parallel
    shards; an UNSHARD starts it and the stage's next compute action waits for it (defaults 0)."""
    reduce_scatter: tuple[float, ...] = ()
    """Full sharding: seconds a stage's REDUCE_GRAD (gradient reduce-scatter) takes (defaults 0)."""
    tied_weights: tuple[tuple[tuple[tuple[int, int], ...], int], ...] = ()
    """Weights that several layers hold, each counted in every holder's `weight_bytes` (a tied
    embedding and head): per weight, ((stage, how many of its layers that stage holds), ...) and
    its bytes. A rank holding several of them holds the weight once (`held_weight_bytes`)."""
    tied_casts: tuple[tuple[tuple[tuple[int, int], ...], int], ...] = ()
    """As `tied_weights`, for the 16-bit copy of a tied weight that several layers cast: per copy,
    ((stage, how many of its layers cast it), ...) and its bytes, counted once in each such
    stage's `cast_bytes`. A rank holding the step's casts holds it once (autocast's cache)."""
    tied_sum_bandwidth: float = math.inf
    """Bytes/s of memory traffic at which each owner of a tied weight adds the owners'
    contributions after the exchange (reads each, writes the sum): the device's memory bandwidth;
    inf: free (`tied_exchange_time`)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise CostModelError(f"num_stages = {self.num_stages!r}; give an integer >= 1")
        n = self.num_stages
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "f", _floats("f", self.f, n))
        set_(self, "i", _floats("i", self.i, n))
        set_(self, "w", _floats("w", self.w, n))
        default_b = tuple(i + w for i, w in zip(self.i, self.w, strict=True))
        set_(self, "b", _floats("b", self.b or default_b, n))
        set_(self, "step", _floats("step", self.step or (0.0,) * n, n))
        set_(self, "gather", _floats("gather", self.gather or (0.0,) * n, n))
        set_(self, "reduce_scatter", _floats("reduce_scatter", self.reduce_scatter or (0.0,) * n, n))
        for name in ("activation_bytes", "weight_grad_bytes", "weight_bytes", "cast_bytes",
                     "no_decay_weight_bytes", "gradient_norm_bytes", "backward_temporary_bytes"):
            set_(self, name, _ints(name, getattr(self, name) or (0,) * n, n, "(virtual) stage"))
        set_(
            self,
            "message_bytes",
            _ints("message_bytes", self.message_bytes or (0,) * (n - 1), n - 1, "stage boundary"),
        )
        if not isinstance(self.link, Link):
            raise CostModelError(f"link = {self.link!r}; give a pipefold.simulate.Link")
        for pair, link in self.link_overrides.items():
            if len(pair) != 2 or min(pair) < 0 or not isinstance(link, Link):
                raise CostModelError(
                    f"link_overrides[{pair!r}] = {link!r}; keys are (src_rank, dst_rank) pairs of "
                    "ranks >= 0 and values are Link objects"
                )
        set_(self, "link_overrides", dict(self.link_overrides))
        for name in ("tied_weights", "tied_casts"):
            tied = tuple((tuple((int(stage), int(count)) for stage, count in counts), int(size))
                         for counts, size in getattr(self, name))
            for counts, size in tied:
                if size < 0 or any(not 0 <= stage < n or count < 1 for stage, count in counts):
                    raise CostModelError(
                        f"{name} entry {(counts, size)!r}: give ((stage in 0..{n - 1}, layers >= 1), ...) "
                        "and bytes >= 0"
                    )
            set_(self, name, tied)
        if isinstance(self.tied_sum_bandwidth, bool) or not (
            isinstance(self.tied_sum_bandwidth, (int, float)) and self.tied_sum_bandwidth > 0
        ):
            raise CostModelError(
                f"tied_sum_bandwidth = {self.tied_sum_bandwidth!r} bytes/s; give a number > 0 (the "
                "device's memory bandwidth; inf where the owners' add is free)"
            )
        set_(self, "tied_sum_bandwidth", float(self.tied_sum_bandwidth))
        for name in ("action_overhead", "step_overhead", "send_overhead", "send_seconds_per_byte"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise CostModelError(f"{name} = {value!r} s; give a finite number >= 0 (0: none)")
            set_(self, name, float(value))
        cores = self.num_cores
        if cores is not None:
            if isinstance(cores, bool) or not isinstance(cores, (int, float)) or not (
                math.isfinite(cores) and cores > 0
            ):
                raise CostModelError(
                    f"num_cores = {cores!r}; give a finite number > 0 (cores / threads per rank), or "
                    "None when every rank has its own device"
                )
            set_(self, "num_cores", float(cores))

    def held_weight_bytes(self, stages: Iterable[int]) -> int:
        """Bytes of the weights of `stages` held together (one rank's): their `weight_bytes`, each
        of `tied_weights` once."""
        held = set(stages)
        total = sum(self.weight_bytes[stage] for stage in held)
        for counts, size in self.tied_weights:
            copies = sum(count for stage, count in counts if stage in held)
            total -= max(copies - 1, 0) * size
        return total

    def tied_exchange_time(self, placement: Sequence[int], gradient_bytes_per_byte: float = 1.0) -> float:
        """Seconds the owners of each tied weight held by several ranks (`placement`: the rank of
        each stage) take to sum its gradient after a flush step, as the runtime does
        (`pipefold.runtime.tied.TiedGradients.sum`): every owner sends its contribution to every
        other owner and receives theirs, all at once, on the link between the two ranks; weight
        after weight. An owner's sends share its link, so it takes the sum of its peers'
        transfers; the slowest owner sets the time. Then each owner adds the contributions, reading
        each and writing the sum at `tied_sum_bandwidth`. On one host through shared memory (CPU)
        the link is the copy into the owners' segment, and the add reads the others' parts from it
        (docs/decisions.md, "tied gradients through shared memory"). 0 where one rank holds every
        tied weight.
        `gradient_bytes_per_byte`: the gradient's bytes per weight byte (its dtype's)."""
        seconds = 0.0
        for counts, size in self.tied_weights:
            owners = sorted({placement[stage] for stage, _ in counts})
            if len(owners) < 2:
                continue
            num_bytes = round(size * gradient_bytes_per_byte)
            seconds += max(
                sum(self.link_between(owner, peer).transfer_time(num_bytes)
                    for peer in owners if peer != owner)
                for owner in owners
            ) + (len(owners) + 1) * num_bytes / self.tied_sum_bandwidth
        return seconds

    @property
    def prices_sends(self) -> bool:
        """Whether a sender is charged for its messages (`send_overhead`, `send_seconds_per_byte`)."""
        return self.send_overhead > 0 or self.send_seconds_per_byte > 0

    def send_time(self, boundary: int) -> float:
        """Seconds a rank spends sending one message across stage boundary `boundary` (to another rank)."""
        return self.send_overhead + self.send_seconds_per_byte * self.message_bytes[boundary]

    def shares_cores(self, num_ranks: int) -> bool:
        """Whether `num_ranks` ranks outnumber `num_cores` (docs/decisions.md, "Shared cores")."""
        return self.num_cores is not None and num_ranks > self.num_cores

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        num_stages: int,
        f: float = 1.0,
        i: float = 1.0,
        w: float = 1.0,
        *,
        b: float | None = None,
        step: float = 0.0,
        activation_bytes: int = 0,
        weight_grad_bytes: int = 0,
        weight_bytes: int = 0,
        message_bytes: int = 0,
        link: Link | None = None,
        action_overhead: float = 0.0,
        step_overhead: float = 0.0,
        num_cores: float | None = None,
        gather: float = 0.0,
        reduce_scatter: float = 0.0,
    ) -> CostModel:
        """Every stage costs the same; `b` defaults to `i + w`."""
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise CostModelError(f"num_stages = {num_stages!r}; give an integer >= 1")
        n = num_stages
        return cls(
            num_stages=n,
            f=(f,) * n,
            i=(i,) * n,
            w=(w,) * n,
            b=(i + w if b is None else b,) * n,
            step=(step,) * n,
            activation_bytes=(activation_bytes,) * n,
            weight_grad_bytes=(weight_grad_bytes,) * n,
            weight_bytes=(weight_bytes,) * n,
            message_bytes=(message_bytes,) * (n - 1),
            link=link or Link(),
            action_overhead=action_overhead,
            step_overhead=step_overhead,
            num_cores=num_cores,
            gather=(gather,) * n,
            reduce_scatter=(reduce_scatter,) * n,
        )

    @classmethod
    def from_lists(
        cls,
        f: Sequence[float],
        i: Sequence[float],
        w: Sequence[float],
        *,
        b: Sequence[float] = (),
        step: Sequence[float] = (),
        activation_bytes: Sequence[int] = (),
        weight_grad_bytes: Sequence[int] = (),
        weight_bytes: Sequence[int] = (),
        message_bytes: Sequence[int] = (),
        link: Link | None = None,
        cast_bytes: Sequence[int] = (),
        link_overrides: Mapping[tuple[int, int], Link] | None = None,
        action_overhead: float = 0.0,
        step_overhead: float = 0.0,
        num_cores: float | None = None,
        gather: Sequence[float] = (),
        reduce_scatter: Sequence[float] = (),
        tied_weights: Sequence[tuple[Sequence[tuple[int, int]], int]] = (),
        tied_sum_bandwidth: float = math.inf,
        tied_casts: Sequence[tuple[Sequence[tuple[int, int]], int]] = (),
        no_decay_weight_bytes: Sequence[int] = (),
        gradient_norm_bytes: Sequence[int] = (),
        backward_temporary_bytes: Sequence[int] = (),
        send_overhead: float = 0.0,
        send_seconds_per_byte: float = 0.0,
    ) -> CostModel:
        """Per-stage lists; `num_stages` is `len(f)` and every other list must match it."""
        return cls(
            num_stages=len(f),
            f=tuple(f),
            i=tuple(i),
            w=tuple(w),
            b=tuple(b),
            step=tuple(step),
            activation_bytes=tuple(activation_bytes),
            weight_grad_bytes=tuple(weight_grad_bytes),
            weight_bytes=tuple(weight_bytes),
            cast_bytes=tuple(cast_bytes),
            message_bytes=tuple(message_bytes),
            link=link or Link(),
            link_overrides=dict(link_overrides or {}),
            action_overhead=action_overhead,
            step_overhead=step_overhead,
            num_cores=num_cores,
            gather=tuple(gather),
            reduce_scatter=tuple(reduce_scatter),
            tied_weights=tuple((tuple(counts), size) for counts, size in tied_weights),
            tied_sum_bandwidth=tied_sum_bandwidth,
            tied_casts=tuple((tuple(counts), size) for counts, size in tied_casts),
            no_decay_weight_bytes=tuple(no_decay_weight_bytes),
            gradient_norm_bytes=tuple(gradient_norm_bytes),
            backward_temporary_bytes=tuple(backward_temporary_bytes),
            send_overhead=send_overhead,
            send_seconds_per_byte=send_seconds_per_byte,
        )

    # -- queries -----------------------------------------------------------------------------

    def time_of(self, action: Action) -> float:
        """Seconds the compute `action` takes."""
        op = action.op
        if op is Op.F:
            return self.f[action.stage]
        if op is Op.B:
            return self.b[action.stage]
        if op is Op.I:
            return self.i[action.stage]
        if op is Op.W:
            return self.w[action.stage]
        if op is Op.STEP:
            return self.step[action.stage]
        if op is Op.REDUCE_GRAD:
            return self.reduce_scatter[action.stage]
        if op is Op.UNSHARD or op is Op.RESHARD:
            # An UNSHARD only starts the gather (`gather` is paid by the stage's next compute
            # action, as a wait); freeing costs nothing.
            return 0.0
        raise CostModelError(
            f"{action} is not a compute action; only F, B, I, W, STEP and the sharding actions cost time"
        )

    def link_between(self, src: int, dst: int) -> Link:
        return self.link_overrides.get((src, dst)) or self.link_overrides.get((dst, src)) or self.link

    def transfer_time(self, boundary: int, src: int, dst: int) -> float:
        """Seconds a message across stage boundary `boundary` takes from rank `src` to `dst`."""
        if src == dst:
            return 0.0
        return self.link_between(src, dst).transfer_time(self.message_bytes[boundary])

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise CostModelError unless this model has one entry per stage of `schedule`."""
        if self.num_stages != schedule.num_stages:
            raise CostModelError(
                f"cost model has num_stages={self.num_stages} but schedule {schedule.name!r} has "
                f"{schedule.num_stages} stages ({schedule.num_ranks} ranks x {schedule.num_virtual} "
                f"virtual); build it with CostModel.uniform({schedule.num_stages}, ...) or give "
                f"{schedule.num_stages} entries per list"
            )
        for pair in self.link_overrides:
            if max(pair) >= schedule.num_ranks:
                raise CostModelError(
                    f"link_overrides has pair {pair} but the schedule has ranks 0..{schedule.num_ranks - 1}"
                )

    # -- serialization -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain data; an infinite bandwidth is written as null (JSON has no infinity)."""

        def link_data(link: Link) -> dict[str, float | None]:
            bandwidth = None if math.isinf(link.bandwidth) else link.bandwidth
            return {"latency": link.latency, "bandwidth": bandwidth}

        return {
            "num_stages": self.num_stages,
            "f": list(self.f),
            "i": list(self.i),
            "w": list(self.w),
            "b": list(self.b),
            "step": list(self.step),
            "activation_bytes": list(self.activation_bytes),
            "weight_grad_bytes": list(self.weight_grad_bytes),
            "weight_bytes": list(self.weight_bytes),
            "message_bytes": list(self.message_bytes),
            "link": link_data(self.link),
            "link_overrides": [
                {"src": src, "dst": dst, **link_data(link)}
                for (src, dst), link in sorted(self.link_overrides.items())
            ],
            "action_overhead": self.action_overhead,
            "step_overhead": self.step_overhead,
            "num_cores": self.num_cores,
            "gather": list(self.gather),
            "reduce_scatter": list(self.reduce_scatter),
            "tied_weights": [[[list(pair) for pair in counts], size] for counts, size in self.tied_weights],
            "tied_sum_bandwidth": None if math.isinf(self.tied_sum_bandwidth) else self.tied_sum_bandwidth,
            **({"cast_bytes": list(self.cast_bytes)} if any(self.cast_bytes) else {}),
            **({"tied_casts": [[[list(pair) for pair in counts], size] for counts, size in self.tied_casts]}
               if self.tied_casts else {}),
            **({"no_decay_weight_bytes": list(self.no_decay_weight_bytes)} if any(self.no_decay_weight_bytes)
               else {}),
            **({"gradient_norm_bytes": list(self.gradient_norm_bytes)} if any(self.gradient_norm_bytes)
               else {}),
            **({"backward_temporary_bytes": list(self.backward_temporary_bytes)}
               if any(self.backward_temporary_bytes) else {}),
            # Written only where priced: a model without them reads and writes as before.
            **({"send_overhead": self.send_overhead} if self.send_overhead else {}),
            **({"send_seconds_per_byte": self.send_seconds_per_byte} if self.send_seconds_per_byte else {}),
        }

    @classmethod
    def from_json(cls, source: str | Path | Mapping[str, Any]) -> CostModel:
        """Load from a dict as written by `to_json`, or from a JSON file path."""
        if isinstance(source, (str, Path)):
            try:
                data: Mapping[str, Any] = json.loads(Path(source).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise CostModelError(f"cannot read cost model JSON from {str(source)!r}: {error}") from None
        else:
            data = source
        known = {
            "num_stages", "f", "i", "w", "b", "step", "activation_bytes", "weight_grad_bytes",
            "weight_bytes", "message_bytes", "link", "link_overrides", "action_overhead", "step_overhead",
            "num_cores", "gather", "reduce_scatter", "tied_weights", "tied_sum_bandwidth", "cast_bytes",
            "tied_casts", "no_decay_weight_bytes", "gradient_norm_bytes", "backward_temporary_bytes",
            "send_overhead", "send_seconds_per_byte",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise CostModelError(f"unknown cost model field(s) {unknown}; known fields: {sorted(known)}")
        for required in ("f", "i", "w"):
            if required not in data:
                raise CostModelError(f"cost model JSON lacks {required!r}: give one time per stage")

        def link_of(entry: Mapping[str, Any]) -> Link:
            bandwidth = entry.get("bandwidth")
            return Link(
                latency=float(entry.get("latency", 0.0)),
                bandwidth=math.inf if bandwidth is None else float(bandwidth),
            )

        overrides = {
            (int(entry["src"]), int(entry["dst"])): link_of(entry)
            for entry in data.get("link_overrides", ())
        }
        model = cls.from_lists(
            data["f"],
            data["i"],
            data["w"],
            b=data.get("b", ()),
            step=data.get("step", ()),
            activation_bytes=data.get("activation_bytes", ()),
            weight_grad_bytes=data.get("weight_grad_bytes", ()),
            weight_bytes=data.get("weight_bytes", ()),
            cast_bytes=data.get("cast_bytes", ()),
            message_bytes=data.get("message_bytes", ()),
            link=link_of(data.get("link", {})),
            link_overrides=overrides,
            action_overhead=float(data.get("action_overhead", 0.0)),
            step_overhead=float(data.get("step_overhead", 0.0)),
            num_cores=data.get("num_cores"),
            gather=data.get("gather", ()),
            reduce_scatter=data.get("reduce_scatter", ()),
            tied_weights=[([(stage, count) for stage, count in counts], size)
                          for counts, size in data.get("tied_weights", ())],
            tied_sum_bandwidth=(math.inf if data.get("tied_sum_bandwidth") is None
                                else float(data["tied_sum_bandwidth"])),
            tied_casts=[([(stage, count) for stage, count in counts], size)
                        for counts, size in data.get("tied_casts", ())],
            no_decay_weight_bytes=data.get("no_decay_weight_bytes", ()),
            gradient_norm_bytes=data.get("gradient_norm_bytes", ()),
            backward_temporary_bytes=data.get("backward_temporary_bytes", ()),
            send_overhead=float(data.get("send_overhead", 0.0)),
            send_seconds_per_byte=float(data.get("send_seconds_per_byte", 0.0)),
        )
        if "num_stages" in data and data["num_stages"] != model.num_stages:
            raise CostModelError(
                f"num_stages = {data['num_stages']!r} but f has {model.num_stages} entries; make them agree"
            )
        return model
