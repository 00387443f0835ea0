"""Benchmark the all-pairs engine against the loop a user would write, in one run.

Workload: 16 reps (widths 256–2048, M = 2000 stimuli) in the three regimes of
:mod:`smd_dist.demo.workloads`, written to a temporary store. Measured, in this process:

(a) naive loop — for each pair: read both reps, centre, ``ot.dist``, ``ot.emd2`` with a cap
    high enough to be exact, one pair after another;
(b) this engine on its own local cluster (:func:`smd_dist.engine.clusters.make_client`, as
    ``kind: local`` starts it) with one single-threaded worker process, with the default
    layout (:func:`smd_dist.engine.clusters.default_layout`: one process per two cores, its two
    threads sharing the reps it reads), with one single-threaded process per core and
    with one process whose threads fill the cores, each where it differs from the default
    (cluster start-up excluded, reading and preparing the reps included);
(c) the limit — per pair, the fastest exact solve available for it (``ot.emd2``, scipy's
    ``linear_sum_assignment`` where widths allow, this package's kernel), each timed alone
    on a precomputed cost, plus one float32 cross product; summed and divided by the cores.
    The kernel is timed on fresh arrays, so it pays per pair for what the engine does once
    per rep (a neuron-major copy, norms, the low-precision copy); the limit is also printed
    with the kernel timed as the engine runs it (prepared reps, second solve of the pair);
(d) the engine's worker code without Dask — the same tasks, largest first, on a process
    pool of one process and of one per core, each process keeping the reps it reads. Its
    parallel efficiency is what the machine itself gives this work (memory traffic, fresh
    pages, reads), the ceiling for the engine's; (b) against (d) is what Dask costs.

Prints the times, the ratios (a)/(b), (b)/(c), each multi-core layout's parallel
efficiency next to (d)'s, the per-pair scheduling overhead (worker time from the first
check to the last pair spent neither in kernels nor in reading and preparing reps, per
pair) next to the workers' reading and the run's fixed costs (assembling and writing the
matrix after the last pair), the values' agreement with (a), and peak worker memory.

With ``--repeat N`` the whole set runs N times round-robin and each measurement keeps its
fastest run ((c): each pair's fastest time of each solver), so a slow spell of a shared
machine hits all of them alike.

Usage: ``python scripts/bench_engine.py [--quick] [--skip-naive] [--repeat N]``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
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


def _run_task(task, sources, specs) -> list[dict]:
    from smd_dist.engine import tasks

    return tasks.compare_pairs(task, sources, specs, None, tasks.KEEP_PREPARED_FRACTION)


def without_dask(store: ActivationStore, *, processes: int) -> tuple[dict, float]:
    """The engine's own worker code with no Dask: the same tasks, largest first, handed to
    ``processes`` spawned processes by :class:`concurrent.futures.ProcessPoolExecutor`;
    each process keeps the reps it prepares (read on first use). Pool start-up excluded.

    Its parallel efficiency is what this machine gives the engine's work when nothing
    schedules it but a queue: the ceiling for the engine's.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from smd_dist.engine import planning, run, selection, settings

    chosen = store.list()
    metrics = selection.resolve_metrics(("soft_matching",))
    specs = selection.metric_specs(metrics, {"center": True, "normalize": None})
    sources = run._sources(store, chosen, sorted({prep for _, prep in specs}))
    todo = [(i, j) for i in range(len(chosen)) for j in range(i + 1, len(chosen))]
    engine_settings = settings.engine_settings()
    tasks = planning.plan_tasks(
        chosen,
        todo,
        task_entries=engine_settings["task-entries"],
        per_task=engine_settings["max-pairs-per-task"],
    )
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
        futures = [
            pool.submit(
                _run_task,
                [(chosen[i].rep_id, chosen[j].rep_id) for i, j in task],
                {chosen[i].rep_id: sources[i] for pair in task for i in pair},
                specs,
            )
            for task in tasks
        ]
        for future in as_completed(futures):
            for record in future.result():
                if "error" in record:
                    raise RuntimeError(record["error"])
                values[(record["rep_a"], record["rep_b"])] = record["value"]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small workload (about a minute)")
    parser.add_argument("--skip-naive", action="store_true", help="skip (a)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (b), (c) and (a), one after the other; each keeps its fastest",
    )
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
