"""What a stage's time at a micro-batch size is, between the sizes a calibration run measured.

    scales = ((1, 1.31, 1.22), (2, 1.08, 1.05), (4, 0.97, 0.98), (8, 1.0, 1.0), (16, 1.02, 1.01))
    check_row_scales(scales)
    row_scale(scales, 3)      # (1.025, 1.015): halfway between 2 and 4 rows

`pipefold plan --profile` prices a stage's F and B on a line over rows fitted through the sizes
its calibration run measured (`pipefold.plan.stage_line.fit_stage_line`). On a CPU host one line
does not fit a one-row micro-batch and a sixteen-row one alike (per call costs that are not
linear, caches): the line misses the smallest size most, and a search that prefers many small
micro-batches takes that miss for a gain. So the calibration keeps, at each size it measured,
the measured time over the line's (`ModelCosts.row_scales`), and every stage's F (and B, I, W)
at `rows` is the line's times that ratio, linear in rows between two measured sizes and the
nearest size's outside them: the price passes through every measured size and interpolates
between them instead of extrapolating below the smallest.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from pipefold.errors import ConfigError

__all__ = ["check_row_scales", "row_scale"]

RowScales = tuple[tuple[int, float, float], ...]


def check_row_scales(scales: Sequence[object]) -> RowScales:
    """`scales` as (rows, F scale, B scale) triples, refused unless rows are integers >= 1 in
    increasing order and the scales positive finite numbers."""
    checked = []
    for entry in scales:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ConfigError(f"ModelCosts.row_scales entry {entry!r}; give [rows, F scale, B scale]")
        rows, forward, backward = entry
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"ModelCosts.row_scales rows = {rows!r}; give the micro-batch's rows, an "
                              "integer >= 1")
        for name, value in (("F scale", forward), ("B scale", backward)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"ModelCosts.row_scales {name} = {value!r} at {rows} rows; give a positive "
                                  "number (measured time over the line's)")
        checked.append((rows, float(forward), float(backward)))
    if any(b[0] <= a[0] for a, b in zip(checked, checked[1:], strict=False)):
        raise ConfigError(f"ModelCosts.row_scales rows {[entry[0] for entry in checked]}; give each size "
                          "once, in increasing order")
    return tuple(checked)


def row_scale(scales: RowScales, rows: int) -> tuple[float, float]:
    """The F and B scales at `rows`: linear between the two measured sizes around it, the nearest
    measured size's outside them, (1, 1) with none."""
    if not scales:
        return 1.0, 1.0
    sizes = [entry[0] for entry in scales]
    at = bisect.bisect_left(sizes, rows)
    if at == 0:
        return scales[0][1], scales[0][2]
    if at == len(scales):
        return scales[-1][1], scales[-1][2]
    (low, f_low, b_low), (high, f_high, b_high) = scales[at - 1], scales[at]
    share = (rows - low) / (high - low)
    return f_low + share * (f_high - f_low), b_low + share * (b_high - b_low)
