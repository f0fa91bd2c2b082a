"""A W priced slower where something other than W ran between its own I and it on its rank.

    shares = stage_deferred_shares(schedule)   # per stage, the share of its W deferred from its I
    extra = fit_deferred_weight(ratios, stage_deferred_shares(zb_h1))   # the calibration's fit
    factors = stage_deferred_factors(shares, extra)   # per stage, its W's mean factor

`pipefold plan --profile`'s calibration prices each stage's I and W from its "1f1b+split" block,
where every W runs right after its own I (F(k) I(k) W(k)): the output gradients W reads are
still in cache. The orders the planner prices run many W elsewhere: zb-h1's and zb-h2's last
rank after the next micro-batch's I, a dualpipe-v or searched order's cool-down after another
stage's I, zb-v's some after an F or a B. There W reads them back cold. One process, train's
default GPT (fp32 and bf16, 4 and 16 rows, its last stage and a one-block stage; thread CPU),
W over the same round's W right after its own I: 1.04-1.27 after another micro-batch's I,
1.00-1.15 after an F, 1.05-1.25 after a B (the least at 16 rows on the last stage), but 0.96-1.07
where only another W ran between (a cool-down's I(a) I(b) W(a) W(b): W(b)); in 33 calibration
runs the zb-h1 block's last-stage W over the split block's 1.17 (interquartile 1.13-1.22; quiet
host 1.15-1.19) (BENCHMARKS.md, "Does W cost more away from its own I"). I cost the same with 0,
1 or 2 other I states held (0.97-1.09 with no consistent sign), so I takes no such term.

So a W deferred from its own I (an F, a B or another I ran between them on its rank) costs
`1 + extra` times the W the split block measured, `extra` = `ModelCosts.deferred_weight_grad`,
fitted on the calibration's zb-h1 block (its W over the split block's per split stage, the
host's drift taken out, against the share of that stage's W there that were deferred: all of
zb-h1's last stage's). A stage's W is one figure in the simulator's `CostModel`, so it takes the
mean factor over its W in the order. One fraction for every context: the calibration
measures the "after another I" one; after an F it was a few % less. Counted from the rank's
program: the latest action before W(s, m) on its rank that is not a W is I(s, m) or not.

**Not one fraction for every size.** One process again (`benchmarks/w_context.py --rows 1 2 4 8
16`, fp32, thread CPU; BENCHMARKS.md, "A deferred W's extra over rows"), W after another
micro-batch's I over W right after its own, on the last stage (2 blocks, norm, head) 1.16, 1.21,
1.24, 1.18, 1.08 at 1, 2, 4, 8, 16 rows and on a one-block stage 1.08, 1.12, 1.17, 1.28, 1.19: the
fraction rises, then falls, where a stage's W grows past the cache (this CPU: 4 MiB L2 per core).
In seconds the extra stops growing there: 0.97, 1.47, 1.34 ms on the last stage at 4, 8, 16 rows
and 0.95, 1.41 ms on the one-block stage at 8, 16 (W 4.1 to 17.7 ms): what a W right after its I
finds in cache is at most the cache, whatever the rows. So a deferred W costs `extra` of its time
up to at most `most_s` seconds, `ModelCosts.deferred_weight_most_s`: factor `1 + share *
min(extra, most_s / W)` per stage (W: the stage's W seconds at the candidate's rows). The
calibration fits `most_s` from a second zb-h1 block at its second size (twice the rows; its W
over the split block's scaled by the stage's B between the sizes: `fit_deferred_most`). It is
at least `extra` times the first size's W, so sizes up to the calibration's are priced as before,
and 0 (no cap) where the second block's fraction did not fall, or no such block ran (costs
before it price as before). Below the calibration's size the fraction also fell (1.16 and 1.08
at 1 row), which this still over-prices, by well under a millisecond a W. Every factor is >= 1,
so the lower bounds taken on unslowed costs stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipefold.errors import ConfigError
from pipefold.schedule.ir import Op, Schedule

__all__ = ["LARGEST_DEFERRED_WEIGHT", "fit_deferred_most", "fit_deferred_weight", "stage_deferred_factors",
           "stage_deferred_shares"]

LARGEST_DEFERRED_WEIGHT = 0.5
"""The most `fit_deferred_weight` gives: one process measured at most 0.33 (bf16 and fp32, 4 and 16
rows, two stages); of 33 stored calibration runs two read more, both on a loaded host (0.63 with
rank 0 on 48% of a core, the other two calibrations of that run 0.19 and 0.24; 1.63 on 15%): a fit
above this is the host's, not the W's."""


def stage_deferred_shares(schedule: Schedule) -> tuple[float, ...]:
    """Per stage, the share of its W that are deferred: on its rank, an F, a B or another I ran
    between its own I (the same stage and micro-batch) and it; only other W between leave it as
    cheap as right after its I (a cool-down's second W, after a W: 0.96-1.07 of that, one
    process). 0 for a stage without W (its backward one B)."""
    deferred = [0] * schedule.num_stages
    total = [0] * schedule.num_stages
    for program in schedule.actions:
        last_other: tuple[Op, int, int] | None = None  # the latest action on the rank that is not a W
        for action in program:
            if action.op is not Op.W:
                last_other = (action.op, action.stage, action.microbatch)
                continue
            total[action.stage] += 1
            deferred[action.stage] += 0 if last_other == (Op.I, action.stage, action.microbatch) else 1
    return tuple(late / count if count else 0.0 for late, count in zip(deferred, total, strict=True))


def stage_deferred_factors(shares: Sequence[float], extra: float, most_s: float = 0.0,
                           weight_s: Sequence[float] = ()) -> tuple[float, ...]:
    """Per stage, the factor of its W, `1 + share * min(extra, most_s / W)` (`shares`:
    `stage_deferred_shares` of the order; `extra`: `ModelCosts.deferred_weight_grad`; `most_s`:
    `ModelCosts.deferred_weight_most_s`, 0 for no cap; `weight_s`: per stage its W's seconds at
    the candidate's rows, needed with a cap). Never below 1."""
    for name, value in (("deferred_weight_grad", extra), ("deferred_weight_most_s", most_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"deferred W {name} = {value!r}; give a finite number >= 0 (ModelCosts.{name})")
    if most_s <= 0:
        return tuple(1.0 + extra * share for share in shares)
    if len(weight_s) != len(shares):
        raise ConfigError(f"deferred W price: {len(weight_s)} W times for {len(shares)} stages' shares; give "
                          "each stage's W seconds with ModelCosts.deferred_weight_most_s")
    return tuple(1.0 + share * (min(extra, most_s / seconds) if seconds > 0 else extra)
                 for share, seconds in zip(shares, weight_s, strict=True))


def fit_deferred_weight(ratios: Sequence[float], shares: Sequence[float]) -> float:
    """`extra` from a block whose W ran away from their I: per stage, its W over the same stage's
    W in a block that ran each right after its I (`ratios`, the host's drift taken out) and the
    share of its W that did not (`shares`, `stage_deferred_shares` of the block's order). A
    stage's W is the mean of `1 + extra` over its deferred W and 1 over the others, so `ratio - 1
    = extra * share`: least squares through the origin over the stages with a share, kept >= 0
    (a negative fit is noise; a factor below 1 would break the search's lower bounds) and <=
    `LARGEST_DEFERRED_WEIGHT`. 0 where no stage has one."""
    if len(ratios) != len(shares):
        raise ConfigError(f"deferred W fit: {len(ratios)} ratios for {len(shares)} stages' shares; give one "
                          "W ratio per stage of the block")
    for name, values, least in (("ratios", ratios, 0.0), ("shares", shares, 0.0)):
        for value in values:
            if not (math.isfinite(value) and value >= least and (value > 0 or name == "shares")
                    and (value <= 1 or name == "ratios")):
                raise ConfigError(f"deferred W fit: {name} holds {value!r}; give positive W ratios (the "
                                  "block's over the split block's) and shares in [0, 1] "
                                  "(stage_deferred_shares)")
    pairs = [(share, ratio - 1) for share, ratio in zip(shares, ratios, strict=True) if share > 0]
    spread = sum(share * share for share, _ in pairs)
    if spread <= 0:
        return 0.0
    return min(max(sum(share * excess for share, excess in pairs) / spread, 0.0), LARGEST_DEFERRED_WEIGHT)


def fit_deferred_most(extra: float, first_weight_s: Sequence[float], ratios: Sequence[float],
                      shares: Sequence[float], weight_s: Sequence[float]) -> float:
    """`ModelCosts.deferred_weight_most_s`, the most seconds a deferred W costs beyond its time
    right after its I, from a second block at more rows than the one `extra` was fitted on: per
    stage its W over the W right after its I at those rows (`ratios`, the host's drift taken
    out), the share of its W deferred there (`shares`), that reference W's seconds (`weight_s`)
    and the one at the first size (`first_weight_s`). Each stage's extra seconds per deferred W,
    `(ratio - 1) * W / share`, fitted as one figure by least squares through the origin (`ratio
    - 1 = share * most / W`). 0 (no cap) where `extra` is 0 or the second block's fraction did
    not fall below it (the cache not outgrown between the sizes: the fraction prices both);
    else at least `extra` times the first size's W (the same weights), so the first size keeps
    its price."""
    lengths = {len(first_weight_s), len(ratios), len(shares), len(weight_s)}
    if len(lengths) != 1:
        raise ConfigError(f"deferred W cap fit: {len(first_weight_s)} first W times, {len(ratios)} ratios, "
                          f"{len(shares)} shares and {len(weight_s)} W times; give one of each per stage")
    for name, values in (("first_weight_s", first_weight_s), ("weight_s", weight_s)):
        for value in values:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"deferred W cap fit: {name} holds {value!r}; give each stage's W "
                                  "seconds (>= 0)")
    fitted = [(share, ratio, seconds, first) for share, ratio, seconds, first
              in zip(shares, ratios, weight_s, first_weight_s, strict=True) if share > 0 and seconds > 0]
    fraction = fit_deferred_weight([ratio for _, ratio, _, _ in fitted], [share for share, _, _, _ in fitted])
    if extra <= 0 or not fitted or fraction >= extra:
        return 0.0
    spread = sum(share * share for share, _, _, _ in fitted)
    most = sum(share * (ratio - 1) * seconds for share, ratio, seconds, _ in fitted) / spread
    at_first = extra * sum(share * share * first for share, _, _, first in fitted) / spread
    return max(most, at_first)
