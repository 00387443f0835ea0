"""The worker allocator settings: freed arrays are reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter started the way dask's nanny starts a worker, so that the
# thresholds under test are glibc's, not whatever this test process has set.
PROBE = """
import json, resource
import numpy as np

from smd_dist.allocator import reuse_freed_memory

def faults_per_array():
    np.ones(2**19).sum()  # 4 MiB: above glibc's default mmap threshold, below ours
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(2**19).sum()
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
    # A 4 MiB array is 1024 pages: each fresh mapping faults most of them in.
    assert result["default"] > 500
    assert result["tuned"] < 10
