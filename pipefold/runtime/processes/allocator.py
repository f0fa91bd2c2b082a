"""Keep freed CPU memory in the process: glibc's heap as a caching allocator.

Design notes: docs/decisions.md, "CPU heap".
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
