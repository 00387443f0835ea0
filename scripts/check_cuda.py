"""Check the CUDA path on a machine with a GPU, in one run; exit 1 when a check fails.

The test suite runs on CPU; this is the check of the same code on a CUDA device:

1. Precision flags: torch runs float32 products in IEEE float32 by default; the screening
   bounds hold then on data built to break them (every tuning-curve entry rounds the same
   way), and are broken under TF32 (``fp32_precision = "tf32"``), which is why
   :class:`smd_dist.screening.CostBounds` refuses to build under it.
2. The kernel on the engine benchmark's workload (``scripts/bench_engine.py``): every pair
   solved with ``device="cuda"`` and ``device="cpu"``, certificates passed and values
   equal to 1e-9 (relative); then on CUDA again with TF32 switched on, where the solver
   must leave the sparse path and still agree. Seconds of each.
3. The engine: :func:`smd_dist.compute_distances` on the default local cluster with
   ``device="cuda"`` and ``device="cpu"``, matrices compared entry by entry, seconds
   (each worker's first product, which starts its CUDA context, is made and timed first).

With ``--device cpu`` (no GPU) it runs as a dry run of itself: the CUDA-only checks are
skipped and both sides run on the CPU.

Usage: ``python scripts/check_cuda.py [--quick] [--device cuda|cpu]``
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import FULL, QUICK, build_store  # noqa: I001  (sets BLAS threads first)

import numpy as np
import torch

import smd_dist
from smd_dist import screening
from smd_dist.cluster import make_client
from smd_dist.prepare import preprocess
from smd_dist.solvers import solve

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def broken_bounds(device: torch.device) -> int:
    """Entries whose lower bound exceeds the float64 cost, on data whose every entry
    (1 + 2⁻¹² to 1 + 1.4·2⁻¹²) rounds down to 1 at TF32's 10-bit mantissa."""
    rng = np.random.default_rng(0)
    m, n = 256, 64
    X = 1.0 + 2.0**-12 * (1.0 + 0.4 * rng.random((m, n)))
    Y = 1.0 + 2.0**-12 * (1.0 + 0.4 * rng.random((m, n)))
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    exact = ((X[:, :, None] - Y[:, None, :]) ** 2).sum(0)
    real = screening.reduced_float32_matmul
    screening.reduced_float32_matmul = lambda device: None  # build them anyway, to measure
    try:
        bounds = screening.CostBounds(X, Y, norms, device=device, dtype=torch.float32)
    finally:
        screening.reduced_float32_matmul = real
    return int((bounds.lower.double().cpu().numpy() > exact).sum())


def precision_flags(device: torch.device) -> None:
    print("1. float32 product precision", flush=True)
    check(screening.reduced_float32_matmul(device) is None, f"IEEE float32 by default on {device}")
    check(broken_bounds(device) == 0, "no bound broken in IEEE float32")
    if device.type != "cuda":
        print("  (TF32 check skipped: no CUDA device)")
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        broken = broken_bounds(device)
        print(f"  under TF32: {broken} of 4096 bounds broken (this is why they are refused)")
        check(screening.reduced_float32_matmul(device) == "tf32", "TF32 setting recognised")
    finally:
        torch.backends.cuda.matmul.fp32_precision = "ieee"


def solve_all(reps: dict, device: str) -> tuple[dict, float, collections.Counter]:
    values, solvers = {}, collections.Counter()
    names = sorted(reps)
    start = time.perf_counter()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tr = solve(reps[a], reps[b], device=device)
            check_passed = tr.certificate.passed
            if not check_passed:
                FAILURES.append(f"{a} x {b} on {device}: certificate failed")
            values[a, b] = tr.cost
            solvers[tr.solver] += 1
    return values, time.perf_counter() - start, solvers


def compare(label: str, values: dict, reference: dict) -> None:
    worst = max(abs(values[k] - reference[k]) / max(abs(reference[k]), 1e-300) for k in values)
    check(worst <= 1e-9, f"{label}: largest relative difference {worst:.1e} (<= 1e-9)")


def kernel(store, device: torch.device) -> None:
    print("2. kernel, pair by pair", flush=True)
    reps = {r.rep_id: preprocess(store.read(r.model, r.layer)) for r in store.list()}
    solve(*list(reps.values())[:2], device=str(device))  # CUDA context, BLAS warm-up
    on_cpu, t_cpu, s_cpu = solve_all(reps, "cpu")
    on_dev, t_dev, s_dev = solve_all(reps, str(device))
    print(f"  {len(on_cpu)} pairs: cpu {t_cpu:.2f} s, {device} {t_dev:.2f} s "
          f"(x{t_cpu / t_dev:.2f})")
    print(f"  solvers on cpu: {dict(s_cpu)}; on {device}: {dict(s_dev)}")
    compare(f"{device} against cpu", on_dev, on_cpu)
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            on_tf32, t_tf32, s_tf32 = solve_all(reps, str(device))
    finally:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    print(f"  under TF32: {t_tf32:.2f} s, solvers {dict(s_tf32)}, {len(caught)} warnings:")
    print(f"    {caught[0].message if caught else None}")
    check("sparse-network-simplex" not in s_tf32, "no sparse solve under TF32")
    compare("TF32 setting against cpu", on_tf32, on_cpu)


def _first_product_seconds(device: str) -> float:
    """Seconds of a worker's first product on ``device`` (its CUDA context, cuBLAS)."""
    start = time.perf_counter()
    a = torch.ones((64, 64), dtype=torch.float64, device=device)
    float((a @ a).sum())
    return time.perf_counter() - start


def engine(store, device: torch.device, workdir: Path) -> None:
    print("3. engine on the default local cluster", flush=True)
    matrices = []
    for side, dev in enumerate(("cpu", str(device))):
        # A cluster each: workers keep the reps they read, which would favour the second.
        with make_client({"kind": "local", "dashboard-address": ":0"}) as client:
            warm = client.run(_first_product_seconds, dev).values()
            print(f"  device={dev}: first product on a worker took up to {max(warm):.2f} s "
                  "(before the timed run)")
            start = time.perf_counter()
            ds = smd_dist.compute_distances(
                store, output=workdir / f"out-{side}", client=client, progress=False, device=dev
            )
            print(f"  device={dev}: {time.perf_counter() - start:.2f} s", flush=True)
            matrices.append(ds["soft_matching"].values)
    a, b = matrices
    worst = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)))
    check(worst <= 1e-9, f"engine matrices agree: largest relative difference {worst:.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark's small workload")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"smd-dist {smd_dist.__version__}, torch {torch.__version__}, device {name}")
    precision_flags(device)
    spec, n_stimuli = (QUICK, 500) if args.quick else (FULL, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", spec, n_stimuli)
        kernel(store, device)
        engine(store, device, Path(tmp))
    print("all checks passed" if not FAILURES else f"{len(FAILURES)} FAILED: {FAILURES}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
