"""Peak resident memory of this process over a window (Linux), without torch.

Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so
each library's step gets its own peak even though both run in one process. Where that
is not possible the process-lifetime peak (getrusage) is returned instead, which is
monotone and therefore an upper bound.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_bytes", "reset_peak_rss"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak window; False where the platform cannot (peaks then span the process)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (or since the process started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
