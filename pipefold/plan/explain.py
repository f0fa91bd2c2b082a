"""Why the others lost: one `Verdict` per schedule family, and per value of the chosen family's settings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.degree import Degree, split_text
from pipefold.plan.record import OverMemory, Record
from pipefold.plan.result import Candidate, Verdict, exposed_text
from pipefold.plan.shard_search import layout_subject
from pipefold.plan.space import Config, PlanOptions
from pipefold.plan.units import format_bytes
from pipefold.schedule import names

__all__ = ["family_verdicts", "setting_verdicts", "degree_verdicts", "layout_verdict", "layout_verdicts",
           "nothing_to_search"]

_MAX_VALUES = 8
"""Settings with more values than this list only the chosen value's neighbours and the extremes."""


def _slower(candidate: Candidate, choice: Candidate) -> str:
    ratio = candidate.step_time / choice.step_time - 1 if choice.step_time > 0 else 0.0
    if ratio <= 1e-9:
        return "as fast as the choice; ranked after it by peak memory, then simplicity"
    return f"{ratio:.1%} slower than the choice"


def _over(candidate: Candidate | OverMemory, limit: float) -> str:
    if candidate.rank_limits:
        # A mix of device kinds: the rank furthest over its own devices' memory.
        rank = candidate.tightest_rank(limit)
        own = min(limit, candidate.rank_limits[rank])
        return (
            f"over its devices' memory on rank {rank} by {format_bytes(candidate.over_limit(limit))} "
            f"(needs {format_bytes(candidate.memory[rank].total)} of {format_bytes(own)})"
        )
    rank = candidate.peak_rank
    return (
        f"over the memory limit on rank {rank} by {format_bytes(candidate.over_limit(limit))} "
        f"(needs {format_bytes(candidate.peak_memory)})"
    )


def _bound_text(bound: float, choice: Candidate) -> str:
    ratio = bound / choice.step_time - 1 if choice.step_time > 0 else 0.0
    return f"at least {max(ratio, 0.0):.1%} slower than the choice (lower bound; not simulated)"


def _verdict(
    subject: str, records: Sequence[Record], choice: Candidate, limit: float, *, detail: bool,
    describe: Callable[[Candidate], str] = Candidate.describe,
) -> Verdict:
    """The verdict on a group of configurations (a family, a value of a setting, a dp x pp split)."""
    fits = [c for record in records if (c := record.best(limit)) is not None]
    if any(candidate == choice for candidate in fits):
        return Verdict(subject, "chosen", choice.describe())
    if fits:
        best = min(fits, key=lambda c: (c.step_time, c.peak_memory))
        where = f" ({describe(best)})" if detail else ""
        return Verdict(subject, "slower", _slower(best, choice) + where)
    leanest = [c for record in records if (c := record.leanest()) is not None]
    unsimulated = [o for record in records if (o := record.leanest_unsimulated()) is not None]
    parts = []
    if unsimulated and (not leanest or min(o.peak_memory for o in unsimulated) < min(
            c.peak_memory for c in leanest)):
        parts.append(_over(min(unsimulated, key=lambda o: o.peak_memory), limit)
                     + (" at its leanest (memory from the order; not simulated)" if detail else ""))
    elif leanest:
        worst = min(leanest, key=lambda c: (c.peak_memory, c.step_time))
        where = f" at its leanest simulated ({describe(worst)})" if detail else ""
        parts.append(_over(worst, limit) + where)
    static = [record.static_over for record in records if record.static_over is not None]
    if static:
        rank, excess = min(static, key=lambda item: item[1])
        parts.append(
            f"weights, gradients and optimizer state alone exceed the limit on rank {rank} by "
            f"{format_bytes(excess)}" + (f" in {len(static)} setting(s)" if detail else "")
        )
    skipped = [record.pruned_bound for record in records if record.pruned_bound is not None]
    if skipped:
        # It lost on time whatever its memory: the settings that might fit are provably slower.
        return Verdict(subject, "pruned", "; ".join([_bound_text(min(skipped), choice), *parts]))
    if parts:
        return Verdict(subject, "over-memory", "; ".join(parts))
    return Verdict(subject, "not-applicable", "no configuration was searched")


def layout_verdict(subject: str, records: Sequence[Record], choice: Candidate, limit: float) -> Verdict:
    """The verdict on one data-parallel layout of the choice's configuration
    (`pipefold.plan.shard_search`). For full sharding it says why one free / look-ahead setting
    beats another: how much of the step its gathers leave exposed, and its peak memory."""
    verdict = _verdict(subject, records, choice, limit, detail=False)
    fits = [c for record in records if (c := record.best(limit)) is not None and c.shard == "full"]
    if verdict.status not in ("chosen", "slower") or not fits:
        return verdict
    best = choice if verdict.status == "chosen" else min(fits, key=lambda c: (c.step_time, c.peak_memory))
    return Verdict(subject, verdict.status, (
        f"{verdict.reason}; gathers exposed {exposed_text(best.gather_exposed_s)} of the step "
        f"{best.step_time:.4g} s, peak {format_bytes(best.peak_memory)}"))


def family_verdicts(
    records: Sequence[Record], excluded: dict[str, tuple[str, str]], choice: Candidate, limit: float
) -> tuple[Verdict, ...]:
    """One verdict per registered family, in registry order."""
    verdicts = []
    for name in names():
        if name in excluded:
            status, reason = excluded[name]
            verdicts.append(Verdict(name, status, reason))  # type: ignore[arg-type]
            continue
        group = [record for record in records if record.config.schedule == name]
        verdicts.append(_verdict(name, group, choice, limit, detail=True))
    return tuple(verdicts)


def _with_allreduce(candidate: Candidate) -> str:
    tied = (f" + tied-gradient exchange {candidate.tied_exchange_s:.4g} s" if candidate.tied_exchange_s
            else "")
    if candidate.num_data_parallel == 1:
        return candidate.describe() + (
            f"; step = pipeline {candidate.pipeline_s:.4g} s{tied}" if tied else "")
    return (f"{candidate.describe()}; step = pipeline {candidate.pipeline_s:.4g} s + gradient all-reduce "
            f"{candidate.allreduce_s:.4g} s{tied}")


def degree_verdicts(
    records: Sequence[Record],
    rejected: dict[tuple[int, int, int], str],
    excluded: dict[Degree, dict[str, tuple[str, str]]],
    splits: Sequence[tuple[int, int, int]],
    choice: Candidate,
    limit: float,
    floored: dict[tuple[int, int, int], str] | None = None,
) -> tuple[Verdict, ...]:
    """One verdict per dp x pp x tp split in `splits` (dp, then tp ascending): at its best over every
    family and setting; `floored`: splits refused unsearched, no setting fitting (with why)."""
    verdicts = []
    by_split: dict[tuple[int, int, int], list[Record]] = {}
    for record in records:
        by_split.setdefault(record.degree.split, []).append(record)
    for split in splits:
        subject = split_text(*split)
        if split in rejected:
            verdicts.append(Verdict(subject, "not-applicable", rejected[split]))
            continue
        if floored and split in floored:
            verdicts.append(Verdict(subject, "over-memory", floored[split]))
            continue
        group = by_split.get(split, [])
        if not group:
            reasons = [reason for degree, families in excluded.items() if degree.split == split
                       for _, reason in families.values()]
            why = "; ".join(dict.fromkeys(reasons)) or "no configuration"
            verdicts.append(Verdict(subject, "not-applicable", f"no schedule family applies ({why})"))
            continue
        verdicts.append(_verdict(subject, group, choice, limit, detail=True, describe=_with_allreduce))
    return tuple(verdicts)


def _shown(values: list[int], chosen: int) -> list[int]:
    if len(values) <= _MAX_VALUES:
        return values
    index = values.index(chosen)
    keep = {values[0], values[-1], *values[max(0, index - 2): index + 3]}
    return [value for value in values if value in keep]


def setting_verdicts(
    records: Sequence[Record],
    choice: Candidate,
    limit: float,
    run: Callable[[Record, tuple[int, ...]], Candidate | OverMemory],
    *,
    asynchronous: bool,
    recompute_pinned: bool,
) -> tuple[Verdict, ...]:
    """For the chosen family: each other micro-batch count, stages-per-rank value and recompute choice."""
    same = [record for record in records if record.config.schedule == choice.schedule]
    verdicts = []
    by_m = {r.config.num_microbatches: r for r in same if r.config.num_virtual == choice.num_virtual}
    for m in _shown(sorted(by_m), choice.num_microbatches):
        if m != choice.num_microbatches:
            verdicts.append(_verdict(f"num_microbatches={m}", [by_m[m]], choice, limit, detail=False))
    by_v = {r.config.num_virtual: r for r in same if r.config.num_microbatches == choice.num_microbatches}
    for v in sorted(by_v):
        if v != choice.num_virtual:
            verdicts.append(_verdict(f"num_virtual={v}", [by_v[v]], choice, limit, detail=False))
    chosen = by_m.get(choice.num_microbatches)
    if asynchronous:
        verdicts.append(Verdict(
            "recompute", "not-applicable",
            "the planner runs asynchronous schedules without recompute "
            "(the runtime recomputes them only whole)",
        ))
    elif chosen is not None and not recompute_pinned:
        everything = tuple(range(choice.num_stages))
        for subject, recompute in (("recompute=none", ()), ("recompute=all", everything)):
            if recompute == choice.recompute:
                continue
            other = run(chosen, recompute)
            if isinstance(other, OverMemory) or other.over_limit(limit) > 0:
                verdicts.append(Verdict(subject, "over-memory", _over(other, limit)))
            else:
                verdicts.append(Verdict(subject, "slower", _slower(other, choice)))
    if not math.isinf(limit) or verdicts:
        return tuple(verdicts)
    return ()


def layout_verdicts(records: list[Record], choice: Candidate, limit: float) -> tuple[Verdict, ...]:
    """Where more than one was searched: each data-parallel layout of the choice's configuration."""
    def plain(config: Config) -> Config:
        return replace(config, shard="replicate", free_between=False, gather_lookahead=0)

    chosen = plain(Config(choice.schedule, choice.num_virtual, choice.num_microbatches,
                          choice.microbatch_rows, choice.recompute_attention))
    groups: dict[str, list[Record]] = {}
    for record in records:
        if plain(record.config) == chosen and record.bounds == choice.bounds:
            config = record.config
            subject = layout_subject(config.shard, config.free_between, config.gather_lookahead)
            groups.setdefault(subject, []).append(record)
    if len(groups) < 2:
        return ()
    return tuple(layout_verdict(subject, group, choice, limit) for subject, group in groups.items())


def nothing_to_search(options: PlanOptions, rejected: dict[tuple[int, int, int], str],
                      excluded: dict[Degree, dict[str, tuple[str, str]]]) -> ConfigError:
    """The error when no split can run the batch (`rejected`: why, per split) or no family applies
    at any searched one (`excluded`: per degree, family -> (status, reason))."""
    if not options.searches_degree and not rejected:
        (only,) = excluded.values()
        reasons = "; ".join(f"{name}: {reason}" for name, (_, reason) in only.items())
        return ConfigError(f"nothing to search: no schedule family applies ({reasons})")
    parts = list(rejected.values())
    for degree, families in excluded.items():
        why = "; ".join(dict.fromkeys(reason for _, reason in families.values()))
        parts.append(f"{degree.text}: no schedule family applies ({why})")
    devices = options.num_devices
    where = f"of {devices} devices" if devices is not None else "of the options"
    splits = "dp x pp x tp" if options.searches_tensor_parallel else "dp x pp"
    return ConfigError(
        f"nothing to search: no {splits} split {where} can run this batch "
        f"({'; '.join(parts)}); change num_devices, global_batch or the pins"
    )
