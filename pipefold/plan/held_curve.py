"""How much slower a layer runs for the activation bytes its rank holds beyond its reference:
a curve through measured points (`ModelCosts.held_curve`; priced by `pipefold.plan.held_cost`).

    curve = fit_held_curve([(9 * MiB, 1.08), (49 * MiB, 1.13), (63 * MiB, 1.12)], [(49 * MiB, 1.05)])
    held_factor(curve, 4.5 * MiB)      # (1.04, ...): halfway from (0, 1) to the first knot

The slowdown of a CPU rank's actions is concave in the bytes it holds: ~9 MiB beyond 1F1B's
(zb-h1's last rank) already gave F +7-11%, GPipe's +48-63 MiB +11-37% (BENCHMARKS.md, "the lean
of v=2 [3,1,1,3] and zb-h2"). A straight line through GPipe's point prices the small excesses at
a fifth of that, so the calibration keeps every point it measures, as `row_scales` keeps every
micro-batch size: linear in bytes between them, monotone, never below 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from pipefold.errors import ConfigError

__all__ = ["HeldCurve", "check_held_curve", "fit_held_curve", "held_factor"]

HeldCurve = tuple[tuple[float, float, float], ...]
"""Knots (bytes held beyond the reference, F factor, B factor), in increasing bytes > 0."""


def check_held_curve(knots: Sequence[object]) -> HeldCurve:
    """`knots` as (bytes beyond, F factor, B factor) triples, refused unless the bytes are finite,
    > 0 and increasing and each factor finite, >= 1 and non-decreasing (a factor below 1 or
    falling with bytes would price a rank faster for holding more and break the lower bounds)."""
    checked: list[tuple[float, float, float]] = []
    for entry in knots:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or any(
                isinstance(value, bool) or not isinstance(value, (int, float)) for value in entry):
            raise ConfigError(f"ModelCosts.held_curve entry {entry!r}; give [bytes beyond the reference, "
                              "F factor, B factor]")
        excess, forward, backward = (float(value) for value in entry)
        if not 0 < excess < math.inf:
            raise ConfigError(f"ModelCosts.held_curve bytes = {excess!r}; give a finite number > 0 (the "
                              "curve starts at (0, 1, 1))")
        for name, value in (("F factor", forward), ("B factor", backward)):
            if not 1 <= value < math.inf:
                raise ConfigError(f"ModelCosts.held_curve {name} = {value!r} at {excess:.0f} bytes; give a "
                                  "finite number >= 1 (holding more never prices an action faster)")
        checked.append((excess, forward, backward))
    for before, after in zip(checked, checked[1:], strict=False):
        if after[0] <= before[0]:
            raise ConfigError(f"ModelCosts.held_curve bytes {[entry[0] for entry in checked]}; give each "
                              "once, in increasing order")
        if after[1] < before[1] or after[2] < before[2]:
            raise ConfigError(f"ModelCosts.held_curve factors {[entry[1:] for entry in checked]}; give "
                              "factors that do not fall as the bytes grow (fit them with fit_held_curve)")
    return tuple(checked)


def held_factor(curve: HeldCurve, excess: float) -> tuple[float, float]:
    """The F and B factors at `excess` bytes beyond the reference: 1 at or below it, linear in
    bytes between (0, 1, 1) and the knots, the last knot's past it. Flat past the last: the
    slowdown grows ever more slowly with the bytes (concave: +9 MiB gave most of +48-63 MiB's),
    so the line through the last two knots would overprice, and the last knot is the whole
    batch's activations on a calibration rank (GPipe's), which only a rank of more layers than
    the calibration's exceeds."""
    if excess <= 0 or not curve:
        return 1.0, 1.0
    at = bisect.bisect_left([knot[0] for knot in curve], excess)
    if at == len(curve):
        return curve[-1][1], curve[-1][2]
    low = (0.0, 1.0, 1.0) if at == 0 else curve[at - 1]
    high = curve[at]
    share = (excess - low[0]) / (high[0] - low[0])
    return low[1] + share * (high[1] - low[1]), low[2] + share * (high[2] - low[2])


def _monotone(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The least-squares non-decreasing fit of (x, y) points (pool adjacent violators), one value
    per distinct x (the points at one x pooled first), in increasing x."""
    grouped: dict[float, list[float]] = {}
    for x, y in points:
        grouped.setdefault(x, []).append(y)
    blocks: list[list[float]] = []  # [sum of y, count, number of distinct x pooled]
    for x in sorted(grouped):
        blocks.append([sum(grouped[x]), float(len(grouped[x])), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, width = blocks.pop()
            blocks[-1] = [blocks[-1][0] + total, blocks[-1][1] + count, blocks[-1][2] + width]
    values = [block[0] / block[1] for block in blocks for _ in range(int(block[2]))]
    return list(zip(sorted(grouped), values, strict=True))


def fit_held_curve(forward_points: Sequence[tuple[float, float]],
                   backward_points: Sequence[tuple[float, float]]) -> HeldCurve:
    """The held curve through measured points: (bytes a stage's rank held beyond its 1F1B run's,
    that stage's F over the 1F1B run's) from every block that held more (`forward_points`), and
    (bytes beyond, B over the run's) from the blocks whose backward is B (`backward_points`:
    GPipe's; a split block's I + W carries the split's own seconds too).

    F: each ratio kept >= 1 (faster while holding more is noise, as a negative slope was), then
    the least-squares non-decreasing fit (`_monotone`): one knot per distinct bytes > 0. B: F's
    shape scaled, `1 + k (F - 1)`, `k` >= 0 the least-squares scale of the B points' excess over
    F's curve at their bytes. B takes F's shape because both slow for one cause, the rank's
    footprint (zb-h2's last rank's backward over zb-h1's grew as its F did, 1.04-1.07 and
    1.02-1.05, from +9 to +17 MiB), and only GPipe measures B alone; a line through GPipe's
    points would price the small excesses' B at a tenth of F's."""
    for name, points in (("forward_points", forward_points), ("backward_points", backward_points)):
        for excess, ratio in points:
            if not (math.isfinite(excess) and math.isfinite(ratio) and ratio > 0):
                raise ConfigError(f"held-memory curve: {name} holds ({excess!r}, {ratio!r}); give "
                                  "(bytes held beyond the 1F1B run's, a positive ratio of times) per "
                                  "measured stage")
    beyond = [(excess, max(ratio, 1.0)) for excess, ratio in forward_points if excess > 0]
    if not beyond:
        raise ConfigError("held-memory curve: no stage held more than in the 1F1B run "
                          f"({list(forward_points)}); measure a block that holds more (gpipe against 1f1b)")
    forward = _monotone(beyond)

    def at(excess: float) -> float:
        return held_factor(tuple((x, f, f) for x, f in forward), excess)[0]

    pairs = [(at(excess) - 1, ratio - 1) for excess, ratio in backward_points if excess > 0]
    spread = sum(f * f for f, _ in pairs)
    scale = max(sum(f * b for f, b in pairs) / spread, 0.0) if spread > 0 else 0.0
    return check_held_curve([(x, f, 1 + scale * (f - 1)) for x, f in forward])
