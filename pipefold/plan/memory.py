"""Peak memory per rank: what a rank holds for its weights, and at most for activations.

Weights, gradients, optimizer state, simulated activations and the recompute transient during
the pipeline's call; then the update's temporaries (`pipefold.plan.update_memory`) beside the
weights, gradients and state, when no activation is held. What is not counted:
docs/decisions.md, "Planner memory model".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipefold.plan.costs import ModelCosts
from pipefold.simulate import CostModel
from pipefold.simulate.memory import later_activation_bytes_peak
from pipefold.timeline import Timeline

__all__ = [
    "RankMemory", "cast_bytes", "excess_per_rank", "update_bytes", "rank_memory", "memory_of_peaks",
    "static_bytes", "static_weight_bytes", "gradient_bytes",
    "repeated_casts", "kept_receive_bytes",
]


@dataclass(frozen=True)
class RankMemory:
    """Peak bytes one rank needs, by kind (see docs/decisions.md, "Planner memory model")."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    recompute: int = 0
    casts: int = 0
    """The 16-bit weight copies mixed precision holds for the step: its stages' own
    (`CostModel.cast_bytes`, from `LayerCost.cast_bytes`), else its weights times
    `ModelCosts.cast_bytes_per_parameter_byte`."""
    update: int = 0
    """The most the update after the step allocates for a moment: the gradient norm's float64
    copies or the optimizer step's temporaries, whichever is larger (`update_bytes`). Live beside
    the weights, gradients and optimizer state; the activations and casts are freed by then."""
    later_activations: int | None = None
    """The most activation bytes held from the end of the rank's first backward on, when its
    gradients exist: `zero_grad(set_to_none=True)` frees them at each update and a backward makes
    them, so the pipeline call holds the larger of `activations` without the gradients and this
    with them. None: the gradients beside the whole peak (plans written before it)."""
    temporary: int = 0
    """What a backward of the rank's stages holds at once beyond its micro-batch's kept activations
    (`CostModel.backward_temporary_bytes`: the gradients handed on, a new weight gradient, the
    loss's gradients, and a recomputed layer's rebuilt activations), beyond `recompute` (the
    rebuilt layer counted there): the pipeline call adds both."""
    received: int = 0
    """Receive buffers the runtime keeps from step to step beyond those holding activations in
    flight (CPU only: `ModelCosts.keeps_receive_buffers`; `kept_receive_bytes`)."""

    @property
    def held_activations(self) -> int:
        """The activations and gradients of the pipeline call's peak: the larger of the peak
        without the gradients and the later peak with them (`later_activations`)."""
        later = self.activations if self.later_activations is None else self.later_activations
        return max(self.activations, later + self.gradients)

    @property
    def pipeline_total(self) -> int:
        """The peak during the pipeline's call (what `total` was before the update was priced)."""
        return (self.weights + self.optimizer + self.held_activations + self.recompute + self.casts
                + self.temporary + self.received)

    @property
    def update_total(self) -> int:
        """The peak during the update: weights, gradients and optimizer state, and its temporaries."""
        return self.weights + self.gradients + self.optimizer + self.update

    @property
    def total(self) -> int:
        """The rank's peak over the whole step: the pipeline's call or the update after it."""
        return max(self.pipeline_total, self.update_total)

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "recompute": self.recompute, "casts": self.casts,
            "update": self.update, "pipeline_total": self.pipeline_total, "update_total": self.update_total,
            "total": self.total,
            # Written only where priced: plans without them read and write as before.
            **({"later_activations": self.later_activations} if self.later_activations is not None else {}),
            **({"temporary": self.temporary} if self.temporary else {}),
            **({"received": self.received} if self.received else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankMemory:
        # A plan written before `update` existed reads with none (its total was the pipeline's).
        derived = {"total", "pipeline_total", "update_total"}
        return cls(**{key: None if value is None else int(value)  # type: ignore[arg-type]
                      for key, value in data.items() if key not in derived})


class PeakMemory:
    """The fullest rank of a configuration whose `memory` holds one `RankMemory` per rank.

    `rank_limits` (a field of the subclasses): on a mix of device kinds, per rank the usable
    memory of its smallest device; each rank is held to the smaller of it and the plan's limit.
    Empty: every rank has the plan's limit."""

    memory: tuple[RankMemory, ...]
    rank_limits: tuple[int, ...]

    @property
    def peak_memory(self) -> int:
        return max(memory.total for memory in self.memory)

    @property
    def peak_rank(self) -> int:
        """The rank with the most memory (the lowest such rank)."""
        totals = [memory.total for memory in self.memory]
        return totals.index(max(totals))

    def over_limit(self, limit: float) -> float:
        """Bytes by which the fullest rank exceeds `limit` (or its own device's, where smaller);
        <= 0 when it fits."""
        if not self.rank_limits:
            return self.peak_memory - limit
        return max(excess_per_rank(self.memory, limit, self.rank_limits))

    def tightest_rank(self, limit: float) -> int:
        """The rank furthest over (or least under) its limit; the fullest rank on alike devices."""
        if not self.rank_limits:
            return self.peak_rank
        excess = excess_per_rank(self.memory, limit, self.rank_limits)
        return excess.index(max(excess))


def excess_per_rank(memory: tuple[RankMemory, ...], limit: float, rank_limits: tuple[int, ...]
                    ) -> list[float]:
    """Per rank, bytes over min(limit, its device's limit); `rank_limits` empty: `limit` for all."""
    if not rank_limits:
        return [rank.total - limit for rank in memory]
    return [rank.total - min(limit, own) for rank, own in zip(memory, rank_limits, strict=True)]


def _owned_weight_bytes(model: CostModel, placement: tuple[int, ...], num_ranks: int) -> list[int]:
    owned = [0] * num_ranks
    for stage, rank in enumerate(placement):
        owned[rank] += model.weight_bytes[stage]
    for counts, size in model.tied_weights:
        # A tied weight (an embedding and head) its rank holds in several layers is one tensor
        # (`CostModel.held_weight_bytes` of each rank's stages, for every rank in one pass).
        copies = [0] * num_ranks
        for stage, count in counts:
            copies[placement[stage]] += count
        for rank, held in enumerate(copies):
            if held > 1:
                owned[rank] -= (held - 1) * size
    return owned


def _owned_no_decay_bytes(model: CostModel, placement: tuple[int, ...], owned: Sequence[int]) -> list[int]:
    """Per rank, the part of its `owned` weight bytes without weight decay
    (`CostModel.no_decay_weight_bytes`).
    A tied weight its rank holds in several layers counts once: its repeats come off this part as
    far as it goes (pipefold's rule puts a tied embedding / head there: `pipefold.job.optim`)."""
    held = [0] * len(owned)
    for stage, rank in enumerate(placement):
        held[rank] += model.no_decay_weight_bytes[stage]
    for counts, size in model.tied_weights:
        copies = [0] * len(owned)
        for stage, count in counts:
            copies[placement[stage]] += count
        for rank, num_copies in enumerate(copies):
            if num_copies > 1:
                held[rank] -= min(held[rank], (num_copies - 1) * size)
    return [min(part, whole) for part, whole in zip(held, owned, strict=True)]


def repeated_casts(model: CostModel, placement: Sequence[int], num_ranks: int) -> list[int]:
    """Per rank, the bytes of the tied weights' copies (`CostModel.tied_casts`) that several of its
    stages count in their `cast_bytes` beyond the first: the rank casts and holds each once while
    the step's casts are held (autocast's cache spans its stages)."""
    repeated = [0] * num_ranks
    for counts, size in model.tied_casts:
        stages = [0] * num_ranks
        for stage, _ in counts:
            stages[placement[stage]] += 1
        for rank, held in enumerate(stages):
            repeated[rank] += max(held - 1, 0) * size
    return repeated


def cast_bytes(costs: ModelCosts, model: CostModel, placement: tuple[int, ...], num_ranks: int) -> list[int]:
    """Per rank, the 16-bit weight copies it holds for a step: its stages' `CostModel.cast_bytes`
    (a tied weight's copy once: `repeated_casts`) where the model has them, else its weights (a
    tied weight once) times the model's ratio."""
    if any(model.cast_bytes):
        held = [-repeated for repeated in repeated_casts(model, placement, num_ranks)]
        for stage, rank in enumerate(placement):
            held[rank] += model.cast_bytes[stage]
        return held
    return [round(owned * costs.cast_bytes_per_parameter_byte)
            for owned in _owned_weight_bytes(model, placement, num_ranks)]


def static_weight_bytes(model: CostModel, placement: tuple[int, ...], num_ranks: int) -> list[int]:
    """Per rank, the bytes of its stages' weights (a tied weight it holds in several layers, once:
    `CostModel.tied_weights`)."""
    return _owned_weight_bytes(model, placement, num_ranks)


def static_bytes(
    costs: ModelCosts, model: CostModel, placement: tuple[int, ...], num_ranks: int
) -> tuple[int, ...]:
    """Per rank, weights (one version), gradients and optimizer state: a lower bound on its peak."""
    # Rounded part by part exactly as rank_memory does, so the bound never exceeds the peak.
    return tuple(
        owned
        + round(owned * costs.gradient_bytes_per_parameter_byte)
        + round(owned * costs.optimizer_bytes_per_parameter_byte)
        + casts
        for owned, casts in zip(_owned_weight_bytes(model, placement, num_ranks),
                                cast_bytes(costs, model, placement, num_ranks), strict=True)
    )


def gradient_bytes(
    costs: ModelCosts, model: CostModel, placement: tuple[int, ...], num_ranks: int
) -> tuple[int, ...]:
    """Per rank, the bytes of its stages' gradients: what it all-reduces across data-parallel replicas."""
    # Rounded as rank_memory rounds `RankMemory.gradients`, so the two always agree.
    return tuple(
        round(owned * costs.gradient_bytes_per_parameter_byte)
        for owned in _owned_weight_bytes(model, placement, num_ranks)
    )


def update_bytes(costs: ModelCosts, owned: Sequence[int], no_decay: Sequence[int] = (),
                 norms: Sequence[int] = ()) -> list[int]:
    """Per rank owning `owned` parameter bytes, `no_decay` of them in the group without weight
    decay (empty: none), the update's temporaries at their most: the gradient norm's (per rank
    `norms`; empty: the model's `ModelCosts.gradient_norm_bytes` on every rank), or the
    optimizer step's (the rank's per-byte copies, its larger group's foreach list and one
    tensor's), whichever is larger (`pipefold.plan.update_memory`). A rank without parameters
    allocates none."""
    exempt = list(no_decay) or [0] * len(owned)
    norm = list(norms) or [costs.gradient_norm_bytes] * len(owned)
    return [
        max(norm[rank],
            round(held * costs.update_bytes_per_parameter_byte)
            + round(max(held - free, free) * costs.update_group_bytes_per_parameter_byte)
            + costs.update_tensor_bytes)
        if held > 0 else 0
        for rank, (held, free) in enumerate(zip(owned, exempt, strict=True))
    ]


def _rank_norm_bytes(model: CostModel, placement: tuple[int, ...], num_ranks: int) -> list[int]:
    """Per rank, its stages' largest `CostModel.gradient_norm_bytes`; empty where no stage has one."""
    if not any(model.gradient_norm_bytes):
        return []
    return _rank_largest(model.gradient_norm_bytes, placement, num_ranks)


def rank_memory(
    costs: ModelCosts,
    model: CostModel,
    timeline: Timeline,
    placement: tuple[int, ...],
    transient: tuple[int, ...],
    num_microbatches: int = 0,
) -> tuple[RankMemory, ...]:
    """Per rank, the peak memory of a simulated timeline (see docs/decisions.md, "Planner memory
    model"); `num_microbatches` as `memory_of_peaks`."""
    later = later_activation_bytes_peak(timeline, model)
    return memory_of_peaks(costs, model, timeline.weight_bytes_peak, timeline.activation_bytes_peak,
                           placement, transient, later, num_microbatches)


def memory_of_peaks(
    costs: ModelCosts,
    model: CostModel,
    weight_peaks: tuple[int, ...],
    activation_peaks: tuple[int, ...],
    placement: tuple[int, ...],
    transient: tuple[int, ...],
    later_peaks: Sequence[int] = (),
    num_microbatches: int = 0,
) -> tuple[RankMemory, ...]:
    """Per rank, the peak memory given its weight and activation peaks (a timeline's, or a flush
    schedule's own: `pipefold.simulate.compiled`). `later_peaks`: per rank, the most activations
    held from the end of its first backward on (`RankMemory.later_activations`); empty: the
    gradients beside the whole peak. `num_microbatches`: the step's, for the receive buffers the
    runtime keeps where `costs.keeps_receive_buffers` (0: none priced)."""
    num_ranks = len(activation_peaks)
    owned = _owned_weight_bytes(model, placement, num_ranks)
    casts = cast_bytes(costs, model, placement, num_ranks)
    update = update_bytes(costs, owned, _owned_no_decay_bytes(model, placement, owned),
                          _rank_norm_bytes(model, placement, num_ranks))
    # The stages' temporaries count a recomputed layer's rebuilt activations, `transient` too.
    temporary = [max(most - rebuilt, 0) for most, rebuilt in zip(
        _rank_largest(model.backward_temporary_bytes, placement, num_ranks), transient, strict=True)]
    later: list[int | None] = list(later_peaks) if later_peaks else [None] * num_ranks
    received = [0] * num_ranks
    if costs.keeps_receive_buffers and num_microbatches:
        # In flight at the later peak, where the gradients are (the fewer in flight, the more kept).
        held = [peak if after is None else after for peak, after in zip(activation_peaks, later, strict=True)]
        received = kept_receive_bytes(model, placement, num_ranks, num_microbatches, held)
    return tuple(
        RankMemory(
            weights=weight_peaks[rank],
            gradients=round(owned[rank] * costs.gradient_bytes_per_parameter_byte),
            optimizer=round(owned[rank] * costs.optimizer_bytes_per_parameter_byte),
            activations=activation_peaks[rank],
            recompute=transient[rank],
            casts=casts[rank],
            update=update[rank],
            later_activations=later[rank],
            temporary=temporary[rank],
            received=received[rank],
        )
        for rank in range(num_ranks)
    )


def _rank_largest(per_stage: Sequence[int], placement: tuple[int, ...], num_ranks: int) -> list[int]:
    """Per rank, the largest of its stages' `per_stage` (0 where it has none)."""
    most = [0] * num_ranks
    for stage, value in enumerate(per_stage):
        rank = placement[stage]
        if value > most[rank]:
            most[rank] = value
    return most


def kept_receive_bytes(model: CostModel, placement: tuple[int, ...], num_ranks: int, num_microbatches: int,
                       held: Sequence[int]) -> list[int]:
    """Per rank, the bytes of the receive buffers the CPU runtime keeps from step to step
    (`pipefold.runtime.receive_buffers`: one per (stage, micro-batch) and direction, each a
    boundary's `CostModel.message_bytes`) that hold no activation in flight: every gradient buffer
    (a backward's incoming gradient is in its `temporary`), and each activation buffer but those
    of the micro-batches in flight at `held` activation bytes (a stage's first layer saves its
    input: the buffer is counted among the activations), at most all of them."""
    kept = [0] * num_ranks
    per_microbatch = [0] * num_ranks
    for stage, rank in enumerate(placement):
        per_microbatch[rank] += model.activation_bytes[stage]
    for boundary, size in enumerate(model.message_bytes):
        below, above = placement[boundary], placement[boundary + 1]
        if below == above:
            continue  # passed on within the rank: nothing received
        kept[below] += num_microbatches * size  # the gradients from above
        per = per_microbatch[above]
        in_flight = min(num_microbatches, held[above] // per) if per else 0
        kept[above] += (num_microbatches - in_flight) * size
    return kept
