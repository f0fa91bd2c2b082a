"""The search space: `PlanOptions` (what the user fixes and bounds) and the `Config`s it spans.

A configuration is a schedule family, stages per rank (v) and micro-batch count (m),
for one data-parallel degree (dp replicas of a pp-rank pipeline, degree.py); the
partition follows from them (the time-balanced cut of the layers into pp*v stages)
and the recomputed stages are searched per configuration (see search.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

from pipefold.errors import ConfigError, ScheduleError
from pipefold.plan.degree import Degree, degree_problem, factorizations
from pipefold.plan.hardware import Hardware
from pipefold.plan.shard_search import check_shard
from pipefold.schedule import build, names
from pipefold.schedule.ir import WeightUpdate
from pipefold.schedule.registry import family
from pipefold.simulate import Link

__all__ = [
    "SEARCHED_ORDER", "PlanOptions", "Config", "Space", "search_space", "RecomputeChoice", "is_asynchronous",
]

RecomputeChoice = Literal["auto", "none", "full"]

SEARCHED_ORDER = "auto"
"""The name a searched order goes by (`Candidate.schedule`, a pin in `PlanOptions.schedules`), as
`pipefold.plan.find_schedule` names what it finds."""


def _positive_int(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r}; give an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What the planner may choose, and the limits it must respect. Validated on construction.

    The devices: `num_ranks` alone is one pipeline of that many ranks (dp = 1, or
    `data_parallel` replicas of it). `num_devices` searches every dp x pp = num_devices;
    `data_parallel` or `num_ranks` with it pins dp or pp (see docs/decisions.md, "Data-parallel step model").
    """

    num_ranks: int | None = None
    """Pipeline ranks pp of each replica; None: searched (give num_devices)."""
    global_batch: int
    """Samples per optimizer step, over all replicas: each runs global_batch / dp of them."""
    num_devices: int | None = None
    """Devices in all (dp x pp); None: num_ranks x data_parallel (dp 1 when not given)."""
    data_parallel: int | None = None
    """Pin the data-parallel degree dp; None: 1 without num_devices, searched with it."""
    memory_limit: float = math.inf
    """Bytes each rank may use (see docs/decisions.md, "Planner memory model")."""
    schedules: tuple[str, ...] = ()
    """Families to consider; empty: every registered one (asynchronous ones only with allow_async)
    and searched orders. With families pinned, a searched order competes only where "auto" is
    among them; otherwise the choice's own is searched and reported beside it."""
    microbatches: int | None = None
    """Pin the micro-batch count m; None searches it."""
    virtual: int | None = None
    """Pin the stages per rank v; None searches 1..max_virtual where the family allows."""
    recompute: RecomputeChoice = "auto"
    """"auto" searches which stages to recompute; "none" and "full" pin it."""
    allow_async: bool = False
    """Consider pipedream and pipedream-2bw, whose updates do not equal one large batch's."""
    uneven: bool = False
    """Allow micro-batch counts that do not divide the batch (micro-batches differ by one sample)."""
    max_virtual: int = 4
    max_microbatches: int | None = None
    """Largest micro-batch count searched; None: the global batch."""
    top: int = 5
    """How many candidates the plan lists."""
    link: Link = field(default_factory=Link)
    """Link between ranks (latency, bandwidth) for the boundary messages."""
    dp_link: Link | None = None
    """Link the replicas all-reduce gradients over; None: the same as `link`."""
    exhaustive_recompute_stages: int = 4
    """Up to this many stages every subset of recomputed stages is tried; above, a greedy search."""
    tensor_parallel: int | None = None
    """Pin the tensor-parallel ranks tp per stage; None: 1, or searched up to `max_tensor_parallel`."""
    max_tensor_parallel: int = 1
    """Largest tp searched where not pinned (the model's costs say which layers split and into
    which degrees: docs/decisions.md, "Tensor-parallel cost model"); 1: no tensor parallelism."""
    tp_link: Link | None = None
    """Link between the tp ranks of a stage (their all-reduces); None: the same as `link`."""
    sequence_parallel: bool = False
    """Sequence parallelism wherever tp > 1 (the layers' `sequence_parallel_activation_share`
    says which it splits: docs/decisions.md, "Tensor-parallel cost model"), as `pipefold train
    --sequence-parallel` runs it."""
    zero: bool = False
    """Shard the optimizer state over the dp replicas (ZeRO-1) wherever dp > 1 and tp = 1 (see
    docs/decisions.md, "Data-parallel step model"); the runtime refuses it with tp > 1."""
    shard: str = "replicate"
    """What the dp replicas shard: "replicate" (nothing; ZeRO-1 where `zero`), "zero1", "full"
    (weights, gradients and optimizer state), or "auto": each configuration's layouts searched
    (`pipefold.plan.shard_search`; docs/plan.md, "Data-parallel layout")."""
    num_cores: int | None = None
    """Cores that all of the job's processes share (CPU ranks on one host: cores / threads per
    rank); each of dp replicas then gets num_cores / dp of them (docs/decisions.md, "Shared
    cores"). None: a device per rank."""

    order_search_s: float = 1.0
    """Seconds one order search may take (docs/decisions.md, "Planner refinement"); 0: no order
    search at all (every candidate is a family's order, as before orders were searched)."""
    order_search_total_s: float = 2.0
    """Seconds all order searches together may take: each gets at most what is left of them, and
    none but the first (the family choice's configuration, always searched) starts once they are
    spent. A search's list-scheduler runs always finish, so the total can run a little over."""
    max_order_searches: int = 8
    """Most configurations whose order is searched, the family choice's included."""
    recompute_attention: bool = False
    """Also search selective recomputation of the attention core (Korthikanti et al. 2022) in every
    configuration; the costs must price it (`pipefold.plan.estimate.GptEstimate`)."""
    hardware: Hardware | None = None
    """The machine type (`pipefold.plan.hardware`): with it, every collective and send is priced on
    the link it crosses once the mesh is placed on its nodes (tp innermost: docs/plan.md,
    "Topology"), so `link`, `dp_link` and `tp_link` must be left out, and an unlimited
    `memory_limit` becomes the device's memory less the runtime's reserve. A mix of device kinds
    (`Hardware.device_groups`) fixes `num_devices` to its own count and gives each pipeline rank
    its devices' speed and memory (a given `memory_limit` caps every device's)."""

    def cores_per_pipeline(self, num_data_parallel: int, num_tensor_parallel: int = 1) -> float | None:
        """`CostModel.num_cores` of one replica's pipeline (one tp rank of each stage), or None (a
        device per rank): replicas and tp peers compute beside it and take their share."""
        if self.num_cores is None:
            return None
        return self.num_cores / (num_data_parallel * num_tensor_parallel)

    def __post_init__(self) -> None:
        _positive_int("num_ranks", self.num_ranks, optional=True)
        _positive_int("global_batch", self.global_batch)
        _positive_int("num_devices", self.num_devices, optional=True)
        _positive_int("data_parallel", self.data_parallel, optional=True)
        _positive_int("microbatches", self.microbatches, optional=True)
        _positive_int("virtual", self.virtual, optional=True)
        _positive_int("max_virtual", self.max_virtual)
        _positive_int("max_microbatches", self.max_microbatches, optional=True)
        _positive_int("top", self.top)
        _positive_int("num_cores", self.num_cores, optional=True)
        _positive_int("tensor_parallel", self.tensor_parallel, optional=True)
        _positive_int("max_tensor_parallel", self.max_tensor_parallel)
        if isinstance(self.exhaustive_recompute_stages, bool) or not isinstance(
            self.exhaustive_recompute_stages, int
        ) or self.exhaustive_recompute_stages < 0:
            raise ConfigError(
                f"exhaustive_recompute_stages = {self.exhaustive_recompute_stages!r}; give an integer >= 0"
            )
        if isinstance(self.memory_limit, bool) or not isinstance(self.memory_limit, (int, float)) or not (
            self.memory_limit > 0
        ):
            raise ConfigError(f"memory_limit = {self.memory_limit!r}; give bytes > 0 (math.inf for none)")
        if isinstance(self.order_search_s, bool) or not isinstance(self.order_search_s, (int, float)) or not (
            0 <= self.order_search_s < math.inf
        ):
            raise ConfigError(
                f"order_search_s = {self.order_search_s!r}; give seconds >= 0 (0: no order search)"
            )
        if isinstance(self.order_search_total_s, bool) or not isinstance(
            self.order_search_total_s, (int, float)
        ) or not (0 <= self.order_search_total_s < math.inf):
            raise ConfigError(
                f"order_search_total_s = {self.order_search_total_s!r}; give seconds >= 0 (the budget of "
                "all order searches together; 0: only the choice's configuration, on its list scheduler)"
            )
        _positive_int("max_order_searches", self.max_order_searches)
        if not isinstance(self.sequence_parallel, bool):
            raise ConfigError(
                f"sequence_parallel = {self.sequence_parallel!r}; give True (split the stream by position "
                "wherever tp > 1) or False"
            )
        if not isinstance(self.zero, bool):
            raise ConfigError(f"zero = {self.zero!r}; give True (shard the optimizer state over dp) or False")
        check_shard(self.shard, self.zero)
        if self.recompute not in ("auto", "none", "full"):
            raise ConfigError(f"recompute = {self.recompute!r}; use 'auto', 'none' or 'full'")
        object.__setattr__(self, "schedules", tuple(self.schedules))
        for name in self.schedules:
            if name != SEARCHED_ORDER:
                family(name)  # raises ScheduleError naming the known families
        if self.schedules and all(name == SEARCHED_ORDER for name in self.schedules):
            raise ConfigError(
                f"schedules = {self.schedules!r}: a searched order ('auto') starts from the configurations "
                "the families are searched at; pin at least one family beside it, or none"
            )
        if self.microbatches is not None:
            if self.microbatches > self.global_batch:
                raise ConfigError(
                    f"microbatches = {self.microbatches} but the global batch has {self.global_batch} "
                    f"samples; every micro-batch needs at least one, so use at most {self.global_batch}"
                )
            if self.global_batch % self.microbatches and not self.uneven:
                legal = ", ".join(map(str, divisors(self.global_batch)))
                raise ConfigError(
                    f"microbatches = {self.microbatches} does not divide the global batch "
                    f"{self.global_batch}; pick a divisor ({legal}) or allow uneven micro-batches"
                )
        if not isinstance(self.link, Link):
            raise ConfigError(f"link = {self.link!r}; give a pipefold.simulate.Link")
        if self.dp_link is not None and not isinstance(self.dp_link, Link):
            raise ConfigError(f"dp_link = {self.dp_link!r}; give a pipefold.simulate.Link (None: link's)")
        if self.tp_link is not None and not isinstance(self.tp_link, Link):
            raise ConfigError(f"tp_link = {self.tp_link!r}; give a pipefold.simulate.Link (None: link's)")
        if self.hardware is not None:
            if not isinstance(self.hardware, Hardware):
                raise ConfigError(f"hardware = {self.hardware!r}; give a pipefold.plan.hardware.Hardware "
                                  "(load_hardware('a100-80gb') or a TOML file)")
            given = [name for name, value in (("link", self.link != Link()), ("dp_link", self.dp_link),
                                              ("tp_link", self.tp_link)) if value]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} given with hardware = {self.hardware.name!r}, whose nodes and links "
                    "price every collective and send; leave them out, or edit the hardware file's [links]"
                )
            if self.memory_limit == math.inf:
                object.__setattr__(self, "memory_limit", self.hardware.usable_memory)
            if self.num_devices is None and self.hardware.num_devices is not None:
                # A mix of device kinds: the mesh covers every device of it (docs/plan.md,
                # "Heterogeneous devices"), so num_ranks and the pins split those.
                object.__setattr__(self, "num_devices", self.hardware.num_devices)
            devices = self.num_devices if self.num_devices is not None else None
            if devices is not None:
                self.hardware.check_devices(devices)
        self._check_devices()

    def _check_devices(self) -> None:
        devices, dp, pp, tp = self.num_devices, self.data_parallel, self.num_ranks, self.tensor_parallel
        if devices is None and pp is None:
            raise ConfigError(
                "num_ranks and num_devices are both None; give num_ranks (the pipeline ranks) or "
                "num_devices (every dp x pp split of them is searched)"
            )
        if devices is not None:
            for name, value in (("data_parallel", dp), ("num_ranks", pp), ("tensor_parallel", tp)):
                if value is not None and devices % value:
                    raise ConfigError(
                        f"{name} = {value} does not divide num_devices = {devices}; dp x pp x tp must equal "
                        f"the devices, so pick a divisor ({', '.join(map(str, divisors(devices)))})"
                    )
            if dp is not None and pp is not None and dp * pp * (tp or 1) != devices and (
                tp is not None or self.max_tensor_parallel == 1
            ):
                raise ConfigError(
                    f"data_parallel = {dp} x num_ranks = {pp}{f' x tensor_parallel = {tp}' if tp else ''} is "
                    f"{dp * pp * (tp or 1)}, not num_devices = {devices}; leave one of them out, or give "
                    "values that agree"
                )
            if not self.degree_splits():
                raise ConfigError(
                    f"no dp x pp x tp split of num_devices = {devices} matches the pins (data_parallel = "
                    f"{dp}, num_ranks = {pp}, tensor_parallel = {tp}, max_tensor_parallel = "
                    f"{self.max_tensor_parallel}); loosen a pin"
                )
        splits = self.degree_splits()
        if len({split[0] for split in splits}) == 1:
            # A pinned degree that cannot split the batch is a mistake in the options, not a verdict.
            problem = degree_problem(self.global_batch, splits[0][0], self.microbatches, self.uneven)
            if problem is not None:
                raise ConfigError(
                    f"data_parallel = {splits[0][0]}: {problem}; pin a dp that leaves every replica whole "
                    "micro-batches, or change global_batch"
                )

    def tensor_parallel_values(self) -> list[int]:
        """The tp degrees to consider: the pinned one, or 1 .. max_tensor_parallel."""
        if self.tensor_parallel is not None:
            return [self.tensor_parallel]
        return list(range(1, self.max_tensor_parallel + 1))

    def degree_splits(self) -> list[tuple[int, int, int]]:
        """The (dp, pp, tp) splits these options allow, dp then tp ascending."""
        tensor = self.tensor_parallel_values()
        if self.num_devices is None:
            assert self.num_ranks is not None  # checked in __post_init__
            return [(self.data_parallel or 1, self.num_ranks, tp) for tp in tensor]
        return [
            (dp, pp, tp) for dp, pp, tp in factorizations(self.num_devices, tensor)
            if self.data_parallel in (None, dp) and self.num_ranks in (None, pp)
        ]

    @property
    def searches_degree(self) -> bool:
        """Whether more than one dp x pp (x tp) split is searched (the explanation then compares them)."""
        return len(self.degree_splits()) > 1

    @property
    def searches_tensor_parallel(self) -> bool:
        """Whether any split considered has tp > 1 (the explanation then names tp)."""
        return any(tp > 1 for _, _, tp in self.degree_splits())

    def shards_optimizer(self, num_data_parallel: int, num_tensor_parallel: int) -> bool:
        """Whether a candidate of that degree runs ZeRO-1 (only where there are replicas and no tp)."""
        return self.zero and num_data_parallel > 1 and num_tensor_parallel == 1

    def splits_sequence(self, num_tensor_parallel: int) -> bool:
        """Whether a candidate of that tp degree runs sequence parallelism."""
        return self.sequence_parallel and num_tensor_parallel > 1

    @property
    def ranks_searched_orders(self) -> bool:
        """Whether searched orders compete with the families (docs/decisions.md, "Planner refinement")."""
        return self.order_search_s > 0 and (not self.schedules or SEARCHED_ORDER in self.schedules)

    @property
    def allreduce_link(self) -> Link:
        return self.link if self.dp_link is None else self.dp_link

    @property
    def tensor_parallel_link(self) -> Link:
        return self.link if self.tp_link is None else self.tp_link


@dataclass(frozen=True, order=True)
class Config:
    """A schedule family with its stages per rank and micro-batch count."""

    schedule: str
    num_virtual: int
    num_microbatches: int
    microbatch_rows: int
    """Samples in the largest micro-batch: the costs of every micro-batch are scaled to it."""
    recompute_attention: bool = False
    """Selective recomputation of the attention core in every layer (Korthikanti et al. 2022)."""
    shard: str = "replicate"
    """The data-parallel layout: "replicate", "zero1" or "full" (`pipefold.plan.shard_search`)."""
    free_between: bool = False
    """Full sharding: a stage's weights freed whenever its rank turns to another of its stages."""
    gather_lookahead: int = 0
    """Full sharding: each gather issued this many actions of the rank's row before its first use."""


@dataclass(frozen=True)
class Space:
    """The configurations to evaluate, and why the families left out were left out."""

    configs: tuple[Config, ...]
    excluded: dict[str, tuple[str, str]]
    """family -> (status, reason) for the families with no configuration."""


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


@functools.cache
def is_asynchronous(name: str) -> bool:
    """Whether the family updates weights inside a call (weight stashing or double buffering)."""
    entry = family(name)
    probe = build(name, num_ranks=1, num_microbatches=1, num_virtual=entry.default_virtual)
    return probe.weight_update is not WeightUpdate.FLUSH


def _virtual_values(
    name: str, options: PlanOptions, p: int, num_layers: int, m: int
) -> tuple[list[int], str]:
    """The legal stages-per-rank values for `name` on `p` pipeline ranks, or none and the reason."""
    entry = family(name)
    if options.virtual is not None:
        tried = [options.virtual]
    elif entry.default_virtual > 1:
        # v = 1 of a multi-stage family repeats a one-stage family searched under its own name
        # (interleaved-1f1b at v = 1 is 1f1b), so it would only add a duplicate.
        tried = list(range(2, max(options.max_virtual, entry.default_virtual) + 1))
    else:
        tried = list(range(1, options.max_virtual + 1))
    legal, reasons = [], []
    for v in tried:
        try:
            entry.check(p, m, v)
        except ScheduleError as error:
            reasons.append(str(error))
            continue
        if p * v > num_layers:
            reasons.append(
                f"v={v} needs {p}x{v} = {p * v} stages but the model has {num_layers} layers "
                "(a stage holds at least one)"
            )
            continue
        legal.append(v)
    return legal, "; ".join(dict.fromkeys(reasons))


def _microbatch_values(options: PlanOptions, batch: int) -> list[int]:
    if options.microbatches is not None:
        return [options.microbatches]
    cap = batch if options.max_microbatches is None else min(batch, options.max_microbatches)
    if options.uneven:
        return list(range(1, cap + 1))
    return [d for d in divisors(batch) if d <= cap]


def pinned_degree(options: PlanOptions) -> Degree:
    """The one degree of options that do not search dp x pp (x tp)."""
    splits = options.degree_splits()
    if len(splits) != 1:
        raise ConfigError(f"the options search {len(splits)} dp x pp x tp splits; name one (pass a Degree)")
    dp, pp, tp = splits[0]
    return Degree(dp, pp, options.global_batch // dp, tp)


def _asynchronous_refusal(name: str, options: PlanOptions, degree: Degree) -> str | None:
    """Why the asynchronous family `name` is not searched at `degree`; None if it is (or is synchronous)."""
    if not is_asynchronous(name):
        return None
    if not options.allow_async:
        return "asynchronous (weights stashed: not the update of one large batch); allow async to search it"
    if degree.num_data_parallel > 1:
        return (
            f"asynchronous with dp={degree.num_data_parallel} > 1: the runtime all-reduces every update "
            "(each STEP), which the planner does not price"
        )
    if degree.num_tensor_parallel > 1:
        return (
            f"asynchronous: the runtime refuses it with tp={degree.num_tensor_parallel} > 1 (its weight "
            "stashes copy whole tensors)"
        )
    return None


def search_space(options: PlanOptions, num_layers: int, degree: Degree | None = None) -> Space:
    """Every configuration the options allow at `degree` (default: the options' only one), in registry
    order, then v, then m. Micro-batches split the replica's batch."""
    degree = pinned_degree(options) if degree is None else degree
    batch = degree.replica_batch
    configs: list[Config] = []
    excluded: dict[str, tuple[str, str]] = {}
    microbatch_values = _microbatch_values(options, batch)
    for name in names():
        if options.schedules and name not in options.schedules:
            pinned = ", ".join(options.schedules)
            excluded[name] = ("not-searched", f"not among the pinned schedules ({pinned})")
            continue
        refusal = _asynchronous_refusal(name, options, degree)
        if refusal is not None:
            excluded[name] = ("not-applicable", refusal)
            continue
        found = False
        reason = ""
        for m in microbatch_values:
            legal, reason = _virtual_values(name, options, degree.num_ranks, num_layers, m)
            for v in legal:
                configs.append(Config(name, v, m, math.ceil(batch / m)))
                found = True
        if not found:
            excluded[name] = ("not-applicable", reason or "no legal setting")
    return Space(tuple(configs), excluded)
