"""The check scripts run end to end (a dry run on CPU: the GPU checks need a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _bench_kernel():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernel", SCRIPTS / "bench_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kernel_prints_ratios_against_the_naive_pair(capsys):
    bench = _bench_kernel()
    bench.main(["--sizes", "24,20x30", "--stimuli", "30,50", "--repeat", "1", "--prepared"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "x" in line and ("latent" in line
            or "permuted" in line or "redundant" in line)]
    assert len(rows) == 2 * 2 * 3  # M x sizes x regimes
    assert "worst ratio: kernel" in out and "prepared" in out
    bench.main(["--small", "--reps", "6", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "15 pairs of 6 reps" in out and "solve on prepared reps" in out


def test_bench_kernel_pairs_centre_like_a_user_and_dead_units_stay_zero():
    bench = _bench_kernel()
    X, Y = bench.make_pair(3, 40, 50, 60, seed=1)
    dead = np.flatnonzero((X == 0).all(axis=0))
    assert dead.size and not np.allclose(X.mean(axis=0)[X.any(axis=0)], 0)
    import smd_dist

    assert bench.naive_pair(X, Y) == pytest.approx(smd_dist.soft_matching(X, Y).cost, rel=1e-9)


@pytest.mark.slow
def test_bench_kernel_wide_table_runs_each_case_in_its_own_process():
    """The wide table end to end on a small size: one row per case, rounds and exact
    entries filled in, and a case that cannot fit in memory is skipped with a message."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_kernel.py"), "--wide", "--sizes", "600x520",
         "--regimes", "1,3", "--stimuli", "60", "--rounds"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("  600x520")]
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
