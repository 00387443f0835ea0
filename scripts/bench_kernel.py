"""Benchmark the exact soft matching kernel against POT's network simplex in the same run.

For each width pair and regime it times ``smd_dist.soft_matching`` (validation, centring,
torch cost block, exact solve, certificate, float64 re-evaluation) and the baseline
``ot.emd2(a, b, ot.dist(X.T, Y.T), numItermax=1e9)`` on the same centred matrices, and prints
both times, their ratio and the agreement of the squared distances. Regimes (M = 2000):

1. shared latent, no neuron correspondence: X = Z A + noise, Y = Z B + noise;
2. permuted copy plus noise: Y = X[:, perm] + noise (resampled columns if widths differ);
3. redundant neurons: columns resampled with replacement from a narrow base plus noise,
   and 10 % dead (all-zero) units on each side.

Wall-clock time is the headline; the CPU-time ratio (process time, all threads) is printed
too because on a shared machine other jobs distort wall clock far more than CPU time. Each
side is run ``--repeat`` times (default 3) on the same matrices, alternating, and its fastest
run counts: on a virtual machine single runs of either vary by ±30 %.

Targets (issue 2): ratio >= 5 at N >= 1024 equal widths on regimes 1-2, >= 1.3 at 2048x4096,
never below 1.0. Nothing is asserted: the script prints, the reader judges.

Usage::

    python scripts/bench_kernel.py            # the full table (several minutes)
    python scripts/bench_kernel.py --quick    # small sizes, seconds
    python scripts/bench_kernel.py --sizes 1024,2048x4096 --regimes 1,2
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import ot

import smd_dist
from smd_dist.kernel.transport import solve

FULL = ["512", "1024", "2048", "4096", "1024x2048", "2048x4096", "1000x1500"]
QUICK = ["128", "256", "512", "256x512", "300x450"]
REGIMES = {1: "shared latent", 2: "permuted copy", 3: "redundant+dead"}


def make_pair(regime: int, m: int, nx: int, ny: int, seed: int = 0):
    """Centred (stimuli, neurons) pair for one benchmark regime."""
    rng = np.random.default_rng(seed)
    if regime == 1:
        Z = rng.standard_normal((m, 64))
        X = Z @ rng.standard_normal((64, nx)) + 0.5 * rng.standard_normal((m, nx))
        Y = Z @ rng.standard_normal((64, ny)) + 0.5 * rng.standard_normal((m, ny))
    elif regime == 2:
        X = rng.standard_normal((m, nx))
        idx = rng.permutation(nx) if nx == ny else rng.integers(0, nx, ny)
        Y = X[:, idx] + 0.3 * rng.standard_normal((m, ny))
    elif regime == 3:
        Z = rng.standard_normal((m, 64))
        base = Z @ rng.standard_normal((64, max(nx, ny) // 4))
        X = base[:, rng.integers(0, base.shape[1], nx)] + 0.1 * rng.standard_normal((m, nx))
        Y = base[:, rng.integers(0, base.shape[1], ny)] + 0.1 * rng.standard_normal((m, ny))
        X[:, rng.random(nx) < 0.1] = 0.0
        Y[:, rng.random(ny) < 0.1] = 0.0
    else:
        raise ValueError(f"unknown regime {regime}")
    return X - X.mean(axis=0), Y - Y.mean(axis=0)


def parse_size(text: str) -> tuple[int, int]:
    a, _, b = text.partition("x")
    return int(a), int(b or a)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--sizes", help="comma-separated N or NxxNy, e.g. 1024,2048x4096")
    parser.add_argument("--regimes", default="1,2,3", help="comma-separated subset of 1,2,3")
    parser.add_argument("--stimuli", type=int, default=2000, help="M (default 2000)")
    parser.add_argument("--method", default="auto", help="force a solver method (diagnostics)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts")
    args = parser.parse_args(argv)

    sizes = args.sizes.split(",") if args.sizes else (QUICK if args.quick else FULL)
    regimes = [int(r) for r in args.regimes.split(",")]
    header = (
        f"{'Nx x Ny':>11} {'regime':>15} {'kernel s':>9} {'emd2 s':>8} {'ratio':>6} "
        f"{'cpu ratio':>9} {'rel diff':>9}  solver"
    )
    print(f"M = {args.stimuli}, method = {args.method}, smd_dist {smd_dist.__version__}")
    print(header)
    print("-" * len(header))
    worst = np.inf
    for size in sizes:
        nx, ny = parse_size(size)
        for regime in regimes:
            X, Y = make_pair(regime, args.stimuli, nx, ny, seed=args.seed)
            t_kernel = c_kernel = t_emd = c_emd = math.inf
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                if args.method == "auto":
                    res = smd_dist.soft_matching(X, Y, device="cpu")
                    cost, solver = res.cost, res.solver
                else:
                    tr = solve(X - X.mean(0), Y - Y.mean(0), device="cpu", method=args.method)
                    cost, solver = tr.cost, tr.solver
                t_kernel = min(t_kernel, time.perf_counter() - t0)
                c_kernel = min(c_kernel, time.process_time() - c0)
                t0, c0 = time.perf_counter(), time.process_time()
                ref = ot.emd2([], [], ot.dist(X.T, Y.T), numItermax=int(1e9))
                t_emd = min(t_emd, time.perf_counter() - t0)
                c_emd = min(c_emd, time.process_time() - c0)
            ratio = t_emd / t_kernel
            worst = min(worst, ratio)
            rel = abs(cost - ref) / max(abs(ref), 1e-300)
            print(
                f"{nx:>5}x{ny:<5} {REGIMES[regime]:>15} {t_kernel:9.3f} {t_emd:8.3f} "
                f"{ratio:6.2f} {c_emd / c_kernel:9.2f} {rel:9.1e}  {solver}",
                flush=True,
            )
    print(f"worst ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
