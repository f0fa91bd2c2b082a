"""`plan(costs, options)`: the fastest configuration that fits, found by bounded search.

How the space is visited, pruned by bounds, recomputed into the limit and ranked:
docs/decisions.md, "Planner search".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Literal

from pipefold.balance import balance
from pipefold.errors import ConfigError
from pipefold.plan.bounds import (
    SERIAL_FAMILIES,
    Backward,
    Boundaries,
    BoundTerms,
    LinkTable,
    bound_terms,
    boundary_times,
    link_table,
)
from pipefold.plan.calibrate import first_stage_backward
from pipefold.plan.costs import CostSource, ModelCosts
from pipefold.plan.degree import Degree
from pipefold.plan.errors import NoFeasiblePlan
from pipefold.plan.evaluate import evaluate, replica_sync_time
from pipefold.plan.explain import (
    degree_verdicts,
    family_verdicts,
    layout_verdicts,
    nothing_to_search,
    setting_verdicts,
)
from pipefold.plan.held import HeldTerms, held_terms
from pipefold.plan.memory import (
    RankMemory,
    memory_of_peaks,
    static_bytes,
    static_weight_bytes,
)
from pipefold.plan.order_targets import order_targets
from pipefold.plan.orders import (
    compiled_family,
    compiles_order,
    family_backward,
    family_order,
    family_placement,
    order_peaks_and_later,
)
from pipefold.plan.precision_costs import recast_for, rerun_copies
from pipefold.plan.ranking import SLACK, bucket_ceiling, rank_key
from pipefold.plan.record import OverMemory, Record
from pipefold.plan.refine import OrderTarget, Refinement, refine_orders
from pipefold.plan.result import Candidate, Plan, Verdict
from pipefold.plan.shard_search import searched_layouts, sharded_memory, sharded_static_bytes, stage_ties
from pipefold.plan.shard_variants import GatherVariants, price_exposures
from pipefold.plan.space import Config, PlanOptions, RecomputeChoice, is_asynchronous, search_space
from pipefold.plan.splits import floor_problem, searched_degrees
from pipefold.plan.stages import (
    StageArrays,
    StageLayout,
    stage_arrays,
    stage_cost_model,
    stage_weights,
    transient_bytes,
)
from pipefold.plan.tensor import LinearCosts
from pipefold.plan.topology import MeshLinks, place
from pipefold.schedule import names
from pipefold.simulate import CostModel, Link

__all__ = ["plan", "evaluate"]


class _Search:
    def __init__(self, source: CostSource, options: PlanOptions, floors: bool = True) -> None:
        self.source = source
        self.costs = source.base
        self.by_rows = not isinstance(source, LinearCosts)
        self.options = options
        self.selective: CostSource | None = None
        """The source with the attention core recomputed (Korthikanti et al. 2022), where searched."""
        if options.recompute_attention:
            recomputed = getattr(source, "attention_recomputed", None)
            if recomputed is None:
                raise ConfigError(
                    "recompute_attention = True, but these costs cannot price selective recomputation (they "
                    "do not separate the attention core); estimate the GPT on a hardware file "
                    "(pipefold.plan.estimate.GptEstimate, pipefold plan --model gpt --hardware), or drop it"
                )
            self.selective = recomputed()
        self.limit = options.memory_limit
        self.floors = floors and options.searches_degree
        """Whether splits over the limit by `static_floor` are refused before their configurations."""
        self.floored: dict[tuple[int, int, int], str] = {}
        """(dp, pp, tp) -> why no setting of that split fits (its floor), refused unsearched."""
        self.num_simulated = 0
        self.num_untimed = 0
        """Configurations over the limit in their family order not timed for the order search (budget)."""
        self.top: list[Candidate] = []
        self._layouts: dict[tuple[object, ...], tuple[int, ...]] = {}
        self._split: dict[tuple[int, int, int, Link, bool], ModelCosts] = {}
        self._links: dict[tuple[int, int, int], MeshLinks] = {}
        self._models: dict[tuple[object, ...], CostModel] = {}
        self._syncs: dict[tuple[object, ...], float] = {}
        self._terms: dict[tuple[object, ...], BoundTerms] = {}
        self._held: dict[tuple[object, ...], HeldTerms] = {}
        self._bound_at: dict[tuple[object, ...], float] = {}
        self._held_at: dict[tuple[object, ...], float] = {}
        self._boundaries: dict[tuple[object, ...], Boundaries] = {}
        self._link_tables: dict[tuple[int, int, int], LinkTable] = {}
        self._arrays: dict[tuple[object, ...], StageArrays] = {}
        self._static: dict[tuple[object, ...], tuple[int, ...]] = {}
        self.variants = GatherVariants()
        """Full sharding: each configuration's default variant, which bounds its siblings."""
        self.excluded: dict[Degree, dict[str, tuple[str, str]]] = {}
        """Per searched degree, the families with no configuration there and why."""
        self.rejected: dict[tuple[int, int, int], str] = {}
        """(dp, pp, tp) -> why that split cannot run this batch (or this model) at all."""

    # -- helpers -----------------------------------------------------------------------------

    def costs_of(self, record: Record) -> ModelCosts:
        config = record.config
        return self.costs_at(record.degree, config.microbatch_rows, config.recompute_attention,
                             config.shard != "replicate")

    def costs_at(self, degree: Degree, rows: int, recompute_attention: bool = False, sharded: bool = False
                 ) -> ModelCosts:
        """The costs of one tp rank at `degree` for micro-batches of `rows` samples (docs/decisions.md,
        "Tensor-parallel cost model"), with ZeRO-1 its share of the optimizer state (docs/decisions.md,
        "Data-parallel step model"; `sharded`: ZeRO-1 or full sharding). Linear costs are the same at
        any rows (scaled later)."""
        dp, tp = degree.num_data_parallel, degree.num_tensor_parallel
        zero = sharded and dp > 1
        link = self.links(degree).tensor_parallel
        # The tp link enters the costs: splits of one tp on different links differ.
        key = (tp, dp if zero else 1, rows if self.by_rows else 0, link, recompute_attention)
        if key not in self._split:
            source = self.selective if recompute_attention and self.selective is not None else self.source
            costs = source.at(rows, tp, link, self.options.splits_sequence(tp))
            self._split[key] = costs.zero_sharded(dp) if zero else costs
        return self._split[key]

    def links(self, degree: Degree) -> MeshLinks:
        """The links of `degree`'s collectives and sends: placed on the hardware's nodes
        (`pipefold.plan.topology`), or the options' links where no hardware is given."""
        key = degree.split
        if key not in self._links:
            hardware = self.options.hardware
            if hardware is None:
                self._links[key] = MeshLinks(self.options.tensor_parallel_link, self.options.allreduce_link,
                                             self.options.link)
            else:
                dp, pp, tp = key
                self._links[key] = place(hardware, num_data_parallel=dp, num_ranks=pp, num_tensor_parallel=tp,
                                         inner=self._inner(degree))
        return self._links[key]

    def stage_speeds(self, degree: Degree, placement: tuple[int, ...]) -> tuple[float, ...] | None:
        """Per stage, its rank's device speed on a mix of device kinds; None where all are the
        reference device."""
        speeds = self.links(degree).rank_speeds
        return tuple(speeds[rank] for rank in placement) if speeds else None

    def limits(self, degree: Degree) -> tuple[float, ...]:
        """Per pipeline rank, the memory it may use: the plan's limit, or its devices' where smaller."""
        own = self.links(degree).rank_memory
        if not own:
            return (self.limit,) * degree.num_ranks
        return tuple(min(self.limit, memory) for memory in own)

    def over(self, record: Record, memory: tuple[RankMemory, ...]) -> float:
        """Bytes by which the rank furthest over its limit exceeds it; <= 0 when every rank fits."""
        return max(rank.total - limit for rank, limit in zip(memory, self.limits(record.degree), strict=True))

    def _inner(self, degree: Degree) -> Literal["dp", "pp"]:
        """Which of dp and pp goes inside a node after tp: the one that moves more bytes per step
        (docs/plan.md, "Topology"). dp: a ring all-reduce moves about twice a rank's gradients;
        pp: every sample's boundary goes forward and its gradient back."""
        costs = self.costs
        dp, pp, tp = degree.split
        if dp == 1 or pp == 1:
            return "dp" if pp == 1 else "pp"
        hardware = self.options.hardware
        if hardware is not None and hardware.is_mixed:
            # On a mix of device kinds, first the placement whose ranks lose less speed to a slower
            # device among their replicas (each rank runs at its slowest device's speed).
            kept = {inner: sum(place(hardware, num_data_parallel=dp, num_ranks=pp, num_tensor_parallel=tp,
                                     inner=inner).rank_speeds) for inner in ("dp", "pp")}
            if kept["dp"] != kept["pp"]:
                return "dp" if kept["dp"] > kept["pp"] else "pp"
        gradients = costs.parameter_bytes * costs.gradient_bytes_per_parameter_byte / (pp * tp)
        boundary = max(layer.output_bytes for layer in costs.layers)
        sends = 2 * degree.replica_batch / costs.reference_rows * boundary
        return "dp" if 2 * gradients >= sends else "pp"

    def cores(self, degree: Degree) -> float | None:
        return self.options.cores_per_pipeline(degree.num_data_parallel, degree.num_tensor_parallel)

    def bounds_of(self, degree: Degree, num_stages: int, rows: int, recompute_attention: bool = False,
                  placement: tuple[int, ...] = ()) -> tuple[int, ...]:
        """The balanced partition; on a mix of device kinds each stage's cost is divided by its
        rank's speed (in `placement`), so slower ranks get less work."""
        link = self.links(degree).tensor_parallel
        speeds = self.stage_speeds(degree, placement) if placement else None
        key = (degree.num_tensor_parallel, num_stages, rows, link, recompute_attention, speeds)
        if key not in self._layouts:
            costs = self.costs_at(degree, rows, recompute_attention)
            self._layouts[key] = balance(stage_weights(costs, rows), num_stages, speeds).bounds
        return self._layouts[key]

    def model(self, record: Record, recompute: tuple[int, ...]) -> CostModel:
        return self.model_at(record.degree, record.config, record.bounds, recompute, record.placement)

    def model_at(self, degree: Degree, config: Config, bounds: tuple[int, ...], recompute: tuple[int, ...],
                 placement: tuple[int, ...]) -> CostModel:
        """The stage costs of a configuration: the same for every family and m of one split, rows,
        partition and recompute (and on a mix of devices, stage speeds), so those without recompute
        (most of them) and those recomputing every stage (every memory-aware bound needs one) are
        built once."""
        speeds = self.stage_speeds(degree, placement)
        every = len(recompute) == len(bounds) - 1 and recompute == tuple(range(len(bounds) - 1))
        cached = not recompute or every
        key = (degree.split, config.microbatch_rows, config.recompute_attention, bounds, speeds, every)
        if cached and key in self._models:
            return self._models[key]
        layout = StageLayout(bounds, config.microbatch_rows)
        links = self.links(degree)
        costs = self.costs_at(degree, config.microbatch_rows, config.recompute_attention)
        model = first_stage_backward(stage_cost_model(
            costs, layout, recompute, links.pipeline, self.cores(degree), links.pipeline_overrides, speeds,
        ), costs, bounds)
        if cached:
            self._models[key] = model
        return model

    def boundaries(self, record: Record, model: CostModel) -> Boundaries:
        """The sends between `record`'s stages (`pipefold.plan.bounds.boundary_times`): the same for
        every recompute choice, family and m of one split, rows, partition and placement."""
        config = record.config
        key = (record.degree.split, config.microbatch_rows, config.recompute_attention, record.bounds,
               record.placement)
        if key not in self._boundaries:
            # Every model of a split has its pipeline's links (`model_at`): one table per split.
            split = record.degree.split
            if split not in self._link_tables:
                self._link_tables[split] = link_table(model, record.degree.num_ranks)
            self._boundaries[key] = boundary_times(model, record.placement, self._link_tables[split])
        return self._boundaries[key]

    def bound(self, record: Record, recompute: tuple[int, ...], backward: Backward | None = None) -> float:
        """Lower bound on the step of `record`'s family order (`backward` "any": of any order)."""
        config = record.config
        # Only the family's own order of a serial family runs one micro-batch at a time.
        serial = backward is None and config.schedule in SERIAL_FAMILIES
        backward = record.backward if backward is None else backward
        if recompute:
            model = self.model(record, recompute)
            terms = bound_terms(model, record.placement, backward, self.boundaries(record, model))
            return record.allreduce_s + terms.at(config.num_microbatches, serial)
        # Without recompute the terms are shared by every m (and family of one placement), and the
        # families of one placement mostly share the micro-batch count too.
        key = (record.degree.split, config.microbatch_rows, config.recompute_attention, record.bounds,
               record.placement, backward)
        if key not in self._terms:
            model = self.model(record, ())
            self._terms[key] = bound_terms(model, record.placement, backward, self.boundaries(record, model))
        at_key = (key, config.num_microbatches, serial)
        if at_key not in self._bound_at:
            self._bound_at[at_key] = self._terms[key].at(config.num_microbatches, serial)
        return record.allreduce_s + self._bound_at[at_key]

    def held_bound(self, record: Record) -> float:
        """Lower bound on the step of any order and any recompute choice the search may take that
        fits the limit (`pipefold.plan.held`): Little's law on each rank's activations."""
        if self.limit == math.inf:
            return 0.0
        config, degree = record.config, record.degree
        allowed = self.recompute_choices(record)
        key = (degree.split, config.microbatch_rows, config.recompute_attention, record.bounds,
               record.placement, allowed, config.shard, config.free_between, config.gather_lookahead)
        if key not in self._held:
            plain = self.model(record, ())
            everything = self.recomputed_arrays(record)
            static = self.static_of(record, plain)
            headroom = [limit - held for limit, held in zip(self.limits(degree), static, strict=True)]
            self._held[key] = held_terms(plain, everything, record.placement, headroom, allowed,
                                         self.boundaries(record, plain))
        # The families of one placement share the terms and mostly the micro-batch count too.
        at_key = (key, config.num_microbatches)
        if at_key not in self._held_at:
            self._held_at[at_key] = self._held[key].at(config.num_microbatches)
        return record.allreduce_s + self._held_at[at_key]

    def recomputed_arrays(self, record: Record) -> CostModel | StageArrays:
        """The stage times and kept bytes of `record` with every stage recomputed: its model where
        built already, else the arrays alone (the held bound reads no more, and most configurations
        never need the model)."""
        config, degree = record.config, record.degree
        speeds = self.stage_speeds(degree, record.placement)
        key = (degree.split, config.microbatch_rows, config.recompute_attention, record.bounds, speeds, True)
        if key in self._models:
            return self._models[key]
        if key not in self._arrays:
            costs = self.costs_at(degree, config.microbatch_rows, config.recompute_attention)
            layout = StageLayout(record.bounds, config.microbatch_rows)
            self._arrays[key] = stage_arrays(costs, layout, range(layout.num_stages), speeds)
        return self._arrays[key]

    def static_of(self, record: Record, model: CostModel) -> tuple[int, ...]:
        """Per rank, weights, gradients and optimizer state at the peak: a lower bound on it
        (`model`: the record's without recompute)."""
        config, pp = record.config, record.degree.num_ranks
        if config.shard == "full":
            costs = self.costs_of(record)
            return sharded_static_bytes(costs, model, config, record.placement, pp,
                                        record.degree.num_data_parallel, stage_ties(costs, record.bounds))
        # The same for every family and m of one split, rows, partition, placement and sharing.
        key = (record.degree.split, config.microbatch_rows, config.recompute_attention, record.bounds,
               record.placement, config.shard)
        if key not in self._static:
            self._static[key] = static_bytes(self.costs_of(record), model, record.placement, pp)
        return self._static[key]

    @property
    def threshold(self) -> float:
        """A configuration slower than this cannot enter the table."""
        if len(self.top) < self.options.top:
            return float("inf")
        return bucket_ceiling(self.top[self.options.top - 1].step_time) * (1 + SLACK)

    def run(self, record: Record, recompute: tuple[int, ...]) -> Candidate:
        if recompute not in record.tried:
            self.num_simulated += 1
            # A default variant's exposed gather time bounds its siblings (`GatherVariants.bound`); the
            # others' is priced only where shown (`price_exposures`): one more simulation each.
            config = record.config
            record.tried[recompute] = self.evaluate(record, recompute,
                                                    not config.free_between and not config.gather_lookahead)
        return record.tried[recompute]

    def evaluate(self, record: Record, recompute: tuple[int, ...], price_exposure: bool) -> Candidate:
        degree = record.degree
        links = self.links(degree)
        return evaluate(
            self.costs_of(record), record.config, degree.num_ranks,
            record.bounds, recompute, links.pipeline, num_data_parallel=degree.num_data_parallel,
            dp_link=links.data_parallel, num_cores=self.cores(degree),
            num_tensor_parallel=degree.num_tensor_parallel,
            sharded_optimizer=record.config.shard == "zero1",
            sequence_parallel=self.options.splits_sequence(degree.num_tensor_parallel),
            link_overrides=links.pipeline_overrides,
            placed=links.describe() if self.options.hardware is not None else "",
            recompute_attention=record.config.recompute_attention,
            rank_speeds=links.rank_speeds, rank_limits=links.rank_memory,
            shard=record.config.shard, free_between=record.config.free_between,
            gather_lookahead=record.config.gather_lookahead, price_exposure=price_exposure,
            memory_bandwidth=(math.inf if self.options.hardware is None
                              else self.options.hardware.memory_bandwidth),
        )

    def keep(self, candidate: Candidate | None) -> None:
        if candidate is not None:
            self.top.append(candidate)
            self.top.sort(key=rank_key)
            del self.top[self.options.top:]

    # -- the search --------------------------------------------------------------------------

    def records(self) -> list[Record]:
        records = []
        options = self.options
        for degree in searched_degrees(options, self.costs, self.rejected):
            space = search_space(options, self.costs.num_layers, degree)
            self.excluded[degree] = space.excluded
            configs = list(space.configs)
            if self.selective is not None:
                configs += [replace(config, recompute_attention=True) for config in space.configs]
            dp, tp = degree.num_data_parallel, degree.num_tensor_parallel
            configs = [  # (`replace` is slow enough to show over the search's ten thousand configurations.)
                config if (shard, free_between, ahead) == (config.shard, config.free_between,
                                                           config.gather_lookahead)
                else replace(config, shard=shard, free_between=free_between, gather_lookahead=ahead)
                for config in configs
                for shard, free_between, ahead in searched_layouts(
                    options.shard, options.zero, dp, tp, config.num_virtual)
            ]
            pp = degree.num_ranks
            if self.floors and self.over_floor(degree, configs):
                continue
            links = self.links(degree)
            for config in configs:
                placement = family_placement(config.schedule, pp, config.num_virtual)
                bounds = self.bounds_of(degree, pp * config.num_virtual, config.microbatch_rows,
                                        config.recompute_attention, placement)
                sync_key = (degree.split, config.microbatch_rows, config.recompute_attention, bounds,
                            placement, config.shard)
                if config.shard == "full":
                    # Its gathers and reduce-scatters are simulated inside the schedule.
                    self._syncs[sync_key] = 0.0
                elif sync_key not in self._syncs:
                    costs = self.costs_at(degree, config.microbatch_rows, config.recompute_attention)
                    model = self.model_at(degree, config, bounds, (), placement)
                    self._syncs[sync_key] = replica_sync_time(
                        costs, model, placement, pp, degree.num_data_parallel, links.data_parallel,
                        config.shard == "zero1")
                record = Record(degree, config, bounds, placement, self._syncs[sync_key], 0.0)
                self.variants.add(record)
                record.lower_bound = max(self.bound(record, ()), self.held_bound(record))
                records.append(record)
        order = {name: index for index, name in enumerate(names())}
        records.sort(key=lambda r: (
            r.lower_bound, r.degree.num_data_parallel, r.degree.num_tensor_parallel, order[r.config.schedule],
            r.config.num_virtual, r.config.num_microbatches,
        ))
        return records

    def over_floor(self, degree: Degree, configs: list[Config]) -> bool:
        """Whether `degree` is refused by its floor (`pipefold.plan.splits`), kept with the reason."""
        problem = floor_problem(lambda rows, attention, shard: self.costs_at(degree, rows, attention, shard),
                                configs, degree.num_ranks, max(self.limits(degree)))
        if problem is not None:
            self.floored[degree.split] = problem
        return problem is not None

    def recompute_choices(self, record: Record) -> RecomputeChoice:
        if is_asynchronous(record.config.schedule):
            return "none"
        return self.options.recompute

    def search_config(self, record: Record) -> None:
        num_stages = len(record.bounds) - 1
        everything = tuple(range(num_stages))
        choice = self.recompute_choices(record)
        static = self.static_of(record, self.model(record, ()))
        limits = self.limits(record.degree)
        worst = max(range(len(static)), key=lambda rank: static[rank] - limits[rank])
        if static[worst] > limits[worst]:
            record.static_over = (worst, int(static[worst] - limits[worst]))
            return
        # The exact bound needs the schedule (whether it runs B or I + W), generated only now that
        # the looser bound let the configuration through.
        config = record.config
        record.backward = family_backward(config.schedule, record.degree.num_ranks, config.num_microbatches,
                                    config.num_virtual)
        first = everything if choice == "full" else ()
        # The record's bound holds for every recompute choice and knows the memory limit.
        bound = max(self.bound(record, first), record.lower_bound,
                    self.variants.bound(record, first, lambda: self.model(record, first)))
        if bound > self.threshold or self.variants.dominated(record, first, bound):
            record.prune(bound)
            return
        memory = self.known_memory(record, first)
        if memory is None or self.over(record, memory) <= 0:
            candidate = self.run(record, first)
            memory = candidate.memory
        else:
            record.over[first] = self.over_memory(record, first, memory)
        if self.over(record, memory) <= 0 or choice != "auto":
            self.keep(record.best(self.limit))
            return
        if num_stages <= self.options.exhaustive_recompute_stages:
            self.exhaustive(record, everything)
        else:
            self.greedy(record, memory)
        self.keep(record.best(self.limit))

    def over_memory(self, record: Record, recompute: tuple[int, ...], memory: tuple[RankMemory, ...]
                    ) -> OverMemory:
        return OverMemory(recompute, memory, self.links(record.degree).rank_memory)

    def known_memory(self, record: Record, recompute: tuple[int, ...]) -> tuple[RankMemory, ...] | None:
        """Per rank, the memory of a recompute choice, without simulating it where its order tells it
        (a flush's activations depend on each rank's order only: `pipefold.simulate.compiled`)."""
        if recompute in record.tried:
            return record.tried[recompute].memory
        config, degree = record.config, record.degree
        sizes = (degree.num_ranks, config.num_microbatches, config.num_virtual)
        # Where no casts are held (full sharding), every forward casts: plan.precision_costs.
        model = recast_for(self.model(record, recompute), self.costs_of(record), config.schedule,
                           config.shard, recompute, record.bounds)
        if not compiles_order(family_order(config.schedule, *sizes), model):
            return None
        both = order_peaks_and_later(config.schedule, *sizes, model)
        if both is None:
            both = compiled_family(config.schedule, *sizes).order_peaks_and_later(model)
        if both is None:
            return None
        peaks, later = both
        costs = self.costs_of(record)
        layout = StageLayout(record.bounds, config.microbatch_rows)
        transient = transient_bytes(costs, layout, recompute, record.placement, degree.num_ranks,
                                    rerun_copies(costs, config.schedule, config.shard))
        weights = tuple(static_weight_bytes(model, record.placement, degree.num_ranks))
        memory = memory_of_peaks(costs, model, weights, peaks, record.placement, transient, later,
                                 config.num_microbatches)
        if config.shard == "full":
            # The sharding actions hold no activations: a flush's activation peaks are its order's.
            return sharded_memory(memory, model, config, record.placement, degree.num_data_parallel,
                                  stage_ties(costs, record.bounds), costs)
        return memory

    def exhaustive(self, record: Record, everything: tuple[int, ...]) -> None:
        sizes = range(1, len(everything) + 1)
        subsets = [subset for size in sizes for subset in itertools.combinations(everything, size)]
        bounded = sorted((self.bound(record, subset), subset) for subset in subsets)
        best: Candidate | None = None
        for bound, subset in bounded:
            tie = bucket_ceiling(best.step_time) * (1 + SLACK) if best else float("inf")
            ceiling = min(self.threshold, tie)
            if bound > ceiling:
                if best is None:
                    record.prune(bound)
                break
            memory = self.known_memory(record, subset)
            if memory is not None and self.over(record, memory) > 0:
                record.over[subset] = self.over_memory(record, subset, memory)
                continue
            candidate = self.run(record, subset)
            fits = candidate.over_limit(self.limit) <= 0
            if fits and (best is None or rank_key(candidate) < rank_key(best)):
                best = candidate

    def greedy(self, record: Record, memory: tuple[RankMemory, ...]) -> None:
        """Recompute stages, most bytes freed per second first, until every rank fits; each step's
        memory is read from the order where it tells it, so only the last step is simulated."""
        model = self.model(record, ())
        full = model.activation_bytes
        lean = self.model(record, tuple(range(model.num_stages))).activation_bytes
        recompute: set[int] = set()
        limits = self.limits(record.degree)
        while self.over(record, memory) > 0:
            added = False
            for rank, held_by_rank in enumerate(memory):
                if held_by_rank.total <= limits[rank]:
                    continue
                owned = [s for s, owner in enumerate(record.placement) if owner == rank]
                left = [s for s in owned if s not in recompute]
                if not left:
                    continue
                # Most bytes freed per second of recomputation; a free forward counts as one microsecond.
                left.sort(key=lambda s: ((full[s] - lean[s]) / max(model.f[s], 1e-6), -s), reverse=True)
                # As many stages as the peak says free the excess (its micro-batches in flight
                # per stage: the peak over one micro-batch of every stage), so a rank of many stages
                # needs a few steps, not one per stage; the next step checks.
                held = sum(lean[s] if s in recompute else full[s] for s in owned)
                in_flight = held_by_rank.activations / held if held else 1.0
                excess = held_by_rank.total - limits[rank]
                for stage in left:
                    recompute.add(stage)
                    added = True
                    excess -= (full[stage] - lean[stage]) * in_flight
                    if excess <= 0:
                        break
            subset = tuple(sorted(recompute))
            if not added:
                return
            bound = self.bound(record, subset)
            if bound > self.threshold:
                record.prune(bound)
                return
            known = self.known_memory(record, subset)
            if known is None or self.over(record, known) <= 0:
                memory = self.run(record, subset).memory
            else:
                record.over[subset] = self.over_memory(record, subset, known)
                memory = known

    # -- the order search (docs/decisions.md, "Planner refinement") ---------------------------

    def refine(self, records: list[Record], choice: Candidate | None) -> Refinement:
        """Search the orders of the targets, best first, while they can still beat the family `choice`
        (None: no family order fits) and the budget lasts (see docs/decisions.md, "Planner refinement")."""
        def targets(deadline: float) -> tuple[list[OrderTarget], int]:
            return order_targets(self, records, choice, deadline), self.num_untimed

        return refine_orders(targets, choice, self.options)

    def leanest_everywhere(self, records: list[Record]) -> None:
        """With nothing feasible: the least memory each configuration can reach, for the error."""
        for record in records:
            choice = self.recompute_choices(record)
            lean = () if choice == "none" else tuple(range(len(record.bounds) - 1))
            self.run(record, lean)
            self.run(record, ())


def _searched(source: CostSource, options: PlanOptions, floors: bool) -> tuple[_Search, list[Record]]:
    """Every configuration visited in bound order: simulated, or pruned by its bound."""
    search = _Search(source, options, floors)
    records = search.records()
    for record in records:
        if record.lower_bound > search.threshold:
            record.prune(record.lower_bound)
            continue
        search.search_config(record)
    return search, records


def plan(costs: ModelCosts | CostSource, options: PlanOptions) -> Plan:
    """The fastest configuration whose every rank fits `options.memory_limit`, and why (see
    docs/decisions.md, "Planner search"). Raises `NoFeasiblePlan` naming the least memory that would do.

    `costs`: per-layer `ModelCosts` (scaled linearly with rows), or a `CostSource` that prices
    each (rows, tp) itself (`pipefold.plan.estimate.GptEstimate` on a hardware file).
    """
    source: CostSource = LinearCosts(costs) if isinstance(costs, ModelCosts) else costs
    search, records = _searched(source, options, floors=True)
    if not search.top and search.floored:
        # Nothing fits: the error names the least memory any configuration reaches, the splits
        # refused by their floor included.
        search, records = _searched(source, options, floors=False)
    if not records:
        raise nothing_to_search(options, search.rejected, search.excluded)
    costs = search.costs
    family_choice = search.top[0] if search.top else None
    if family_choice is None:
        search.leanest_everywhere(records)
    refinement = search.refine(records, family_choice)
    if family_choice is None and not refinement.found:
        tried = [c for record in records for c in record.tried.values()]
        least = min(tried, key=lambda c: (c.over_limit(options.memory_limit), c.peak_memory, rank_key(c)))
        fastest = min((r.tried[()] for r in records if () in r.tried), key=rank_key, default=least)
        raise NoFeasiblePlan(options.memory_limit, least, fastest)
    top = sorted([*search.top, *(candidate for candidate, _ in refinement.found)], key=rank_key)
    del top[options.top:]
    # Every full-sharding candidate shown (ranked, or a layout of the choice's configuration)
    # with its exposed gather time.
    first = top[0]
    same = (first.num_data_parallel, first.num_ranks, first.num_tensor_parallel, first.schedule,
            first.num_virtual, first.num_microbatches, first.microbatch_rows, first.bounds)
    shown = [*top, *([family_choice] if family_choice is not None else []), *(
        c for record in records for c in record.tried.values()
        if (record.degree.split + (record.config.schedule, record.config.num_virtual,
            record.config.num_microbatches, record.config.microbatch_rows, record.bounds)) == same)]
    priced = price_exposures(records, shown, search.evaluate)
    top = [priced.get(id(c), c) for c in top]
    if family_choice is not None:
        family_choice = priced.get(id(family_choice), family_choice)
    choice = top[0]
    chosen_degree = Degree(choice.num_data_parallel, choice.num_ranks,
                           options.global_batch // choice.num_data_parallel, choice.num_tensor_parallel)
    # The families and settings are compared in the choice's data-parallel layout; the layouts apart.
    layouts = [record for record in records if record.degree == chosen_degree]
    same_degree = [record for record in layouts if (
        record.config.shard, record.config.free_between, record.config.gather_lookahead) == (
        choice.shard, choice.free_between_microbatches, choice.gather_lookahead)]

    def extra(record: Record, recompute: tuple[int, ...]) -> Candidate | OverMemory:
        memory = search.known_memory(record, recompute)
        if memory is not None and search.over(record, memory) > 0:
            return search.over_memory(record, recompute, memory)
        return search.run(record, recompute)

    # A searched choice's settings are those of its configuration's family, compared with its step.
    setting_choice = choice
    if choice.base_family is not None:
        setting_choice = replace(choice, schedule=choice.base_family, order=None, base_family=None)
    families = family_verdicts(same_degree, search.excluded[chosen_degree], choice, options.memory_limit)
    settings = setting_verdicts(same_degree, setting_choice, options.memory_limit, extra,
                                asynchronous=is_asynchronous(setting_choice.schedule),
                                recompute_pinned=options.recompute != "auto")
    settings += layout_verdicts(layouts, setting_choice, options.memory_limit)
    searched = refinement.searched_for(choice) if choice.is_searched_order else refinement.of_choice
    degrees: tuple[Verdict, ...] = ()
    if options.searches_degree:
        degrees = degree_verdicts(records, search.rejected, search.excluded, options.degree_splits(), choice,
                                  options.memory_limit, search.floored)
        if choice.is_searched_order:
            # No family candidate is the choice, so the chosen split reads "slower" than itself otherwise.
            degrees = tuple(
                Verdict(v.subject, "chosen", choice.describe()) if v.subject == choice.degree_text else v
                for v in degrees
            )
    return Plan(
        choice=choice,
        top=tuple(top),
        families=families,
        settings=settings,
        num_ranks=choice.num_ranks,
        global_batch=options.global_batch,
        memory_limit=options.memory_limit,
        num_simulated=search.num_simulated,
        num_pruned=sum(1 for record in records if record.pruned_bound is not None and not record.tried),
        source=costs.source,
        degrees=degrees,
        num_devices=options.num_devices if options.searches_degree else None,
        searched=searched,
        best_family=family_choice if choice.is_searched_order else None,  # None too where no family fits
        num_order_searches=refinement.num_searches,
        num_order_pruned=refinement.num_pruned,
        num_order_unsearched=refinement.num_unsearched,
    )
