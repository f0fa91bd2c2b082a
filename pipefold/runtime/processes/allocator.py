"""Keep freed CPU memory in the process: glibc's heap as a caching allocator.

[Note: CPU heap]
A pipeline step allocates and frees the same activation and gradient buffers over and
over. glibc serves blocks above `M_MMAP_THRESHOLD` (128 KiB at start, adapting upwards)
with a fresh mmap and returns them to the kernel on free, and trims the top of the heap
above `M_TRIM_THRESHOLD`; the next allocation then page-faults the memory in again, a
few thousand minor faults per micro-batch for a small transformer stage. CUDA's caching
allocator exists for the same reason. `keep_freed_memory` raises both thresholds, so
freed blocks stay in the heap and are reused: the process keeps its peak heap instead
of returning it between micro-batches. It is process-wide and applies only to glibc
(elsewhere it does nothing and says so).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger
# blocks still come from mmap, which is what a huge one-off buffer should do anyway.
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 62

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse; True if it took effect (idempotent)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.info("not glibc: the CPU allocator's thresholds are left as they are")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(_TRIM_THRESHOLD, 2**31 - 1)))
        mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX))
    except (OSError, AttributeError) as error:
        logger.info("mallopt is not available (%s): the CPU allocator is left as it is", error)
        return False
    _applied = bool(trim) and bool(mmap)
    return _applied
