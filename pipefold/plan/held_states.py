"""A rank's F priced slower by the I states it holds: input-gradient backwards whose W has not run.

    counts = forward_state_counts(schedule)   # per stage, the I states held at each of its F
    weights = stage_state_weights(schedule)   # per stage, its F's mean s(n) / s(1)
    slowdown = fit_state_slowdown(ratios, stage_state_weights(zb_h1))   # s(1), the calibration's zb-h1 block
    factors = stage_state_factors(weights, slowdown)   # per stage, its F's mean 1 + s(n)

On a CPU host a zero-bubble rank's F runs slower the more I states it holds (an I keeps its
backward graph and the gradients at its frontier for W): one process, no executor, the last
stage's F ran 1.06-1.08x 1F1B's with none held (each W right after its I), 1.13-1.16x with one
(zb-h1's last rank), 1.19-1.24x with two (zb-h2's), and not in proportion to bytes (holding an F
graph or 10 MB of plain tensors instead left F at 0.98-1.01; BENCHMARKS.md, "Why a zero-bubble F
runs slower than 1F1B's"). The bytes curve (`pipefold.plan.held_curve`) priced that one-state
point as a knot at its bytes, so it also charged orders that hold those bytes in F graphs and no
I state (v=2 without a split), and extrapolated zb-h2's two states by bytes.

So an F on a rank holding n >= 1 I states is priced `1 + s(n)` times its time, `s(n) = s(1) (1 +
(n - 1) / 2)`: the one-process loops' second state added about half the first's (FIW2 over FIW,
1.19-1.24 against 1.13-1.16); `s(1)` is `ModelCosts.held_state_forward`, fitted by `pipefold plan
--profile`'s calibration from its zb-h1 block. A stage's F is one figure in the simulator's
`CostModel`, so it takes the mean of `1 + s(n)` over its F in the order (its total F time is
then priced exactly). F only: I and W are measured per stage by the calibration's split block, and
B holds no I state. Counted from the rank's program: an I(s, m) is held from its end to the
start of its W(s, m); an I directly followed by its W (the runtime runs the pair as one B) holds
none at any F. Every factor is >= 1, so the lower bounds taken on unslowed costs stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipefold.errors import ConfigError
from pipefold.schedule.ir import Op, Schedule

__all__ = ["fit_state_slowdown", "forward_state_counts", "stage_state_factors", "stage_state_weights",
           "state_weight"]

SECOND_STATE_SHARE = 0.5
"""What each I state beyond the first adds, as a share of the first's slowdown (one process:
FIW2 / FIW ~1.05-1.07 where FIW / FIWs ~1.07; BENCHMARKS.md, "Why a zero-bubble F runs slower")."""


def state_weight(num_states: int) -> float:
    """`s(n) / s(1)`: 0 with no I state held, 1 with one, `1 + SECOND_STATE_SHARE (n - 1)` beyond."""
    if num_states < 0:
        raise ConfigError(f"held I states = {num_states}; give a count >= 0")
    return 0.0 if num_states == 0 else 1.0 + SECOND_STATE_SHARE * (num_states - 1)


def forward_state_counts(schedule: Schedule) -> tuple[tuple[int, ...], ...]:
    """Per stage, in its rank's program order, the number of I states that rank holds (I(s', m)
    run, its W(s', m) not yet; any of the rank's stages) when each of the stage's F starts."""
    counts: list[list[int]] = [[] for _ in range(schedule.num_stages)]
    for program in schedule.actions:
        held: set[tuple[int, int]] = set()
        for action in program:
            if action.op is Op.F:
                counts[action.stage].append(len(held))
            elif action.op is Op.I:
                held.add((action.stage, action.microbatch))
            elif action.op is Op.W:
                held.discard((action.stage, action.microbatch))
    return tuple(tuple(stage) for stage in counts)


def _mean_weights(counts: Sequence[Sequence[int]]) -> tuple[float, ...]:
    return tuple(sum(state_weight(n) for n in stage) / len(stage) if stage else 0.0 for stage in counts)


def stage_state_weights(schedule: Schedule) -> tuple[float, ...]:
    """Per stage, the mean over its F of `s(n) / s(1)` (`state_weight` of the I states its rank
    holds there): what the order gives, whatever the costs (so a caller can keep it per order)."""
    return _mean_weights(forward_state_counts(schedule))


def stage_state_factors(weights: Sequence[float], slowdown: float) -> tuple[float, ...]:
    """Per stage, the factor of its F for the I states its rank holds, `1 + s(1) * weight`
    (`weights`: `stage_state_weights` of the order; `slowdown`: `s(1)`, `ModelCosts.held_state_forward`)."""
    if not (math.isfinite(slowdown) and slowdown >= 0):
        raise ConfigError(f"held I-state slowdown = {slowdown!r}; give a finite number >= 0 "
                          "(ModelCosts.held_state_forward)")
    return tuple(1.0 + slowdown * weight for weight in weights)


def fit_state_slowdown(ratios: Sequence[float], weights: Sequence[float]) -> float:
    """`s(1)` from a block whose F held I states: per stage, its F over the same stage's F in a
    block that held none (`ratios`, the host's drift and any bytes factor taken out) and the mean
    `s(n) / s(1)` over its F there (`weights`, `stage_state_weights` of the block's order). A
    stage's ratio is the mean of `1 + s(n)` over its F, so `ratio - 1 = s(1) * weight`: least
    squares through the origin over the stages that held any, kept >= 0 (a negative fit is noise;
    a factor below 1 would break the search's lower bounds). 0 where no stage held one."""
    if len(ratios) != len(weights):
        raise ConfigError(f"held I-state fit: {len(ratios)} ratios for {len(weights)} stages' weights; give "
                          "one F ratio per stage of the block")
    for name, values in (("ratios", ratios), ("weights", weights)):
        for value in values:
            if not (math.isfinite(value) and value >= 0 and (value > 0 or name == "weights")):
                raise ConfigError(f"held I-state fit: {name} holds {value!r}; give positive F ratios (the "
                                  "block's over the 1F1B block's) and weights >= 0 (stage_state_weights)")
    pairs = [(weight, ratio - 1) for weight, ratio in zip(weights, ratios, strict=True) if weight > 0]
    spread = sum(weight * weight for weight, _ in pairs)
    return max(sum(weight * excess for weight, excess in pairs) / spread, 0.0) if spread > 0 else 0.0
