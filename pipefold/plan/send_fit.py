"""The runtime's time per action and what a send costs its sender, fitted from a calibration run's
gaps between actions.

    gaps = [SendGaps.from_json(phase["send_gaps"]) for phase in measured["phases"]]
    fit = fit_send_costs([(gap, message_bytes) for gap, message_bytes in zip(gaps, sizes)])
    costs = replace(costs, action_overhead_s=fit.action_overhead_s, send_overhead_s=fit.send_overhead_s,
                    send_s_per_byte=fit.send_s_per_byte)

On this CPU host a rank's gap before its next action (less its waits) was ~100 us after an action
whose output went to the other rank with 4-row micro-batches and ~150 us with 8 rows, against
5-60 us after the others (docs/plan.md, "What the one-process profile misprices"). The calibration
run's mean gap over every action (`pipefold.runtime.measured.measured_action_overhead`) spreads
that over all actions alike: right for the calibration's own 1F1B, whose every other action sends,
but not for an order that sends more or less often, nor for micro-batches of other rows. So the
per-action time is the mean gap after actions that sent nothing to another rank, and the send's
occupancy, the gap after one that did less that, is fitted as a line over the message's bytes
across the run's micro-batch sizes (a fixed part and a part per byte, each kept >= 0) by least
relative squares, each size weighted by the gaps it measured. Plain data, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipefold.errors import ConfigError

__all__ = ["SendFit", "SendGaps", "fit_send_costs"]


_FLOOR = 1e-6
"""Seconds below which a block's occupancy weighs as this much (a zero would weigh infinitely)."""


@dataclass(frozen=True)
class SendGaps:
    """One calibration block's mean gaps (`pipefold.runtime.send_gaps.measured_send_gaps`)."""

    sent_s: float
    """Mean gap after an action whose output went to another rank."""
    kept_s: float
    """Mean gap after the other actions."""
    num_sent: int
    num_kept: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SendGaps:
        try:
            gaps = cls(float(data["sent_s"]), float(data["kept_s"]), int(data["num_sent"]),
                       int(data["num_kept"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"calibration send_gaps = {dict(data)!r}: {error}; give sent_s, kept_s, "
                              "num_sent and num_kept (as measured_send_gaps writes them)") from None
        for name in ("sent_s", "kept_s", "num_sent", "num_kept"):
            if not getattr(gaps, name) >= 0:
                raise ConfigError(f"calibration send_gaps {name} = {getattr(gaps, name)!r}; give a "
                                  "number >= 0")
        return gaps


@dataclass(frozen=True)
class SendFit:
    """The fitted costs, and the points they were fitted on."""

    action_overhead_s: float
    """The runtime's seconds per action: the mean gap after actions that sent nothing to another rank."""
    send_overhead_s: float
    """The fixed seconds of a send's occupancy (`ModelCosts.send_overhead_s`)."""
    send_s_per_byte: float
    """Its seconds per byte of the message (`ModelCosts.send_s_per_byte`)."""
    points: tuple[tuple[int, float, int], ...] = ()
    """Per block, (message bytes, measured occupancy: its gap after a send less its other gaps, gaps
    after a send)."""


def fit_send_costs(blocks: Sequence[tuple[SendGaps, int]]) -> SendFit | None:
    """The per-action time and a send's occupancy (fixed + per byte) from each block's gaps and
    the bytes of the messages it sent across ranks. None where no block measured gaps of both
    kinds (one rank: nothing crosses). One byte count (or a line that falls with bytes): the
    occupancy is the blocks' mean (weighted by their gaps after a send), nothing per byte; a line
    whose fixed part would be negative: through zero."""
    used = [(gaps, num_bytes) for gaps, num_bytes in blocks if gaps.num_sent and gaps.num_kept]
    if not used:
        return None
    if any(num_bytes < 0 for _, num_bytes in used):
        raise ConfigError(f"send fit: message bytes {[b for _, b in used]}; give sizes >= 0")
    kept = sum(gaps.kept_s * gaps.num_kept for gaps, _ in used) / sum(gaps.num_kept for gaps, _ in used)
    # Each block's occupancy against its own other gaps: the same minutes of the host.
    points = tuple((num_bytes, max(gaps.sent_s - gaps.kept_s, 0.0), gaps.num_sent)
                   for gaps, num_bytes in used)
    x = np.array([float(num_bytes) for num_bytes, _, _ in points])
    y = np.array([occupancy for _, occupancy, _ in points])
    counts = np.array([float(count) for _, _, count in points])
    mean = float(np.sum(counts * y) / np.sum(counts))
    if len(set(x.tolist())) < 2:
        return SendFit(kept, mean, 0.0, points)
    # Least relative squares, each block weighted by its gaps: a size's relative miss weighs alike
    # whatever its bytes (on a loaded host one large size's gap of ~2 ms, where the others read
    # 70-200 us, would otherwise set the line alone).
    weights = np.sqrt(counts) / np.maximum(y, _FLOOR)
    fixed, slope = (float(v) for v in np.linalg.lstsq(np.stack([weights, weights * x], axis=1), weights * y,
                                                      rcond=None)[0])
    if slope <= 0:
        return SendFit(kept, mean, 0.0, points)
    if fixed < 0:  # through zero: the best slope with no fixed part
        fixed, slope = 0.0, float(np.sum(weights**2 * x * y) / np.sum(weights**2 * x * x))
    return SendFit(kept, fixed, slope, points)
