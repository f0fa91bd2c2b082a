"""Memory a timeline implies under a cost model: activation bytes and weight versions.

Kept apart from the event engine so that a measured timeline can be priced the same
way (`activation_bytes_peak(timeline, costs)` works on any `Timeline`). No torch.

What a (stage, micro-batch) holds, and when, is in docs/decisions.md, "What a rank holds".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pipefold.schedule.ir import Op, WeightUpdate
from pipefold.simulate.costs import CostModel
from pipefold.timeline import Event, Timeline

__all__ = [
    "activation_bytes_peak", "gathered_weight_bytes_peak", "later_activation_bytes_peak", "weight_versions",
]


def _held_changes(row: Sequence[Event], costs: CostModel) -> list[tuple[float, int]]:
    """(time, bytes) of each change of what one rank's actions hold: an F's activations from its
    end, released at its backward's (B or I) end; an I's weight-gradient inputs until its W ends."""
    changes: list[tuple[float, int]] = []
    for event in row:
        action = event.action
        if action.op is Op.F:
            changes.append((event.end, costs.activation_bytes[action.stage]))
        elif action.op.is_backward:
            changes.append((event.end, -costs.activation_bytes[action.stage]))
            if action.op is Op.I:
                changes.append((event.end, costs.weight_grad_bytes[action.stage]))
        elif action.op is Op.W:
            changes.append((event.end, -costs.weight_grad_bytes[action.stage]))
    return changes


def activation_bytes_peak(timeline: Timeline, costs: CostModel) -> tuple[int, ...]:
    """Per rank, the most activation bytes held at once (see docs/decisions.md, "What a rank holds")."""
    peaks = []
    for row in timeline.events:
        changes = _held_changes(row, costs)
        peaks.append(_peak_held(changes))
    return tuple(peaks)


def later_activation_bytes_peak(timeline: Timeline, costs: CostModel) -> tuple[int, ...]:
    """Per rank, the most activation bytes held from the end of its first backward (B or I) on, as
    `activation_bytes_peak` counts them: the rank's gradients exist from then on (a step's update
    frees them: `zero_grad(set_to_none=True)`), so the planner adds them to this figure, not to
    the peak before it (docs/decisions.md, "Planner memory model"). A rank without a
    backward: its peak."""
    result = []
    for row in timeline.events:
        ends = [event.end for event in row if event.action.op.is_backward]
        first_end = min(ends, default=None)
        changes = _held_changes(row, costs)
        if first_end is None:
            result.append(_peak_held(changes))
            continue
        # Held bytes read once all changes at one time are in (releases sort first, so a state
        # between them is never above both its neighbours), from the first backward's end on. Not
        # "from the first release on": a first backward whose stage keeps nothing releases 0 bytes,
        # and what its rank holds then counts (as `CompiledRun.later_peaks` counts it).
        held = 0
        later = 0
        ordered = sorted(changes)
        for index, (time, delta) in enumerate(ordered):
            held += delta
            last_at_time = index + 1 == len(ordered) or ordered[index + 1][0] != time
            if time >= first_end and last_at_time:
                later = max(later, held)
        result.append(later)
    return tuple(result)


def gathered_weight_bytes_peak(timeline: Timeline, costs: CostModel) -> tuple[int, ...]:
    """Per rank, under full sharding, the most bytes of whole (gathered) weights held at once:
    a stage's `weight_bytes` from the start of its UNSHARD to the end of its RESHARD. On top of
    this a rank holds its shards (weight_bytes / dp per stage); 0 without sharding actions.

    A weight of `costs.tied_weights` counts once among the stages a rank holds at once (a V
    schedule's tied first and last stage on rank 0, one gather unit), as the planner's own walk
    counts it (`pipefold.plan.shard_search.gathered_bytes`)."""
    peaks = []
    for row in timeline.events:
        # (time, 0 release / 1 gather, stage): releases first at equal times, as `_peak_held`.
        changes: list[tuple[float, int, int]] = []
        for event in row:
            action = event.action
            if action.op is Op.UNSHARD:
                changes.append((event.start, 1, action.stage))
            elif action.op is Op.RESHARD:
                changes.append((event.end, 0, action.stage))
        if not costs.tied_weights:
            peaks.append(_peak_held([(time, costs.weight_bytes[stage] * (1 if gather else -1))
                                     for time, gather, stage in changes]))
            continue
        held: Counter[int] = Counter()
        peak = 0
        for _, gather, stage in sorted(changes):
            held[stage] += 1 if gather else -1
            peak = max(peak, costs.held_weight_bytes(s for s, n in held.items() if n > 0))
        peaks.append(peak)
    return tuple(peaks)


def _peak_held(changes: list[tuple[float, int]]) -> int:
    """The most bytes held at once, from (time, +bytes or -bytes) changes. Releases sort first
    at equal times: memory freed by one action is reusable by the next."""
    held = peak = 0
    for _, delta in sorted(changes):
        held += delta
        peak = max(peak, held)
    return peak


def weight_versions(
    timeline: Timeline, costs: CostModel, weight_update: WeightUpdate, placement: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per rank: the most versions of one stage's weights held, and the peak weight bytes."""
    owned: list[list[int]] = [[] for _ in range(timeline.num_ranks)]
    for stage, rank in enumerate(placement):
        owned[rank].append(stage)
    if weight_update is WeightUpdate.FLUSH:
        versions = tuple(1 if stages else 0 for stages in owned)
        sizes = tuple(costs.held_weight_bytes(stages) for stages in owned)
        return versions, sizes

    versions_peak: list[int] = []
    bytes_peak: list[int] = []
    for rank, row in enumerate(timeline.events):
        current = dict.fromkeys(owned[rank], 0)
        needed: dict[int, Counter[int]] = {stage: Counter() for stage in owned[rank]}
        seen: dict[tuple[int, int, int], int] = {}
        held = dict.fromkeys(owned[rank], 1)
        most = 1 if owned[rank] else 0
        most_bytes = costs.held_weight_bytes(owned[rank])
        # A tied weight held in several layers counts once in one version (each further version
        # of a stage copies it whole, so more versions keep their copies).
        shared = sum(costs.weight_bytes[stage] for stage in owned[rank]) - most_bytes
        # One rank runs one action at a time, so its events in order are its instants in order.
        for event in row:
            action = event.action
            stage = action.stage
            if action.op is Op.F:
                version = current[stage]
                seen[(event.step, stage, action.microbatch)] = version
                needed[stage][version] += 1
            elif action.op.is_backward:
                version = seen.pop((event.step, stage, action.microbatch), current[stage])
                needed[stage][version] -= 1
                if needed[stage][version] <= 0:
                    del needed[stage][version]
            elif action.op is Op.STEP:
                current[stage] += 1
            else:
                continue
            held[stage] = len(set(needed[stage]) | {current[stage]})
            most = max(most, held[stage])
            most_bytes = max(most_bytes, sum(held[s] * costs.weight_bytes[s] for s in owned[rank]) - shared)
        versions_peak.append(most)
        bytes_peak.append(most_bytes)
    return tuple(versions_peak), tuple(bytes_peak)
