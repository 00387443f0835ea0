"""The check scripts run end to end (a dry run on CPU: the GPU checks need a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.slow
def test_check_cuda_dry_run_passes_on_cpu():
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_cuda.py"), "--quick", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert "FAILED" not in out.stdout


def test_check_cuda_says_when_there_is_no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_cuda.py"), "--quick"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 2 and "--device cpu" in out.stderr


@pytest.mark.slow
def test_bench_kernel_wide_table_runs_each_case_in_its_own_process():
    """The wide table end to end on a small size: one row per case, rounds and exact
    entries filled in, and a case that cannot fit in memory is skipped with a message."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_kernel.py"), "--wide", "--sizes", "300x260",
         "--regimes", "1,3", "--stimuli", "60", "--rounds"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("  300x260")]
    assert len(rows) == 2, out.stdout
    latent = rows[0].replace("(", " ").replace(")", " ").split()
    assert latent[1:3] == ["shared", "latent"] and int(latent[9]) >= 1 and int(latent[10]) > 0
    assert "round 1:" in out.stdout and "failed" not in out.stdout
    huge = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_kernel.py"), "--wide", "--sizes", "2000000",
         "--regimes", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert huge.returncode == 0 and "skipped: needs about" in huge.stdout
