"""The worker allocator settings: freed arrays are reused instead of faulted in again, and
long-lived arrays live on small pages."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from smd_dist.kernel.allocator import small_page_empty

# Run in a fresh interpreter started the way dask's nanny starts a worker, so that the
# thresholds under test are glibc's, not whatever this test process has set.
PROBE = """
import json, resource
import numpy as np

from smd_dist.kernel.allocator import reuse_freed_memory

def faults_per_array():
    # 1 MiB: above glibc's default mmap threshold, below ours. Smaller than a huge page,
    # so a fresh mapping of it faults in 4 KiB pages whatever the transparent huge page
    # setting (a 4 MiB mapping faults about 3 times where huge pages are granted).
    np.ones(2**17).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(2**17).sum()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

default = faults_per_array()
applied = reuse_freed_memory()
print(json.dumps({"default": default, "applied": applied, "tuned": faults_per_array()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_arrays_are_reused_under_dasks_trim_threshold():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["applied"] is True
    # A 1 MiB array is 256 pages: each fresh mapping faults most of them in.
    assert result["default"] > 200, result
    assert result["tuned"] < 10, result


def _mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps fields of the mapping that holds ``address`` (None: none)."""
    fields = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                if fields is not None:
                    return fields
                fields = {} if low <= address < high else None
            elif fields is not None:
                fields[head.rstrip(":")] = line.split()[1]
    return fields


def test_small_page_empty_is_a_writable_float64_array():
    out = small_page_empty((3, 5))
    assert out.shape == (3, 5) and out.dtype == np.float64 and out.flags.c_contiguous
    out[...] = np.arange(15.0).reshape(3, 5)
    assert out.sum() == 105.0
    assert small_page_empty((0, 4)).shape == (0, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only")
def test_small_page_empty_maps_its_own_pages_without_huge_pages():
    out = small_page_empty((1024, 1024))  # 8 MiB: NumPy would advise huge pages for it
    out.fill(1.0)
    address = out.__array_interface__["data"][0]
    mapping = _mapping_of(address)
    assert mapping is not None and int(mapping["Rss"]) >= 8 * 1024
    assert mapping.get("THPeligible", "0") == "0"
    assert mapping["AnonHugePages"] == "0"
    view = out.T
    del out
    assert _mapping_of(address) is not None  # a view keeps the pages
    del view
    gc.collect()
    assert _mapping_of(address) is None  # unmapped: the memory went back to the system
