"""The kernel's memory estimate, against the peak resident memory a solve really adds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smd_dist.kernel.blocked import BLOCKED_MIN_ENTRIES
from smd_dist.kernel.transport import DENSE_BYTES_PER_ENTRY, memory_bytes

PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from smd_dist.kernel import prepared, transport

    def status(key):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(key))

    m, nx, ny = map(int, sys.argv[1:4])
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((m, 8))

    def rep(n):
        return np.tanh(latent @ rng.standard_normal((8, n))) + 0.1 * rng.standard_normal((m, n))

    for warm in ((40, 50), (1100, 1200)):  # first calls load code and thread pools
        transport.solve(*(prepared.prepare(rep(n)) for n in warm))
    X, Y = rep(nx), rep(ny)
    with open("/proc/self/clear_refs", "w") as refs:  # resets the peak (VmHWM) to now
        refs.write("5")
    base = status("VmRSS")
    t = transport.solve(prepared.prepare(X), prepared.prepare(Y))
    print(t.solver, status("VmHWM") - base)
    """
)


def test_wide_pairs_are_planned_for_blocked_bounds_not_a_dense_matrix():
    dense = DENSE_BYTES_PER_ENTRY * 16384**2
    assert memory_bytes(2000, 16384, 16384) < 0.25 * dense
    assert memory_bytes(2000, 16384, 16384) < 2 * 2**30
    assert memory_bytes(100, 2047, 2048) >= DENSE_BYTES_PER_ENTRY * 2047 * 2048
    widths = [[16384, 300], [2048, 2048]]
    assert memory_bytes(10, widths[0], widths[1]).tolist() == [
        memory_bytes(10, 16384, 2048),
        memory_bytes(10, 300, 2048),
    ]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("shape", [(100, 2048, 2100), (200, 1500, 1400), (300, 400, 350)])
def test_the_estimate_covers_the_peak_a_solve_adds(tmp_path, shape):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script), *map(str, shape)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    solver, added = done.stdout.split()
    m, nx, ny = shape
    assert (solver == "sparse-network-simplex") == (nx * ny >= 512 * 512), solver
    assert nx * ny < BLOCKED_MIN_ENTRIES or solver == "sparse-network-simplex"
    assert 0 < int(added) <= memory_bytes(m, nx, ny), (solver, int(added) / 2**20)
