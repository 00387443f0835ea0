"""Benchmark the all-pairs engine against the loop a user would write.

**The user's view** (printed first): every measurement is a fresh Python process, timed
from its start to its exit, as a user meets it. The loop is a script that imports NumPy and
POT, reads every rep once and, for each pair, centres both, builds the cost with
``ot.dist`` and solves with ``ot.emd2`` (a cap that never binds), NumPy with its default
threads; the engine is a script calling ``smd_dist.compute_distances(store, output=...)``
with the default cluster (``kind: local``; started, used and closed inside the call).
Their environments drop ``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE`` and the thread caps
this script sets for itself. Workloads:

(A) 16 reps, widths 256-2048, M = 2000 (120 pairs; the regimes of
    :mod:`smd_dist.demo.workloads`);
(B) 80 reps, widths 32-512, M = 500 (3160 pairs);
(C) many small pairs: 300 reps of width 32, M = 100 (44,850 pairs);
(D) 1000 small reps, widths 8-32, M = 64 (499,500 pairs).

For each: the loop's and the engine's seconds and their ratio, the engine's phases (imports,
reading and checking the reps, the pairs, assembling and writing the output, the rest:
setting up, starting and closing the cluster), the worker time outside the metric per pair
(scheduling, reading, bookkeeping) at the engine's threads, the driver's peak memory
(``VmHWM``), and the largest relative difference between the two (values must agree to
1e-9). For (D), also a resumed run with every pair done (a fresh process) and
``smd-dist status`` on the output. ``--memory-curve`` prints the driver's peak memory at
100, 300, 1000 and 2000 reps of (D)'s kind.

**Detail** (``--detail``; workload A) — measured in this process:

(a) naive loop — for each pair: read both reps, centre, ``ot.dist``, ``ot.emd2`` with a cap
    high enough to be exact, one pair after another;
(b) this engine on its own local cluster of worker processes
    (:func:`smd_dist.engine.clusters.make_client`) with one single-threaded worker process,
    with the default process layout (:func:`smd_dist.engine.clusters.default_layout`: one
    process per two cores, its two threads sharing the reps it reads), with one
    single-threaded process per core and with one process whose threads fill the cores,
    each where it differs from the default (cluster start-up excluded, reading and
    preparing the reps included);
(c) the limit — per pair, the fastest exact solve available for it (``ot.emd2``, scipy's
    ``linear_sum_assignment`` where widths allow, this package's kernel), each timed alone
    on a precomputed cost, plus one float32 cross product; summed and divided by the cores.
    The kernel is timed on fresh arrays, so it pays per pair for what the engine does once
    per rep (a neuron-major copy, norms, the low-precision copy); the limit is also printed
    with the kernel timed as the engine runs it (prepared reps, second solve of the pair);
(d) the engine's worker code without Dask — the same blocks, largest first, on a process
    pool of one process and of one per core, each process keeping the reps it reads. Its
    parallel efficiency is what the machine itself gives this work (memory traffic, fresh
    pages, reads), the ceiling for the engine's; (b) against (d) is what Dask costs.

It prints the times, the ratios (a)/(b), (b)/(c), each multi-core layout's parallel
efficiency next to (d)'s, the per-pair scheduling overhead, the workers' reading, the
values' agreement with (a), and peak worker memory. With ``--repeat N`` every measurement
runs N times round-robin and keeps its fastest ((c): each pair's fastest time of each
solver), so a slow spell of a shared machine hits all of them alike.

Usage: ``python scripts/bench_engine.py [--workloads A,B,C,D] [--repeat N] [--detail]
[--memory-curve] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

import smd_dist
from smd_dist.demo import workloads
from smd_dist.engine import RunReport
from smd_dist.engine.clusters import default_layout
from smd_dist.kernel.prepared import prepare
from smd_dist.kernel.transport import solve
from smd_dist.store import ActivationStore

torch.set_num_threads(1)

FULL = [
    ("latent", 256),
    ("latent", 512),
    ("latent", 1024),
    ("latent", 2048),
    ("permuted", 256),
    ("permuted", 512),
    ("permuted", 1024),
    ("permuted", 256),
    ("redundant", 256),
    ("redundant", 512),
    ("redundant", 1024),
    ("redundant", 2048),
    ("latent", 256),
    ("permuted", 512),
    ("redundant", 256),
    ("latent", 512),
]
PREPARED = "kernel (prepared)"
QUICK = [
    ("latent", 128),
    ("permuted", 128),
    ("redundant", 256),
    ("latent", 256),
    ("permuted", 256),
    ("redundant", 128),
]


def workload(quick: bool) -> tuple[list, int]:
    """The reps to build, ``(regime, width)`` each, and the stimulus count (``--quick``'s
    small workload or the full one)."""
    return (QUICK, 500) if quick else (FULL, 2000)


def build_store(path: Path, spec, n_stimuli: int) -> ActivationStore:
    """One family of reps per regime (shared structure within a regime)."""
    store = ActivationStore(path, mode="w")
    for regime in workloads.REGIMES:
        members = [(k, w) for k, (r, w) in enumerate(spec) if r == regime]
        arrays = workloads.family(regime, [w for _, w in members], n_stimuli=n_stimuli, seed=7)
        for (k, width), x in zip(members, arrays, strict=True):
            store.write(f"{regime}-{k}", f"w{width}", x.astype(np.float32))
    return store


def naive_loop(store: ActivationStore) -> tuple[dict, float]:
    records = store.list()
    values = {}
    start = time.perf_counter()
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            x = store.read(a.model, a.layer).astype(np.float64)
            y = store.read(b.model, b.layer).astype(np.float64)
            x -= x.mean(0)
            y -= y.mean(0)
            cost = ot.dist(x.T, y.T)
            wa = np.full(x.shape[1], 1 / x.shape[1])
            wb = np.full(y.shape[1], 1 / y.shape[1])
            values[(a.rep_id, b.rep_id)] = math.sqrt(
                max(ot.emd2(wa, wb, cost, numItermax=10**9), 0)
            )
    return values, time.perf_counter() - start


def solver_times(store: ActivationStore) -> dict:
    """Per pair: seconds of each exact solver on a precomputed cost, and of one float32
    cross product (for the limit (c)); ``"kernel (prepared)"`` is the kernel as the engine
    runs it, not one of the solvers (c) chooses from."""
    records = store.list()
    arrays, prepared = {}, {}
    for r in records:
        read = store.read(r.model, r.layer)
        x = read.astype(np.float64)
        arrays[r.rep_id] = x - x.mean(0)
        prepared[r.rep_id] = prepare(read)
    out = {}
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            x, y = arrays[a.rep_id], arrays[b.rep_id]
            t0 = time.perf_counter()
            torch.from_numpy(x.astype(np.float32)).T @ torch.from_numpy(y.astype(np.float32))
            product = time.perf_counter() - t0
            cost = ot.dist(x.T, y.T)
            times = {}
            t0 = time.perf_counter()
            ot.emd2(
                np.full(x.shape[1], 1 / x.shape[1]),
                np.full(y.shape[1], 1 / y.shape[1]),
                cost,
                numItermax=10**9,
            )
            times["emd2"] = time.perf_counter() - t0
            if x.shape[1] == y.shape[1]:
                t0 = time.perf_counter()
                linear_sum_assignment(cost)
                times["lsa"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            smd_dist.soft_matching(x, y, center=False)
            times["kernel"] = max(time.perf_counter() - t0 - product, 0.0)
            xa, xb = prepared[a.rep_id], prepared[b.rep_id]
            solve(xa, xb)  # the per-rep quantities, which the engine computes once per rep
            t0 = time.perf_counter()
            solve(xa, xb)
            times[PREPARED] = max(time.perf_counter() - t0 - product, 0.0)
            out[(a.rep_id, b.rep_id)] = (product, times)
    return out


def limit(timings: list[dict], cores: int, *, prepared: bool = False) -> tuple[float, dict]:
    """Σ over pairs of (fastest exact solve + one float32 product) / cores, each time the
    least over the runs in ``timings``; with ``prepared``, the kernel as the engine runs it."""
    total, wins = 0.0, {}
    for pair in timings[0]:
        product = min(t[pair][0] for t in timings)
        times = {name: min(t[pair][1][name] for t in timings) for name in timings[0][pair][1]}
        times.pop("kernel" if prepared else PREPARED)
        best = min(times, key=times.get)
        wins[best] = wins.get(best, 0) + 1
        total += times[best] + product
    return total / cores, wins


def run_engine(store: ActivationStore, output: Path, *, n_workers: int, threads: int):
    """The engine as a user gets it: the package's own local cluster, ``n_workers`` worker
    processes with ``threads`` task threads each.

    Returns the dataset, the seconds of the call, peak worker memory (the largest process),
    the run report and the workers' seconds spent reading and preparing reps.
    """
    from smd_dist.engine import worker_cache
    from smd_dist.engine.clusters import make_client

    cluster = {
        "kind": "local",
        "n-workers": n_workers,
        "threads-per-worker": threads,
        "memory-limit": f"{8 * threads}GB",
    }
    with make_client({**cluster, "dashboard-address": ":0"}, quiet=True) as client:
        report = RunReport(0, 0, 0)
        start = time.perf_counter()
        ds = smd_dist.compute_distances(
            store, output=output, client=client, progress=False, report=report
        )
        seconds = time.perf_counter() - start
        peak = max(client.run(_peak_rss).values())
        reading = sum(s["seconds_making"] for s in client.run(worker_cache.stats).values())
    return ds, seconds, peak, report, reading


_POOL_BARRIER = None


def _pool_init(barrier) -> None:
    global _POOL_BARRIER
    _POOL_BARRIER = barrier


def _pool_ready(_) -> int:
    # A process that took one waits here for the others, so each takes exactly one (a
    # fixed sleep was not enough: the first spawned process could finish two before the
    # second had started).
    _POOL_BARRIER.wait(timeout=300)
    return os.getpid()


def _run_task(a, b, sources, specs):
    from smd_dist.engine import tasks

    return tasks.compare_block(a, b, sources, specs, None, tasks.KEEP_PREPARED_FRACTION)


def without_dask(store: ActivationStore, *, processes: int) -> tuple[dict, float]:
    """The engine's own worker code with no Dask: the same blocks, largest first, handed to
    ``processes`` spawned processes by :class:`concurrent.futures.ProcessPoolExecutor`;
    each process keeps the reps it prepares (read on first use). Pool start-up excluded.

    Its parallel efficiency is what this machine gives the engine's work when nothing
    schedules it but a queue: the ceiling for the engine's.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from smd_dist.engine import run, selection, settings

    chosen = store.list()
    metrics = selection.resolve_metrics(("soft_matching",))
    specs = selection.metric_specs(metrics, {"center": True, "normalize": None})
    sources = run._sources(store, chosen, sorted({prep for _, prep, _ in specs}))
    a, b = np.triu_indices(len(chosen), 1)
    blocks = run._plan(chosen, a, b, settings.engine_settings(), processes)
    values = {}
    context = get_context("spawn")
    with ProcessPoolExecutor(
        processes,
        mp_context=context,
        initializer=_pool_init,
        initargs=(context.Barrier(processes),),
    ) as pool:
        pids = set(pool.map(_pool_ready, range(processes)))
        assert len(pids) == processes, pids
        start = time.perf_counter()
        futures = {
            pool.submit(
                _run_task, block.a, block.b, {int(i): sources[i] for i in block.reps}, specs
            ): block
            for block in blocks
        }
        for future in as_completed(futures):
            block, result = futures[future], future.result()
            if (result.error >= 0).any():
                raise RuntimeError(result.errors)
            for i, j, value in zip(block.a, block.b, result.num[:, 0, 0], strict=True):
                pair = tuple(sorted((chosen[i].rep_id, chosen[j].rep_id)))
                values[pair] = value
        seconds = time.perf_counter() - start
    return values, seconds


def _layout_label(n_workers: int, threads: int) -> str:
    processes = f"{n_workers} worker process" + ("es" if n_workers > 1 else "")
    return f"{processes} x {threads} thread" + ("s" if threads > 1 else "")


def _summary(label, run, *, t1, cores, n_pairs, lim, lim_prepared, bare) -> None:
    """Efficiency, overhead, reading and (b)/(c) of one multi-core layout's run."""
    ds, seconds, _, report, reading = run
    kernel_total = float(np.nansum(np.triu(ds["soft_matching_seconds"].values, 1)))
    print(f"-- {label}:")
    print(
        f"  parallel efficiency ({cores} cores): {t1 / (cores * seconds):.2f}; "
        f"time against (d) with {cores} processes: {seconds / bare:.2f}"
    )
    worker_time = cores * (report.seconds_inputs + report.seconds_pairs)
    overhead = worker_time - kernel_total - reading
    print(
        f"  scheduling overhead per pair: {overhead / n_pairs * 1e3:.1f} ms "
        f"({100 * overhead / worker_time:.1f} % of worker time: neither in a kernel nor "
        "reading a rep)"
    )
    print(
        f"  workers reading + preparing reps {reading:.2f} s (each worker process prepares "
        f"each rep it meets once); before the first pair {report.seconds_inputs:.2f} s, "
        f"assembling + writing the matrix {report.seconds_finish:.2f} s; all non-kernel "
        f"time {(cores * seconds - kernel_total) / n_pairs * 1e3:.1f} ms per pair "
        f"({100 * (cores * seconds - kernel_total) / (cores * seconds):.1f} %)"
    )
    print(
        f"  (b) / (c): {seconds / lim:.2f}   (against the limit with the kernel on "
        f"prepared reps: {seconds / lim_prepared:.2f})"
    )


def _peak_rss() -> int:
    """This process's peak resident memory in bytes.

    ``VmHWM`` where Linux has it: ``ru_maxrss`` survives ``execve``, so a worker spawned
    (fork, exec) by a large parent starts at the parent's size; in this script that parent
    holds every rep for (c), and worker peaks read 1.1-1.2 GiB whatever the workers did.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _faster(best, run):
    """The faster of two outcomes whose element 1 is seconds (``best`` may be None)."""
    return run if best is None or run[1] < best[1] else best


def detail(args) -> None:
    """The breakdown (a)-(d) on workload A, measured in this process."""
    spec, n_stimuli = workload(args.quick)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = build_store(tmp / "store", spec, n_stimuli)
        n_pairs = len(spec) * (len(spec) - 1) // 2
        print(
            f"workload: {len(spec)} reps, widths {sorted({w for _, w in spec})}, "
            f"M = {n_stimuli}, {n_pairs} pairs, {cores} cores"
        )
        # Round-robin, so that a slow spell of a shared machine hits every measurement
        # alike rather than one of them.
        layouts = {"one": (1, 1), "default": default_layout(cores)}
        for name, layout in (("processes", (cores, 1)), ("threads", (1, cores))):
            if layout not in layouts.values():
                layouts[name] = layout
        runs = dict.fromkeys(layouts)
        naive = None
        bare: dict[int, tuple] = {}
        timings = []
        for k in range(max(1, args.repeat)):
            for name, (n_workers, threads) in layouts.items():
                out = tmp / f"out-{name}-{k}"
                run = run_engine(store, out, n_workers=n_workers, threads=threads)
                runs[name] = _faster(runs[name], run)
            for n in sorted({1, cores}):
                bare[n] = _faster(bare.get(n), without_dask(store, processes=n))
            timings.append(solver_times(store))
            if not args.skip_naive:
                naive = _faster(naive, naive_loop(store))
        lim, wins = limit(timings, cores)
        lim_prepared, wins_prepared = limit(timings, cores, prepared=True)
        t1 = runs["one"][1]
        for name, (n_workers, threads) in layouts.items():
            _, seconds, peak, _, _ = runs[name]
            label = _layout_label(n_workers, threads) + (
                " (the default layout)" if name == "default" else ""
            )
            print(
                f"(b) engine, {label:<60s}: {seconds:7.2f} s   peak worker RSS "
                f"{peak / 2**20:6.0f} MiB"
            )
        ceiling = bare[1][1] / (cores * bare[cores][1])
        print(
            f"(d) the engine's worker code without Dask (a process pool, same tasks): "
            f"1 process {bare[1][1]:.2f} s, {cores} processes {bare[cores][1]:.2f} s: parallel "
            f"efficiency {ceiling:.2f}, what this machine gives this work"
        )
        print(f"(c) limit: {lim:.2f} s   fastest solver per pair: {wins}")
        print(
            f"    with the kernel on prepared reps: {lim_prepared:.2f} s   fastest solver per "
            f"pair: {wins_prepared}"
        )
        for name, (n_workers, threads) in layouts.items():
            if name == "one":
                continue
            _summary(
                _layout_label(n_workers, threads),
                runs[name],
                t1=t1,
                cores=cores,
                n_pairs=n_pairs,
                lim=lim,
                lim_prepared=lim_prepared,
                bare=bare[cores][1],
            )
        engine_ds = runs["one"][0]["soft_matching"]
        for values, _ in bare.values():
            assert all(engine_ds.sel(rep_a=a, rep_b=b).item() == v for (a, b), v in values.items())
        for name in layouts:
            same = runs[name][0]["soft_matching"].values.tobytes()
            assert same == runs["one"][0]["soft_matching"].values.tobytes(), name
        if naive is not None:
            values, tn = naive
            ds = runs["default"][0]
            worst = max(
                abs(ds["soft_matching"].sel(rep_a=a, rep_b=b).item() - v) / max(v, 1e-300)
                for (a, b), v in values.items()
            )
            print(f"(a) naive loop: {tn:.2f} s")
            speedups = "   ".join(
                f"(a)/(b, {_layout_label(*layouts[name])}): {tn / runs[name][1]:.2f}x"
                for name in layouts
            )
            print(f"speed-up {speedups}")
            print(f"max relative difference engine (default layout) vs naive: {worst:.2e}")


# --- the user's view: fresh processes --------------------------------------------------------

#: Variables the user-view processes do not inherit: the thread caps this script sets for
#: its own measurements, and the OpenBLAS tuning of this machine's environment.
_NOT_INHERITED = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)

NAIVE_SCRIPT = """
import json, math, sys, time
start = time.perf_counter()
import numpy as np
import ot
from smd_dist.store import ActivationStore

imported = time.perf_counter()
store = ActivationStore(sys.argv[1], mode="r")
arrays = [store.read(r.model, r.layer).astype(np.float64) for r in store.list()]
n = len(arrays)
values = np.full((n, n), np.nan)
for i in range(n):
    for j in range(i + 1, n):
        x = arrays[i] - arrays[i].mean(0)
        y = arrays[j] - arrays[j].mean(0)
        cost = ot.dist(x.T, y.T)
        wx, wy = np.full(x.shape[1], 1 / x.shape[1]), np.full(y.shape[1], 1 / y.shape[1])
        values[i, j] = math.sqrt(max(ot.emd2(wx, wy, cost, numItermax=10**9), 0.0))
np.save(sys.argv[2], values)
print(json.dumps({"imports": imported - start, "loop": time.perf_counter() - imported}))
"""

ENGINE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import smd_dist

if __name__ == "__main__":
    import numpy as np
    from smd_dist.engine import RunReport

    imported = time.perf_counter()
    report = RunReport(0, 0, 0)
    ds = smd_dist.compute_distances(sys.argv[1], output=sys.argv[2], progress=False,
                                    report=report)
    called = time.perf_counter() - imported
    np.save(sys.argv[3], ds["soft_matching"].values)
    kernel = float(np.nansum(np.triu(ds["soft_matching_seconds"].values, 1)))
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    print(json.dumps({
        "imports": imported - start, "call": called, "inputs": report.seconds_inputs,
        "pairs": report.seconds_pairs, "finish": report.seconds_finish,
        "computed": report.n_computed, "done_before": report.n_done_before,
        "kernel": kernel, "peak": peak, "failed": len(report.failed),
    }))
"""


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _fresh(script: Path, *args) -> tuple[float, dict]:
    """Run ``script`` in a fresh Python; its wall seconds, start to exit, and its report."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), *map(str, args)], env=_environment(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def small_store(path: Path, n_reps: int, *, low: int, high: int, n_stimuli: int,
                seed: int = 0) -> ActivationStore:
    """``n_reps`` reps of widths drawn from ``low``-``high``, ten layers per model, reading
    one shared latent (tanh of random projections, plus noise)."""
    rng = np.random.default_rng(seed)
    store = ActivationStore(path, mode="w")
    latent = rng.standard_normal((n_stimuli, 8))
    for k, width in enumerate(rng.integers(low, high + 1, size=n_reps)):
        x = np.tanh(latent @ rng.standard_normal((8, width)))
        x += 0.1 * rng.standard_normal(x.shape)
        store.write(f"net{k // 10:04d}", f"layer{k % 10}", x.astype(np.float32))
    return store


def mixed_store(path: Path, n_reps: int, *, low: int, high: int, n_stimuli: int,
                seed: int = 7) -> ActivationStore:
    """``n_reps`` reps of widths log-uniform in ``low``-``high``, in the three regimes of
    :mod:`smd_dist.demo.workloads` in turn."""
    rng = np.random.default_rng(seed)
    widths = np.exp(rng.uniform(np.log(low), np.log(high), size=n_reps)).astype(int)
    spec = [(workloads.REGIMES[k % 3], int(w)) for k, w in enumerate(widths)]
    return build_store(path, spec, n_stimuli)


def user_workloads(quick: bool) -> dict:
    """Name -> (description, store builder taking a path)."""
    if quick:
        return {
            "A": ("6 reps, widths 128-256, M = 500", lambda p: build_store(p, QUICK, 500)),
            "B": ("20 reps, widths 32-128, M = 200",
                  lambda p: mixed_store(p, 20, low=32, high=128, n_stimuli=200)),
            "C": ("40 reps of width 32, M = 100",
                  lambda p: small_store(p, 40, low=32, high=32, n_stimuli=100)),
            "D": ("60 reps, widths 8-32, M = 64",
                  lambda p: small_store(p, 60, low=8, high=32, n_stimuli=64)),
        }
    return {
        "A": ("16 reps, widths 256-2048, M = 2000", lambda p: build_store(p, FULL, 2000)),
        "B": ("80 reps, widths 32-512, M = 500",
              lambda p: mixed_store(p, 80, low=32, high=512, n_stimuli=500)),
        "C": ("300 reps of width 32, M = 100",
              lambda p: small_store(p, 300, low=32, high=32, n_stimuli=100)),
        "D": ("1000 reps, widths 8-32, M = 64",
              lambda p: small_store(p, 1000, low=8, high=32, n_stimuli=64)),
    }


def user_view(name: str, description: str, store: ActivationStore, tmp: Path, *,
              repeat: int, cores: int) -> None:
    """The loop and the engine on one workload, each in fresh processes, alternating."""
    scripts = tmp / "scripts"
    scripts.mkdir(exist_ok=True)
    naive_script, engine_script = scripts / "naive.py", scripts / "engine.py"
    naive_script.write_text(textwrap.dedent(NAIVE_SCRIPT))
    engine_script.write_text(textwrap.dedent(ENGINE_SCRIPT))
    n = len(store.list())
    pairs = n * (n - 1) // 2
    naive_runs, engine_runs = [], []
    for k in range(max(1, repeat)):
        naive_runs.append(_fresh(naive_script, store.path, tmp / f"naive-{name}.npy"))
        output = tmp / f"out-{name}-{k}"
        engine_runs.append(_fresh(engine_script, store.path, output,
                                  tmp / f"engine-{name}.npy"))
    naive = np.load(tmp / f"naive-{name}.npy")
    engine = np.load(tmp / f"engine-{name}.npy")
    upper = np.triu_indices(n, 1)
    worst = float(np.max(np.abs(engine[upper] - naive[upper]) / np.abs(naive[upper])))
    print(f"({name}) {description}: {pairs} pairs, {cores} cores")
    for k, ((tn, rn), (te, re_)) in enumerate(zip(naive_runs, engine_runs, strict=True)):
        rest = re_["call"] - re_["inputs"] - re_["pairs"] - re_["finish"]
        outside = cores * re_["pairs"] - re_["kernel"]
        print(
            f"  run {k + 1}: loop {tn:7.2f} s (imports {rn['imports']:.2f}, loop "
            f"{rn['loop']:.2f}); engine {te:7.2f} s: loop/engine {tn / te:.2f}x\n"
            f"    engine phases: imports {re_['imports']:.2f} s, reps read and checked "
            f"{re_['inputs']:.2f} s, pairs {re_['pairs']:.2f} s, assembling and writing "
            f"{re_['finish']:.2f} s, setting up + cluster start and close {rest:.2f} s; "
            f"interpreter start and exit {te - re_['imports'] - re_['call']:.2f} s\n"
            f"    worker time outside the metric: {outside / pairs * 1e6:.1f} us per pair "
            f"({100 * outside / max(cores * re_['pairs'], 1e-9):.1f} % of {cores} threads x "
            f"the pairs phase); driver peak memory {re_['peak'] / 2**20:.0f} MiB"
        )
    print(f"  max relative difference engine vs loop: {worst:.1e}")
    if name == "D":
        output = tmp / f"out-{name}-0"
        seconds, resumed = _fresh(engine_script, store.path, output, tmp / "resumed.npy")
        assert resumed["computed"] == 0 and resumed["done_before"] == pairs, resumed
        assert np.array_equal(np.load(tmp / "resumed.npy"), engine, equal_nan=True)
        start = time.perf_counter()
        status = subprocess.run([sys.executable, "-m", "smd_dist", "status", str(output)],
                                env=_environment(), capture_output=True, text=True)
        status_seconds = time.perf_counter() - start
        assert f"{pairs} of {pairs} have results" in status.stdout, status.stdout
        print(
            f"  resumed with every pair done: {seconds:.2f} s in all, the call "
            f"{resumed['call']:.2f} s (assembling and writing {resumed['finish']:.2f} s); "
            f"`smd-dist status`: {status_seconds:.2f} s in all"
        )


def memory_curve(tmp: Path, sizes=(100, 300, 1000, 2000)) -> None:
    """The driver's peak memory (VmHWM) for (D)'s kind of reps at several counts."""
    scripts = tmp / "scripts"
    scripts.mkdir(exist_ok=True)
    engine_script = scripts / "engine.py"
    engine_script.write_text(textwrap.dedent(ENGINE_SCRIPT))
    print("driver peak memory, reps of widths 8-32, M = 64:")
    for n in sizes:
        store = small_store(tmp / f"curve-{n}", n, low=8, high=32, n_stimuli=64)
        seconds, report = _fresh(engine_script, store.path, tmp / f"curve-out-{n}",
                                 tmp / "curve.npy")
        print(f"  {n:5d} reps, {n * (n - 1) // 2:8d} pairs: {report['peak'] / 2**20:6.0f} MiB "
              f"({seconds:.1f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (a few minutes)")
    parser.add_argument("--workloads", default="A,B,C,D",
                        help="the user-view workloads to run, e.g. A,D ('' for none)")
    parser.add_argument("--detail", action="store_true",
                        help="also the breakdown (a)-(d) on workload A")
    parser.add_argument("--memory-curve", action="store_true",
                        help="the driver's peak memory at 100, 300, 1000, 2000 reps")
    parser.add_argument("--skip-naive", action="store_true", help="detail: skip (a)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every measurement, one after the other (detail: each keeps its "
        "fastest)",
    )
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    chosen = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    specs = user_workloads(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in chosen:
            description, build = specs[name]
            store = build(tmp / f"store-{name}")
            user_view(name, description, store, tmp, repeat=args.repeat, cores=cores)
        if args.memory_curve:
            memory_curve(tmp, (20, 40, 60) if args.quick else (100, 300, 1000, 2000))
    if args.detail:
        detail(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
