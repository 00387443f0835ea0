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


def test_exact_vs_approximate_writes_its_report(tmp_path):
    out, fig = tmp_path / "report.md", tmp_path / "figures" / "fig.png"
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "exact_vs_approximate.py"), "--quick",
         "--out", str(out), "--figure", str(fig)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    text = out.read_text()
    for regime in ("latent", "permuted", "redundant"):
        assert f"### synthetic: {regime}" in text
    assert "| POT sinkhorn2 reg=0.1 |" in text and "| certified rtol=0.1 |" in text
    assert "intervals miss" not in text  # every certified interval held the exact value
    assert "](figures/fig.png)" in text and fig.stat().st_size > 0
