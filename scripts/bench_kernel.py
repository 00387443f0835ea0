"""Benchmark the exact soft matching kernel against the naive pair a user writes, same run.

The naive pair is what a user writes with NumPy (default threads) and POT: centre both
(stimuli, neurons) arrays, ``C = ot.dist(X.T, Y.T)``, ``ot.emd2([], [], C, numItermax=10**9)``
(a cap that never binds here; a run that hits it is flagged). Against it, on the same raw
arrays:

* ``kernel``: ``smd_dist.soft_matching(X, Y)`` (validation, centring, cost block, exact
  solve, certificate, float64 re-evaluation): one call per pair, as a user calls it;
* ``prepared`` (with ``--prepared``): :func:`smd_dist.kernel.transport.solve` on two
  :class:`~smd_dist.kernel.prepared.PreparedRep` made once beforehand, as the engine calls
  it (each rep prepared once, then compared with many).

Ratios are naive / kernel: above 1 the kernel is faster. Regimes:

1. shared latent, no neuron correspondence: X = Z A + noise, Y = Z B + noise;
2. permuted copy plus noise: Y = X[:, perm] + noise (resampled columns if widths differ);
3. redundant neurons: columns resampled with replacement from a narrow base plus noise,
   and 10 % dead (all-zero) units on each side.

Every live neuron gets a random baseline, so the centring does real work on both sides.
Wall-clock time is the headline; the CPU-time ratio (process time, all threads) is printed
too because on a shared machine other jobs distort wall clock far more than CPU time. The
sides alternate within each of ``--repeat`` rounds (default 3) on the same matrices, and
each side's fastest round counts; a round of a small pair repeats the call until it lasts
about 20 ms.

``--small`` times the many-small-pairs workload of issue 24 instead: reps of 8-32 neurons
and 64 stimuli, all pairs of ``--reps`` of them, per-pair cost of the naive pair, of
``soft_matching_distance`` and of ``solve`` on prepared reps.

``--wide`` prints the scaling table of wide layers instead (issue 22; regimes 1 and 3 by
default, 1024 to 32768 neurons and an MLP against a hidden layer, 16384 x 28672, M = 2000):
no POT baseline there (a dense solve at these widths takes hours and a float64 N x N
matrix), but the floor of the certified approach, one bfloat16 (float32 without native
bfloat16) product X^T Y of the same widths, timed in the same process, alternating with the
kernel. Each case runs in a fresh process, so that its peak resident memory is its own; it
reports the rounds of the sparse solver, the entries whose exact cost it computed, and the
peak memory beside the memory its inputs alone take. A case whose estimated memory exceeds
what the machine has available is skipped with a message.

Targets (issues 2, 21): never below 1.0 at widths 32-4096, M 100-2000, in any regime.
Nothing is asserted: the script prints, the reader judges.

Usage::

    python scripts/bench_kernel.py                 # widths 32-4096, M 100/500/2000 (long)
    python scripts/bench_kernel.py --quick         # a few sizes, about a minute
    python scripts/bench_kernel.py --sizes 1024,2048x4096 --regimes 1,2 --stimuli 2000
    python scripts/bench_kernel.py --sizes 256,512 --stimuli 100,2000 --prepared
    python scripts/bench_kernel.py --small         # many small pairs (issue 24)
    python scripts/bench_kernel.py --wide          # the wide-layer scaling table (many minutes)
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
import warnings

import numpy as np
import ot

import smd_dist
from smd_dist.kernel.prepared import prepare
from smd_dist.kernel.transport import solve

FULL = [
    "32", "64", "128", "256", "512", "1024", "2048", "4096",
    "1024x2048", "2048x4096", "1000x1500",
]
FULL_STIMULI = [100, 500, 2000]
QUICK = ["32", "128", "256", "512", "300x450"]
QUICK_STIMULI = [100, 2000]
WIDE = ["1024", "2048", "4096", "8192", "16384", "16384x28672", "32768"]
REGIMES = {1: "shared latent", 2: "permuted copy", 3: "redundant+dead"}
NAIVE_MAX_ITER = 10**9
#: A timed round of a small pair repeats the call until it lasts about this long (s).
ROUND_SECONDS = 0.02


def make_pair(regime: int, m: int, nx: int, ny: int, seed: int = 0):
    """Raw (stimuli, neurons) pair for one benchmark regime, each neuron with a baseline."""
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
        dead_x, dead_y = rng.random(nx) < 0.1, rng.random(ny) < 0.1
        X += rng.standard_normal(nx)
        Y += rng.standard_normal(ny)
        X[:, dead_x] = 0.0  # dead (ReLU) units: exactly zero, as a network leaves them
        Y[:, dead_y] = 0.0
        return X, Y
    else:
        raise ValueError(f"unknown regime {regime}")
    return X + rng.standard_normal(nx), Y + rng.standard_normal(ny)


def naive_pair(X, Y) -> float:
    """The user's loop body: centre, ``ot.dist``, ``ot.emd2`` with a cap that never binds."""
    Xc = X - X.mean(axis=0)
    Yc = Y - Y.mean(axis=0)
    return ot.emd2([], [], ot.dist(Xc.T, Yc.T), numItermax=NAIVE_MAX_ITER)


def naive_hits_cap(X, Y) -> bool:
    """Whether the naive pair's network simplex stopped at its iteration cap (untimed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        naive_pair(X, Y)
    return any("numItermax" in str(w.message) for w in caught)


def parse_size(text: str) -> tuple[int, int]:
    a, _, b = text.partition("x")
    return int(a), int(b or a)


def timed(fn, inner: int) -> tuple[float, float]:
    """(wall, cpu) seconds per call of ``inner`` calls of ``fn``."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


def race(sides: dict, repeat: int) -> dict:
    """Best (wall, cpu) per call of each side, the sides alternating within each round."""
    inner = {}
    for name, fn in sides.items():  # warm-up, and how many calls make a round
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, math.ceil(ROUND_SECONDS / max(time.perf_counter() - t0, 1e-7)))
    best = {name: (math.inf, math.inf) for name in sides}
    names = list(sides)
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = timed(sides[name], inner[name])
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def kernel_table(args) -> None:
    sizes = args.sizes.split(",") if args.sizes else (QUICK if args.quick else FULL)
    if args.stimuli:
        stimuli = [int(m) for m in args.stimuli.split(",")]
    else:
        stimuli = QUICK_STIMULI if args.quick else FULL_STIMULI
    regimes = [int(r) for r in args.regimes.split(",")]
    header = (
        f"{'M':>5} {'Nx x Ny':>11} {'regime':>15} {'naive s':>9} {'kernel s':>9} "
        f"{'ratio':>6} {'cpu ratio':>9}"
        + (f" {'prepared s':>10} {'ratio':>6}" if args.prepared else "")
        + f" {'rel diff':>9}  solver"
    )
    print(f"method = {args.method}, smd_dist {smd_dist.__version__}, best of {args.repeat}")
    print(header)
    print("-" * len(header))
    worst = {"kernel": math.inf, "prepared": math.inf}
    for m in stimuli:
        for size in sizes:
            nx, ny = parse_size(size)
            for regime in regimes:
                X, Y = make_pair(regime, m, nx, ny, seed=args.seed)
                capped = naive_hits_cap(X, Y)
                ref = naive_pair(X, Y)
                out = {}

                def kernel(X=X, Y=Y, out=out):
                    if args.method == "auto":
                        res = smd_dist.soft_matching(X, Y, device="cpu")
                        out["cost"], out["solver"] = res.cost, res.solver
                    else:
                        tr = solve(X - X.mean(0), Y - Y.mean(0), device="cpu",
                                   method=args.method)
                        out["cost"], out["solver"] = tr.cost, tr.solver

                sides = {"naive": lambda X=X, Y=Y: naive_pair(X, Y), "kernel": kernel}
                if args.prepared:
                    x, y = prepare(X), prepare(Y)
                    sides["prepared"] = lambda x=x, y=y: solve(x, y, device="cpu")
                best = race(sides, args.repeat)
                naive_wall, naive_cpu = best["naive"]
                ratio = naive_wall / best["kernel"][0]
                worst["kernel"] = min(worst["kernel"], ratio)
                line = (
                    f"{m:>5} {nx:>5}x{ny:<5} {REGIMES[regime]:>15} {naive_wall:9.4f} "
                    f"{best['kernel'][0]:9.4f} {ratio:6.2f} {naive_cpu / best['kernel'][1]:9.2f}"
                )
                if args.prepared:
                    p_ratio = naive_wall / best["prepared"][0]
                    worst["prepared"] = min(worst["prepared"], p_ratio)
                    line += f" {best['prepared'][0]:10.4f} {p_ratio:6.2f}"
                rel = abs(out["cost"] - ref) / max(abs(ref), 1e-300)
                flag = "  (naive hit its iteration cap)" if capped else ""
                print(f"{line} {rel:9.1e}  {out['solver']}{flag}", flush=True)
    print(f"worst ratio: kernel {worst['kernel']:.2f}"
          + (f", prepared {worst['prepared']:.2f}" if args.prepared else ""))


def small_pairs(args) -> None:
    """Per-pair cost on many small reps (issue 24: widths 8-32, 64 stimuli)."""
    rng = np.random.default_rng(args.seed)
    reps = [
        rng.standard_normal((64, int(w))) + rng.standard_normal(int(w))
        for w in rng.integers(8, 33, args.reps)
    ]
    pairs = [(i, j) for i in range(len(reps)) for j in range(i + 1, len(reps))]
    prepared = [prepare(r) for r in reps]
    for i, j in pairs[:50]:
        a = naive_pair(reps[i], reps[j])
        b = smd_dist.soft_matching(reps[i], reps[j]).cost
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            raise AssertionError(f"pair {i},{j}: naive {a!r}, kernel {b!r}")

    def run(fn):
        return lambda: [fn(i, j) for i, j in pairs]

    sides = {
        "naive pair": run(lambda i, j: naive_pair(reps[i], reps[j])),
        "soft_matching_distance": run(
            lambda i, j: smd_dist.soft_matching_distance(reps[i], reps[j], device="cpu")
        ),
        "solve on prepared reps": run(
            lambda i, j: solve(prepared[i], prepared[j], device="cpu")
        ),
    }
    best = race(sides, args.repeat)
    print(f"{len(pairs)} pairs of {len(reps)} reps (8-32 neurons, 64 stimuli), "
          f"best of {args.repeat}")
    print(f"{'':>24} {'us/pair':>8} {'cpu us':>7} {'naive/this':>10}")
    for name, (wall, cpu) in best.items():
        print(f"{name:>24} {wall / len(pairs) * 1e6:8.1f} {cpu / len(pairs) * 1e6:7.1f} "
              f"{best['naive pair'][0] / wall:10.2f}")


def wide_table(args) -> None:
    """The wide-layer table: each case in a fresh process (see the module docstring)."""
    import psutil
    import torch

    from smd_dist.kernel.bounds import product_dtype

    sizes = args.sizes.split(",") if args.sizes else WIDE
    regimes = [int(r) for r in (args.regimes if args.regimes != "1,2,3" else "1,3").split(",")]
    dtype = str(product_dtype(torch.device("cpu"))).replace("torch.", "")
    print(
        f"M = {_wide_stimuli(args)}, smd_dist {smd_dist.__version__}, {torch.get_num_threads()} "
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
            need = _wide_memory(_wide_stimuli(args), nx, ny)
            have = psutil.virtual_memory().available
            if need > have:
                print(f"{nx:>5}x{ny:<5} {REGIMES[regime]:>15}  skipped: needs about "
                      f"{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available", flush=True)
                continue
            cmd = [sys.executable, __file__, "--case", f"{nx}x{ny}:{regime}",
                   "--stimuli", str(_wide_stimuli(args)), "--seed", str(args.seed),
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
    X, Y = make_pair(regime, _wide_stimuli(args), nx, ny, seed=args.seed)
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



def _wide_stimuli(args) -> int:
    return int(args.stimuli or 2000)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few sizes only")
    parser.add_argument("--sizes", help="comma-separated N or NxxNy, e.g. 1024,2048x4096")
    parser.add_argument("--regimes", default="1,2,3", help="comma-separated subset of 1,2,3")
    parser.add_argument("--stimuli", help="comma-separated M (default 100,500,2000; "
                        "100,2000 with --quick)")
    parser.add_argument("--method", default="auto", help="force a solver method (diagnostics)")
    parser.add_argument("--prepared", action="store_true",
                        help="also time solve() on reps prepared beforehand (the engine's view)")
    parser.add_argument("--small", action="store_true",
                        help="per-pair cost on many small reps (issue 24) instead")
    parser.add_argument("--reps", type=int, default=60, help="reps for --small (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int,
                        help="rounds per side; the fastest counts (default 3; --wide 1)")
    parser.add_argument("--wide", action="store_true", help="the wide-layer scaling table")
    parser.add_argument("--rounds", action="store_true", help="--wide: print every round")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # --wide: one case, in a child
    args = parser.parse_args(argv)
    if args.case:
        return wide_case(args)
    if args.wide:
        return wide_table(args)
    args.repeat = args.repeat or 3
    if args.small:
        small_pairs(args)
    else:
        kernel_table(args)


if __name__ == "__main__":
    main()
