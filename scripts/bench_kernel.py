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

``--wide`` prints the scaling table of wide layers instead (issue 22; regimes 1 and 3 by
default, 1024 to 32768 neurons and an MLP against a hidden layer, 16384 x 28672): no POT
baseline there (a dense solve at these widths takes hours and a float64 N x N matrix), but
the floor of the certified approach, one bfloat16 (float32 without native bfloat16) product
X^T Y of the same widths, timed in the same process, alternating with the kernel. Each case
runs in a fresh process, so that its peak resident memory is its own; it reports the rounds
of the sparse solver, the entries whose exact cost it computed, and the peak memory beside
the memory its inputs alone take. A case whose estimated memory exceeds what the machine has
available is skipped with a message.

Usage::

    python scripts/bench_kernel.py            # the full table (several minutes)
    python scripts/bench_kernel.py --quick    # small sizes, seconds
    python scripts/bench_kernel.py --sizes 1024,2048x4096 --regimes 1,2
    python scripts/bench_kernel.py --wide     # the wide-layer scaling table (many minutes)
    python scripts/bench_kernel.py --wide --sizes 16384 --regimes 1 --rounds
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time

import numpy as np
import ot

import smd_dist
from smd_dist.kernel.transport import solve

FULL = ["512", "1024", "2048", "4096", "1024x2048", "2048x4096", "1000x1500"]
QUICK = ["128", "256", "512", "256x512", "300x450"]
WIDE = ["1024", "2048", "4096", "8192", "16384", "16384x28672", "32768"]
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
    parser.add_argument("--repeat", type=int, help="runs per side; the fastest counts")
    parser.add_argument("--wide", action="store_true", help="the wide-layer scaling table")
    parser.add_argument("--rounds", action="store_true", help="--wide: print every round")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # --wide: one case, in a child
    args = parser.parse_args(argv)
    if args.case:
        return wide_case(args)
    if args.wide:
        return wide_table(args)
    args.repeat = args.repeat or 3

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


def wide_table(args) -> None:
    """The wide-layer table: each case in a fresh process (see the module docstring)."""
    import psutil
    import torch

    from smd_dist.kernel.bounds import product_dtype

    sizes = args.sizes.split(",") if args.sizes else WIDE
    regimes = [int(r) for r in (args.regimes if args.regimes != "1,2,3" else "1,3").split(",")]
    dtype = str(product_dtype(torch.device("cpu"))).replace("torch.", "")
    print(
        f"M = {args.stimuli}, smd_dist {smd_dist.__version__}, {torch.get_num_threads()} "
        f"threads, product floor in {dtype}; times: best of {args.repeat or 1}, wall (cpu)"
    )
    header = (
        f"{'Nx x Ny':>11} {'regime':>15} {'kernel s':>15} {'product s':>13} {'ratio':>5} "
        f"{'cpu':>5} {'rounds':>6} {'exact':>9} {'/row':>5} {'peak GiB':>8} {'inputs':>6}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        nx, ny = parse_size(size)
        for regime in regimes:
            need = _wide_memory(args.stimuli, nx, ny)
            have = psutil.virtual_memory().available
            if need > have:
                print(f"{nx:>5}x{ny:<5} {REGIMES[regime]:>15}  skipped: needs about "
                      f"{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available", flush=True)
                continue
            cmd = [sys.executable, __file__, "--case", f"{nx}x{ny}:{regime}",
                   "--stimuli", str(args.stimuli), "--seed", str(args.seed),
                   "--repeat", str(args.repeat or 1)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{nx:>5}x{ny:<5} {REGIMES[regime]:>15}  failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{nx:>5}x{ny:<5} {REGIMES[regime]:>15} "
                f"{r['kernel']:6.2f} ({r['kernel_cpu']:6.2f}) "
                f"{r['product']:5.2f} ({r['product_cpu']:5.2f}) "
                f"{r['kernel'] / r['product']:5.2f} {r['kernel_cpu'] / r['product_cpu']:5.2f} "
                f"{r['rounds']:>6} {r['exact']:>9} {r['exact'] / max(nx, ny):5.1f} "
                f"{r['peak'] / 2**30:8.2f} {r['inputs'] / 2**30:6.2f}  {r['solver']}",
                flush=True,
            )
            if args.rounds:
                for k, rd in enumerate(r["history"], start=1):
                    print(f"{'':>12} round {k}: {rd}")


def _wide_memory(m: int, nx: int, ny: int) -> int:
    """Bytes a wide case needs, about: the inputs and their prepared copies in float64,
    bfloat16 copies, 16-bit bounds, and room for the rest."""
    return 2 * 8 * m * (nx + ny) + 2 * m * (nx + ny) + 2 * nx * ny + 2**30


class _Rounds(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if hasattr(record, "sparse_rounds"):
            self.records.append(record)


def wide_case(args) -> None:
    """One case of the wide table, in this (fresh) process: prints one JSON line."""
    import torch

    from smd_dist.kernel.bounds import product_dtype

    (nx, ny), regime = parse_size(args.case.split(":")[0]), int(args.case.split(":")[1])
    X, Y = make_pair(regime, args.stimuli, nx, ny, seed=args.seed)
    inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = product_dtype(torch.device("cpu"))
    # The floor: the product of the low-precision copies, neuron-major as the kernel holds them.
    xl = torch.from_numpy(np.asfortranarray(X).T.astype(np.float32)).to(dtype)
    yl = torch.from_numpy(np.asfortranarray(Y).T.astype(np.float32)).to(dtype)
    smd_dist.soft_matching(X[:, :300], Y[:, :300], device="cpu")  # one-time set-up, not timed
    handler = _Rounds()
    log = logging.getLogger("smd_dist.kernel.sparse")
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    best = {"kernel": math.inf, "kernel_cpu": math.inf, "product": math.inf,
            "product_cpu": math.inf}
    for _ in range(args.repeat or 1):
        t0, c0 = time.perf_counter(), time.process_time()
        del_product = xl @ yl.T
        best["product"] = min(best["product"], time.perf_counter() - t0)
        best["product_cpu"] = min(best["product_cpu"], time.process_time() - c0)
        del del_product
        handler.records.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        res = smd_dist.soft_matching(X, Y, device="cpu")
        best["kernel"] = min(best["kernel"], time.perf_counter() - t0)
        best["kernel_cpu"] = min(best["kernel_cpu"], time.process_time() - c0)
        if not res.certificate.passed:
            raise SystemExit(f"certificate failed: {res.certificate}")
    history = [r.sparse_rounds for r in handler.records]
    rounds = history[-1] if history else []
    print(json.dumps({
        **best,
        "solver": res.solver,
        "rounds": len(rounds),
        "exact": (rounds[-1].candidates + rounds[-1].new) if rounds else 0,
        "history": [
            {"candidates": r.candidates, "flagged": r.flagged, "new": r.new,
             "rows": r.rows, "cols": r.cols}
            for r in rounds
        ],
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "inputs": inputs,
    }))


if __name__ == "__main__":
    main()
