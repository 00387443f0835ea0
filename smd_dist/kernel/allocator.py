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

:func:`small_page_empty` allocates the long-lived arrays (each prepared rep) on ordinary
4 KiB pages, in a private mapping of their own. NumPy advises every array from 4 MiB up
for transparent huge pages; on a virtual machine whose balloon reports free memory to the
host (free blocks of huge-page size are what it reports), a fresh huge page costs the host
a fresh 2 MiB. Measured here (a KVM guest with free page reporting), writing 171 MiB of
fresh huge pages took 1.4-3.6 ms per MiB in ten runs of twelve (0.3-0.4 in the other
two), against 0.45-0.53 ms in a private small-page mapping; the kernel was no slower on
small-page reps. The kernel's own temporaries keep NumPy's huge pages (without them it
ran 8 % slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import sys

import numpy as np

__all__ = [
    "HUGE_PAGE_ADVICE_BYTES",
    "MMAP_THRESHOLD_BYTES",
    "TRIM_THRESHOLD_BYTES",
    "reuse_freed_memory",
    "small_page_empty",
]

#: Blocks below this come from the heap (glibc refuses more than 32 MiB on 64-bit systems).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: NumPy advises arrays from this size up for transparent huge pages.
HUGE_PAGE_ADVICE_BYTES = 4 * 2**20
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


def small_page_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised C-ordered float64 array on 4 KiB pages, in its own mapping.

    The mapping is advised against transparent huge pages and unmapped (its memory
    returned to the system) when the array and every view of it are released. Arrays
    below :data:`HUGE_PAGE_ADVICE_BYTES` (which NumPy does not advise for huge pages
    either), and any where ``madvise`` is unavailable (not Linux), come from
    :func:`numpy.empty`.
    """
    shape = tuple(int(n) for n in shape)
    size = math.prod(shape)
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if 8 * size < HUGE_PAGE_ADVICE_BYTES or advice is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(shape)
    # Private: Python's default for an anonymous mapping is shared (shmem), which faults
    # in slower (0.63-0.78 against 0.45-0.53 ms per MiB here) and is reported as shmem.
    pages = mmap.mmap(-1, 8 * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(advice)
    return np.frombuffer(pages, dtype=np.float64, count=size).reshape(shape)
