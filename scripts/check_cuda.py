"""Check the CUDA path on a machine with a GPU, in one run; exit 1 when a check fails.

The test suite runs on CPU; this is the check of the same code on a CUDA device:

1. Precision flags: torch runs float32 products in IEEE float32 by default; the screening
   bounds hold then on data built to break them (every tuning-curve entry rounds the same
   way), and are broken under TF32 (``fp32_precision = "tf32"``), which is why
   :class:`smd_dist.kernel.bounds.CostBounds` refuses to build under it.
2. The kernel on the engine benchmark's workload (``scripts/bench_engine.py``): every pair
   solved with ``device="cuda"`` and ``device="cpu"``, certificates passed and values
   equal to 1e-9 (relative); then on CUDA again with TF32 switched on, where the solver
   must leave the sparse path and still agree. Seconds of each.
3. The engine: :func:`smd_dist.compute_distances` on local clusters (the default layout,
   or ``--layouts``) with ``device="cuda"`` and ``device="cpu"``, matrices compared entry
   by entry, seconds (each worker's first product, which starts its CUDA context, is made
   and timed first).

With ``--device cpu`` (no GPU) it runs as a dry run of itself: the CUDA-only checks are
skipped and both sides run on the CPU.

Usage: ``python scripts/check_cuda.py [--quick] [--device cuda|cpu] [--layouts default,1x16]
[--repeat N]``
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import build_store, workload  # noqa: I001  (sets BLAS threads first)

import numpy as np
import torch

import smd_dist
from smd_dist.engine.clusters import default_layout, make_client
from smd_dist.kernel import bounds as screening
from smd_dist.kernel.prepared import prepare
from smd_dist.kernel.transport import solve

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


@contextlib.contextmanager
def tf32():
    """CUDA float32 products in TF32 inside, the previous setting restored after."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def precision_flags(device: torch.device) -> None:
    print("1. float32 product precision", flush=True)
    check(screening.reduced_float32_matmul(device) is None, f"IEEE float32 by default on {device}")
    check(broken_bounds(device) == 0, "no bound broken in IEEE float32")
    if device.type != "cuda":
        print("  (TF32 check skipped: no CUDA device)")
        return
    with tf32():
        broken = broken_bounds(device)
        print(f"  under TF32: {broken} of 4096 bounds broken (this is why they are refused)")
        check(screening.reduced_float32_matmul(device) == "tf32", "TF32 setting recognised")


def solve_all(reps: dict, device: str) -> tuple[dict, float, collections.Counter]:
    values, solvers = {}, collections.Counter()
    names = sorted(reps)
    start = time.perf_counter()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tr = solve(reps[a], reps[b], device=device)
            if not tr.certificate.passed:
                FAILURES.append(f"{a} x {b} on {device}: certificate failed")
            values[a, b] = tr.cost
            solvers[tr.solver] += 1
    return values, time.perf_counter() - start, solvers


def compare(label: str, values: dict, reference: dict) -> None:
    worst = max(abs(values[k] - reference[k]) / max(abs(reference[k]), 1e-300) for k in values)
    check(worst <= 1e-9, f"{label}: largest relative difference {worst:.1e} (<= 1e-9)")


def kernel(store, device: torch.device) -> None:
    print("2. kernel, pair by pair", flush=True)
    reps = {r.rep_id: prepare(store.read(r.model, r.layer)) for r in store.list()}
    solve(*list(reps.values())[:2], device=str(device))  # CUDA context, BLAS warm-up
    on_cpu, t_cpu, s_cpu = solve_all(reps, "cpu")
    on_dev, t_dev, s_dev = solve_all(reps, str(device))
    print(
        f"  {len(on_cpu)} pairs: cpu {t_cpu:.2f} s, {device} {t_dev:.2f} s (x{t_cpu / t_dev:.2f})"
    )
    print(f"  solvers on cpu: {dict(s_cpu)}; on {device}: {dict(s_dev)}")
    compare(f"{device} against cpu", on_dev, on_cpu)
    if device.type != "cuda":
        return
    with tf32(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        on_tf32, t_tf32, s_tf32 = solve_all(reps, str(device))
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


def _engine_run(store, dev: str, layout, output: Path):
    """Seconds of one engine run on a fresh local cluster, its matrix, and the slowest
    worker's first product on ``dev`` (made before the timed run)."""
    cluster = {"kind": "local", "dashboard-address": ":0"}
    if layout is not None:
        cluster |= {"n-workers": layout[0], "threads-per-worker": layout[1]}
    # A cluster each: workers keep the reps they read, which would favour later runs.
    with make_client(cluster, quiet=True) as client:
        warm = max(client.run(_first_product_seconds, dev).values())
        start = time.perf_counter()
        ds = smd_dist.compute_distances(
            store, output=output, client=client, progress=False, device=dev
        )
        return time.perf_counter() - start, ds["soft_matching"].values, warm


def engine(store, device: torch.device, workdir: Path, *, layouts, repeat: int) -> None:
    default = "x".join(map(str, default_layout(os.cpu_count() or 1)))
    print(f"3. engine on local clusters (processes x threads; default {default})", flush=True)
    runs = [(layout, dev) for layout in layouts for dev in ("cpu", str(device))]
    best, reference, worst = {}, None, 0.0
    for n, (layout, dev) in enumerate(runs * repeat):  # round-robin: slow spells hit all
        seconds, matrix, warm = _engine_run(store, dev, layout, workdir / f"out-{n}")
        best[layout, dev] = min(best.get((layout, dev), (math.inf, 0.0)), (seconds, warm))
        reference = matrix if reference is None else reference
        differs = np.abs(matrix - reference) / np.maximum(np.abs(reference), 1e-300)
        worst = max(worst, float(differs.max()))
    for (layout, dev), (seconds, warm) in best.items():
        name = "default" if layout is None else f"{layout[0]}x{layout[1]}"
        print(
            f"  {name:>8} {dev:>6}: {seconds:6.2f} s  (first product on a worker: "
            f"{warm:.2f} s, before the timed run)"
        )
    check(
        worst <= 1e-9,
        f"{len(runs) * repeat} engine matrices agree: largest relative difference {worst:.1e}",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark's small workload")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument(
        "--layouts",
        default="default",
        help="engine layouts to time, e.g. default,8x2,1x16 (processes x threads)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="engine runs per layout (best)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"smd-dist {smd_dist.__version__}, torch {torch.__version__}, device {name}")
    precision_flags(device)
    spec, n_stimuli = workload(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", spec, n_stimuli)
        kernel(store, device)
        layouts = [
            None if item == "default" else tuple(int(n) for n in item.split("x"))
            for item in args.layouts.split(",")
        ]
        engine(store, device, Path(tmp), layouts=layouts, repeat=args.repeat)
    print("all checks passed" if not FAILURES else f"{len(FAILURES)} FAILED: {FAILURES}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
