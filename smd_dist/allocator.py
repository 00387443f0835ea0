"""Allocator settings for worker processes: reuse freed memory instead of faulting it in.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any glibc
malloc threshold also freezes the mmap threshold at its 128 KiB default, so every array
above 128 KiB (a 512-neuron cost matrix is 2 MiB) is mapped afresh, page-faulted in, and
unmapped when freed. A pair task allocates and frees several such arrays; measured here
on one core, that made the kernel 1.4-1.9x slower at 512 neurons (43 ms against 60-84 ms,
8,600 minor page faults per solve against none) and 10-30 % slower over a whole engine run.

:func:`reuse_freed_memory` raises both thresholds with ``mallopt``: blocks up to 32 MiB
(glibc's ceiling for the mmap threshold) come from the heap and are reused, and up to
256 MiB of free heap is kept before it is returned to the system. Larger arrays are still
mapped and returned at once, so a worker's resident memory grows by at most that much.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "reuse_freed_memory"]

#: Blocks below this come from the heap (glibc refuses more than 32 MiB on 64-bit systems).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Free heap kept for reuse before it is returned to the operating system.
TRIM_THRESHOLD_BYTES = 256 * 2**20

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def reuse_freed_memory() -> bool:
    """Set this process's glibc malloc thresholds (once); True when they were applied.

    A no-op returning False where the C library has no ``mallopt`` (macOS, Windows) or
    refuses the values; results do not depend on it, only speed does.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
