"""glibc malloc settings for a run: keep freed activation buffers in the heap between
operations, and hand them back to the system after the run.

MLX's CPU backend allocates every array with malloc. By default glibc serves blocks over its
(dynamic) mmap threshold with fresh mmaps and trims the heap top whenever 128 KB+ is free, so
a denoising step of a mid-size model page-faulted ~130,000 times (~530 MB of fresh pages, most
of a second of system time per step on a 2-core machine). With a fixed 32 MB mmap threshold
(glibc's largest) and a high trim threshold the same step faults ~2,000 times. The memory is
not lost: `release()` (malloc_trim) returns what is free once the run ends, so an idle server's
resident memory stays honest. No-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30    # free heap top kept during a run

@functools.cache
def _glibc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def retain() -> bool:
    """Keep freed buffers for reuse (process-wide; idempotent). True if applied."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(lib.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release() -> None:
    """Give the heap's free memory back to the system (after a run, after an unload)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
