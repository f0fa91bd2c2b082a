"""Byte sizes people type (`8GiB`, `512 MB`, `1e9`) and print (`7.25 GiB`)."""

from __future__ import annotations

import math
import re

from pipefold.errors import ConfigError

__all__ = ["parse_bytes", "format_bytes", "parse_rate"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_bytes(text: str, *, what: str = "size") -> int:
    """`"8GiB"` -> 8589934592. Decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB) units.

    A bare `G` or `M` is refused rather than guessed: the two readings differ by 7%,
    which is the margin a memory limit is usually about. `what` names the flag or
    field in the error message.
    """
    match = _SIZE_RE.match(text)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what} = {text!r} is not a size; write a number with a unit, e.g. 8GiB (2**30 bytes), "
            f"8GB (10**9 bytes), 512MiB, or plain bytes"
        )
    value = float(match["number"]) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} = {text!r}; give a size greater than 0")
    return int(value)


def parse_rate(text: str, *, what: str = "rate") -> float:
    """A positive finite number such as `1e14` or `312e12` (FLOP/s, bytes/s)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} = {text!r}; give a positive number, e.g. 1e14")
    return value


def format_bytes(num_bytes: float) -> str:
    """Binary units, three significant digits: 1536 -> '1.5 KiB'."""
    if math.isinf(num_bytes):
        return "unlimited"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"
