"""The all-pairs engine: which pairs, the Dask graph, incremental writes, resume.

Data flow: the store is read on workers (each worker reads and prepares a rep once and
keeps it within a share of its memory, :mod:`smd_dist.worker_cache`; pair tasks name
their reps and never carry their data); pair tasks run the metric kernels; the client
collects records as they finish and appends them to the output's ledger every
``flush-seconds``. The labeled matrix is assembled from the ledger at the end. The engine
knows nothing of solvers' internals.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import json
import os
import platform
import shutil
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from smd_dist import config
from smd_dist import metrics as metric_registry
from smd_dist.results import (
    OUTPUT_FORMAT,
    OutputError,
    PairRecord,
    ResultsOutput,
    assemble,
    canonical_pair,
    summarize,
)
from smd_dist.store import rep_id

#: Each worker keeps the reps it has prepared (:mod:`smd_dist.worker_cache`) within this
#: fraction of its memory limit; beyond it, the least recently used are read again.
KEEP_PREPARED_FRACTION = 0.25


class InputError(ValueError):
    """Representations that cannot be compared, found before any pair is computed."""


class OutputLockedError(OutputError):
    """Another run holds the output."""


@dataclass
class RunReport:
    """What a run did: counts, failures, what it skipped or repaired, and where time went.

    ``seconds`` is the whole call; of it, ``seconds_inputs`` read, checked and prepared
    the reps, ``seconds_pairs`` computed the pairs (submission to the last result), and
    ``seconds_finish`` assembled and wrote the labeled matrices.
    """

    n_reps: int
    n_pairs: int
    n_done_before: int
    n_computed: int = 0
    n_records_written: int = 0
    failed: list[str] = field(default_factory=list)
    incomplete_parts: list[str] = field(default_factory=list)
    corrupt_parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_inputs: float = 0.0
    seconds_pairs: float = 0.0
    seconds_finish: float = 0.0


# -- selection ----------------------------------------------------------------------------
def select_reps(records: Sequence, patterns: Sequence[str] | str | None) -> list:
    """Pick reps by ``"model/layer"`` ids or glob patterns, in store order.

    A pattern without ``/`` that names a model selects all its layers. Patterns that
    match nothing are errors, with the closest ids suggested.
    """
    if patterns is None:
        chosen = list(records)
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        ids = [r.rep_id for r in records]
        models = sorted({r.model for r in records})
        keep = set()
        for pattern in patterns:
            hits = {i for i in ids if fnmatch.fnmatchcase(i, pattern)}
            hits |= {r.rep_id for r in records if fnmatch.fnmatchcase(r.model, pattern)}
            if not hits:
                raise InputError(
                    f"rep pattern {pattern!r} matches no representation in the store"
                    f"{config.suggest(pattern, ids + models)}; the store has "
                    f"{len(ids)} reps from models {', '.join(models[:10])}"
                    + (" ..." if len(models) > 10 else "")
                )
            keep |= hits
        chosen = [r for r in records if r.rep_id in keep]
    if len(chosen) < 2:
        raise InputError(
            f"selection holds {len(chosen)} representation(s) "
            f"({', '.join(r.rep_id for r in chosen) or 'none'}); at least 2 are needed"
        )
    return chosen


def resolve_metrics(names: Sequence[str] | str) -> list:
    """Registry objects for the named metrics, in order, without duplicates."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise InputError("no metric named; available: " + ", ".join(metric_registry.available()))
    seen = []
    for name in names:
        metric = metric_registry.get(name)
        if metric.name not in [m.name for m in seen]:
            seen.append(metric)
    return seen


ENGINE_KEYS = {
    "flush-seconds": "results reach the output at least this often (seconds)",
    "wave-size": "tasks in flight at once (null: 4 per worker thread)",
    "max-pairs-per-task": "most pairs batched into one task",
    "task-entries": "pairs are batched into tasks of about this many cost entries (Nx*Ny)",
}


def engine_settings(overrides: dict | None = None) -> dict:
    """The engine settings: ``overrides`` over the ``smd-dist.engine`` config, checked.

    Keys may be spelt with ``-`` or ``_`` (environment variables such as
    ``DASK_SMD_DIST__ENGINE__FLUSH_SECONDS`` arrive with ``_``).

    Raises
    ------
    smd_dist.config.ConfigError
        An unknown key (with the closest valid one) or a value out of range.
    """
    merged = {}
    layers = (config.package_default("engine"), config.get("engine", {}) or {}, overrides or {})
    for layer in layers:
        if not isinstance(layer, dict):
            raise config.ConfigError(f"engine settings must be a mapping, got {layer!r}")
        merged.update(config.normalize_keys(layer, where="engine settings"))
    config.check_keys(merged, ENGINE_KEYS, where="engine settings")
    out = {key: merged[key] for key in ENGINE_KEYS}
    seconds = out["flush-seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise config.ConfigError(
            f"engine setting 'flush-seconds' must be a number > 0, got {seconds!r}"
        )
    out["flush-seconds"] = float(seconds)
    for key, low in (("wave-size", 1), ("max-pairs-per-task", 1), ("task-entries", 0)):
        value = out[key]
        if key == "wave-size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise config.ConfigError(
                f"engine setting {key!r} must be an integer >= {low}, got {value!r}"
            )
    return out


def _prep_key(prep: dict) -> str:
    return json.dumps(prep, sort_keys=True)


def _metric_specs(metric_objs, base_prep: dict) -> list[tuple[str, str]]:
    """``(metric name, prep key)`` per metric: what a pair task runs on which prepared array."""
    return [(m.name, _prep_key(m.preprocessing(**base_prep))) for m in metric_objs]


# -- worker side --------------------------------------------------------------------------
@dataclass(frozen=True)
class RepSource:
    """Where a pair task finds one rep: the store, the rep and its content hash at the
    start of the run, and the preprocessings it needs (a few hundred bytes in the graph)."""

    store: str
    model: str
    layer: str
    content_hash: str
    preps: tuple[str, ...]

    @property
    def rep_id(self) -> str:
        return rep_id(self.model, self.layer)


def _read_rep(source: RepSource) -> np.ndarray:
    from smd_dist.store import ActivationStore

    store = ActivationStore(source.store, mode="r")
    recorded = store.record(source.model, source.layer).content_hash
    if recorded != source.content_hash:
        raise InputError(
            f"{source.rep_id} changed in the store during the run "
            f"(content hash {source.content_hash[:19]} at start, {recorded[:19]} now)"
        )
    return store.read(source.model, source.layer, verify=True)


def _prepare_rep(source: RepSource) -> dict:
    """Read one rep and apply each preprocessing it needs; keyed by prep key."""
    from smd_dist.allocator import reuse_freed_memory
    from smd_dist.derived import freeze
    from smd_dist.prepare import preprocess
    from smd_dist.solvers import representatives_first

    reuse_freed_memory()
    array = _read_rep(source)
    prepared = {}
    for key in source.preps:
        try:
            # Read-only: nothing downstream edits it, and it keeps its per-neuron quantities
            # (norms, low-precision copy) across all the pairs it is part of.
            # One neuron of each group of identical ones first, the copies after: the
            # solvers' merged problem is then a view of it, not a second copy kept next to
            # it (every metric ignores the order of neurons).
            prepared[key] = freeze(
                representatives_first(preprocess(array, **json.loads(key), name=source.rep_id))
            )
        except ValueError as err:
            raise InputError(f"{source.rep_id} (shape {array.shape}): {err}") from err
    return prepared


def _prepared(source: RepSource, keep_fraction: float) -> dict:
    """The rep's prepared arrays: kept by this worker, or read and prepared now."""
    from smd_dist import worker_cache

    return worker_cache.kept(
        source,
        lambda: _prepare_rep(source),
        budget=int(keep_fraction * worker_cache.memory_limit()),
    )


def _check_rep(source: RepSource, keep_fraction: float) -> None:
    """Validate one rep as a pair task would see it (and keep it, within the budget)."""
    _prepared(source, keep_fraction)


def _compare_pairs(
    pairs: list, sources: dict, metric_specs: list, device, keep_fraction: float
) -> list[dict]:
    """Run every metric on every pair of one task; a failure is recorded, not raised."""
    from smd_dist.allocator import reuse_freed_memory
    from smd_dist.validation import check_same_stimuli

    reuse_freed_memory()
    worker = _worker_name()
    prepared = {rep: _prepared(source, keep_fraction) for rep, source in sources.items()}
    out = []
    for rep_a, rep_b in pairs:
        for name, prep in metric_specs:
            metric = metric_registry.get(name)
            xa, xb = prepared[rep_a][prep], prepared[rep_b][prep]
            record = {"metric": name, "rep_a": rep_a, "rep_b": rep_b, "worker": worker}
            if metric.equal_width_only and xa.shape[1] != xb.shape[1]:
                record.update(value=float("nan"), solver="undefined: widths differ")
                out.append(record)
                continue
            start = time.perf_counter()
            try:
                # Each rep passed check_array when it was prepared; per pair only the
                # stimulus counts can disagree, and a full pass over both would cost more.
                check_same_stimuli(xa, xb, names=(rep_a, rep_b))
                result = metric.compute(xa, xb, device=device)
            except Exception as err:  # recorded with the pair; the run goes on
                record.update(value=float("nan"), error=f"{type(err).__name__}: {err}")
            else:
                cert = result.certificate or {}
                record.update(
                    value=float(result.value),
                    solver=result.solver,
                    max_violation=float(cert.get("max_violation", np.nan)),
                    gap=float(cert.get("gap", np.nan)),
                )
            record["seconds"] = time.perf_counter() - start
            out.append(record)
    return out


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


# -- planning -----------------------------------------------------------------------------
def pair_memory_bytes(n_stimuli: int, n_a: int, n_b: int) -> int:
    """Peak bytes one pair task needs, with margin.

    Two prepared float64 inputs and their float32 copies, the float32 cross product,
    and — on the network-simplex path — a float64 cost matrix, plan and reduced costs.
    """
    return int(12 * n_stimuli * (n_a + n_b) + 28 * n_a * n_b)


def _plan_tasks(
    reps: list, todo: list[tuple[int, int]], *, task_entries: int, per_task: int
) -> list:
    """Group pairs into tasks of about ``task_entries`` cost entries; largest work first.

    A pair of at least ``task_entries`` entries (``Nx·Ny``) is a task of its own; smaller
    pairs are batched, in tiles of reps (neighbouring pairs share inputs), until a batch
    holds ``task_entries`` entries or ``per_task`` pairs: each task carries a fixed cost in
    the scheduler, the client and the worker's event loop, which small pairs would not
    repay. Tasks are ordered by their work, ``Σ Nx·Ny``, largest first (stable, so tiles
    stay together among equals): a wide pair submitted last would leave every other
    worker idle while it runs.
    """
    tile = 8
    todo = sorted(todo, key=lambda ij: (ij[0] // tile, ij[1] // tile, ij[0], ij[1]))
    tasks, batch, entries = [], [], 0
    for i, j in todo:
        work = reps[i].n_neurons * reps[j].n_neurons
        if work >= task_entries:
            tasks.append([(i, j)])
            continue
        batch.append((i, j))
        entries += work
        if entries >= task_entries or len(batch) >= per_task:
            tasks.append(batch)
            batch, entries = [], 0
    if batch:
        tasks.append(batch)
    tasks.sort(key=lambda task: -sum(reps[i].n_neurons * reps[j].n_neurons for i, j in task))
    return tasks


def _check_output_writable(path: Path, needed_bytes: int) -> None:
    """Refuse before compute when the output folder cannot take the results."""
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    probe = parent / f".smd-dist-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"output {str(path)!r} is not writable ({err.strerror or err}); nothing was computed"
        ) from err
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"output {str(path)!r}: {free / 2**20:.1f} MiB free on its disk, the results "
            f"need about {needed_bytes / 2**20:.1f} MiB; nothing was computed"
        )


_FROZEN_LOCK = threading.Lock()
_FROZEN_DEPTH = 0


@contextlib.contextmanager
def _gc_frozen():
    """Keep the objects that exist now out of the garbage collector's full passes.

    The client process of a local cluster also runs the scheduler, and it holds millions
    of long-lived objects (torch, xarray, Dask): a full collection there took 0.23 s on
    the benchmark, during which no finished task was answered with a new one and both
    workers stood idle. Frozen objects are not scanned; they are handed back to the
    collector when the outermost run ends, so nothing is lost, only postponed.
    """
    global _FROZEN_DEPTH
    with _FROZEN_LOCK:
        if _FROZEN_DEPTH == 0:
            gc.freeze()
        _FROZEN_DEPTH += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _FROZEN_DEPTH -= 1
            if _FROZEN_DEPTH == 0:
                gc.unfreeze()


@contextlib.contextmanager
def _output_lock(path: Path):
    """Hold ``<output>.lock`` for the run (an OS lock: a killed run releases it)."""
    from filelock import FileLock, Timeout

    lock_path = Path(f"{path}.lock")
    info_path = Path(f"{path}.lock.json")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(info_path.read_text())
            holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
        raise OutputLockedError(
            f"output {str(path)!r} is being written by another run{holder}; wait for it "
            "to finish or use another output path"
        ) from None
    try:
        info_path.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
        )
        yield
    finally:
        with contextlib.suppress(OSError):
            info_path.unlink()
        lock.release()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "smd-dist",
        "numpy",
        "scipy",
        "pot",
        "torch",
        "dask",
        "distributed",
        "zarr",
        "xarray",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class _MemorySink:
    """Stands in for an output when ``output=None``: records kept in memory."""

    def __init__(self):
        self.latest: dict = {}

    def append(self, records):
        for r in records:
            self.latest[r.key] = r


# -- the run ------------------------------------------------------------------------------
def compute_distances(
    store,
    *,
    reps: Sequence[str] | str | None = None,
    metrics: Sequence[str] | str = ("soft_matching",),
    output: str | os.PathLike | None = None,
    client=None,
    resume: bool = True,
    center: bool | None = None,
    normalize: str | None = "default",
    device: str | None = None,
    cluster: dict | None = None,
    progress: bool = True,
    run_config: dict | None = None,
    report: RunReport | None = None,
    engine: dict | None = None,
) -> xr.Dataset:
    """Compare every pair of selected representations; return the labeled matrices.

    For each metric ``m`` and reps ``a``, ``b`` (arrays of shape (stimuli, neurons)),
    the entry ``m[a, b]`` is ``m(prep(X_a), prep(X_b))``, e.g. the soft matching distance

    .. math::

        d(X, Y) = \\sqrt{\\min_{P \\ge 0,\\ P\\mathbf 1 = 1/N_x,\\ P^\\top \\mathbf 1 = 1/N_y}
                  \\sum_{ij} P_{ij} \\lVert x_i - y_j \\rVert^2}.

    Parameters
    ----------
    store : ActivationStore or str
        The activation store (or its path).
    reps : sequence of str, optional
        ``"model/layer"`` ids, model names or glob patterns; all reps by default.
    metrics : sequence of str
        Names from :func:`smd_dist.metrics.available`.
    output : path, optional
        Local folder for the results (zarr). Pairs are written as they finish; with
        ``resume`` a rerun computes only what is missing or failed. ``None`` keeps
        everything in memory.
    client : distributed.Client, optional
        Use this client; otherwise one is made from ``cluster`` (see
        :func:`smd_dist.cluster.make_client`; a local cluster by default).
    resume : bool
        Reuse finished pairs found in ``output``.
    center, normalize :
        Preprocessing applied once per rep (defaults from the ``smd-dist.preprocessing``
        config): centre each neuron over stimuli; ``None``, ``"unit"`` or ``"zscore"``.
    device : str, optional
        Torch device for the kernels on workers (``None``: CUDA where present).
    progress : bool
        Print a progress bar (pairs done/total, rate, ETA) and the dashboard link.
    run_config : dict, optional
        The run config, recorded in the output's attributes.
    report : RunReport, optional
        Filled in with counts, failures and repairs.
    engine : dict, optional
        Engine settings (:data:`ENGINE_KEYS`) over the ``smd-dist.engine`` config; a run
        config's ``engine:`` section.

    Returns
    -------
    xarray.Dataset
        See :func:`smd_dist.results.assemble`; attrs hold the metric definitions,
        preprocessing, package versions, the store's content hashes, the run config.

    Raises
    ------
    InputError
        Unknown reps or metrics, an empty selection, or reps that cannot be compared
        (NaN, too few stimuli or neurons, constant neurons under normalisation), found
        before any pair is computed.
    OutputError
        The output is locked by another run, incompatible, not writable or too small.
    """
    from smd_dist.store import ActivationStore

    started = time.perf_counter()
    settings = engine_settings(engine)
    if center is None:
        center = config.get("preprocessing.center", True)
    if normalize == "default":
        normalize = config.get("preprocessing.normalize", None)
    if device is None:
        device = config.get("device", None)
    if not isinstance(store, ActivationStore):
        store = ActivationStore(str(store), mode="r")
    chosen = select_reps(store.list(), reps)
    metric_objs = resolve_metrics(metrics)
    base_prep = {"center": bool(center), "normalize": normalize}
    specs = _metric_specs(metric_objs, base_prep)
    preps_needed = sorted({p for _, p in specs})
    header = {
        "format": OUTPUT_FORMAT,
        "preprocessing": base_prep,
        "version_series": ".".join(_versions()["smd-dist"].split(".")[:2]),
        "store": str(store.path),
        "reps": [r.rep_id for r in chosen],
        "metrics": [m.name for m in metric_objs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    n_pairs = len(chosen) * (len(chosen) - 1) // 2
    if output is not None:
        output_path = Path(output)
        needed = (
            600 * n_pairs * len(metric_objs) + 64 * len(chosen) ** 2 * len(metric_objs) + 2**20
        )
        _check_output_writable(output_path, 2 * needed)
        lock = _output_lock(output_path)
    else:
        lock = contextlib.nullcontext()
    with lock, _gc_frozen():
        if output is not None:
            sink = ResultsOutput(output_path)
            sink.initialise(header)
            latest, incomplete, corrupt = sink.records(on_corrupt="quarantine")
        else:
            sink, latest, incomplete, corrupt = _MemorySink(), {}, [], []
        if not resume:
            latest = {}
        todo = _pending_pairs(chosen, metric_objs, latest)
        report = report if report is not None else RunReport(0, 0, 0)
        report.n_reps, report.n_pairs = len(chosen), n_pairs
        report.n_done_before = n_pairs - len(todo)
        report.incomplete_parts, report.corrupt_parts = incomplete, corrupt
        for message in corrupt:
            print(f"smd-dist: quarantined, pairs recomputed: {message}", file=sys.stderr)
        if todo:
            with _client_context(client, cluster) as active:
                if progress and client is not None:  # make_client prints it for its own
                    print(f"smd-dist: dashboard {active.dashboard_link}", file=sys.stderr)
                phase = time.perf_counter()
                sources = _sources(store, chosen, preps_needed)
                token = dask.base.tokenize(str(store.path), preps_needed, time.time_ns())
                _check_inputs(active, chosen, todo, sources, token=token)
                _check_memory(active, store, chosen, todo)
                report.seconds_inputs = time.perf_counter() - phase
                phase = time.perf_counter()
                report.n_computed, report.n_records_written = _run_pairs(
                    active,
                    chosen,
                    todo,
                    specs,
                    device,
                    sink,
                    progress=progress,
                    already=n_pairs - len(todo),
                    total=n_pairs,
                    settings=settings,
                    sources=sources,
                    token=token,
                )
                report.seconds_pairs = time.perf_counter() - phase
        phase = time.perf_counter()
        if output is not None:
            latest, _, _ = sink.records(on_corrupt="quarantine")
        else:
            latest = sink.latest
        attrs = _dataset_attrs(store, chosen, metric_objs, base_prep, run_config)
        ds = assemble(latest, chosen, metric_objs, attrs=attrs)
        failures = _failures(ds, metric_objs)
        ds.attrs["n_failed_pairs"] = len(failures)
        ds.attrs["failed_pairs"] = failures
        report.failed = failures
        if output is not None:
            sink.write_dataset(ds)
            sink.compact()
        report.seconds_finish = time.perf_counter() - phase
    report.seconds = time.perf_counter() - started
    return ds


def _pending_pairs(chosen, metric_objs, latest) -> list[tuple[int, int]]:
    """Index pairs (i < j) with at least one metric missing or failed."""
    todo = []
    for i in range(len(chosen)):
        for j in range(i + 1, len(chosen)):
            (ra, ha), (rb, hb) = sorted(
                [
                    (chosen[i].rep_id, chosen[i].content_hash),
                    (chosen[j].rep_id, chosen[j].content_hash),
                ]
            )
            for metric in metric_objs:
                record = latest.get((metric.name, ra, ha, rb, hb))
                if record is None or not record.ok:
                    todo.append((i, j))
                    break
    return todo


@contextlib.contextmanager
def _client_context(client, cluster_config):
    if client is not None:
        yield client
        return
    from smd_dist.cluster import make_client

    with make_client(cluster_config) as made:
        yield made


def _sources(store, chosen, preps) -> list[RepSource]:
    """Each selected rep's :class:`RepSource` (by index into ``chosen``)."""
    return [
        RepSource(str(store.path), r.model, r.layer, r.content_hash, tuple(preps)) for r in chosen
    ]


def _check_inputs(client, chosen, todo, sources, *, token: str) -> None:
    """Read and validate every rep that takes part, on the workers, before any pair.

    Each rep is checked once, by whichever worker is free; that worker keeps it prepared
    (within ``KEEP_PREPARED_FRACTION`` of its memory) for the pairs it later computes.
    """
    from distributed import wait

    # Widest first: the phase ends when its last read does, and a narrow rep read last
    # keeps the other workers' wait for it short.
    involved = sorted({i for pair in todo for i in pair}, key=lambda i: -chosen[i].n_neurons)
    # One submission for all: each call is a round trip through the scheduler's event
    # loop, which shares the machine with the workers.
    submitted = client.map(
        _check_rep,
        [sources[i] for i in involved],
        [KEEP_PREPARED_FRACTION] * len(involved),
        key=[f"check-{i}-{token}" for i in involved],
    )
    futures = dict(zip(involved, submitted, strict=True))
    wait(submitted)
    problems = []
    for i, future in sorted(futures.items()):
        if future.status == "error":
            err = future.exception()
            message = str(err)
            if chosen[i].rep_id not in message:
                message = f"{chosen[i].rep_id}: {message}"
            problems.append(message)
        future.release()
    if problems:
        raise InputError(
            f"{len(problems)} representation(s) cannot be compared; nothing was computed:\n  "
            + "\n  ".join(problems)
        )


def _check_memory(client, store, chosen, todo) -> None:
    """Refuse pairs that cannot fit in one worker thread's share of its process's memory,
    before compute (the threads of a worker solve their pairs at the same time)."""
    workers = client.scheduler_info()["workers"].values()
    limits = [(w.get("memory_limit") or 0) // (w.get("nthreads") or 1) for w in workers]
    limit = min((m for m in limits if m), default=0)
    if not limit:
        return
    n_stimuli = store.n_stimuli or 0
    worst = max(todo, key=lambda ij: chosen[ij[0]].n_neurons * chosen[ij[1]].n_neurons)
    a, b = chosen[worst[0]], chosen[worst[1]]
    need = pair_memory_bytes(n_stimuli, a.n_neurons, b.n_neurons)
    if need > 0.7 * limit:
        raise InputError(
            f"pair {a.rep_id} ({a.n_neurons} neurons) vs {b.rep_id} ({b.n_neurons} neurons) "
            f"needs about {need / 2**30:.2f} GiB to solve exactly, worker threads have "
            f"{limit / 2**30:.2f} GiB each (a worker's memory limit over its threads); "
            "remedies: pool the layer at extraction (pooling='mean'), give workers more "
            "memory (cluster.memory-limit, or fewer workers or threads per node), or leave "
            "these reps out (reps: ...)"
        )


def _run_pairs(
    client,
    chosen,
    todo,
    specs,
    device,
    sink,
    *,
    progress,
    already,
    total,
    settings,
    sources,
    token,
):
    """Submit pair tasks in waves, write records as they arrive.

    A task names its reps by :class:`RepSource`; the worker that runs it uses the prepared
    arrays it keeps, or reads them from the store. Returns the number of pairs computed
    and of records written.
    """
    from distributed import wait
    from tqdm.auto import tqdm

    flush_seconds = settings["flush-seconds"]
    tasks = _plan_tasks(
        chosen,
        todo,
        task_entries=settings["task-entries"],
        per_task=settings["max-pairs-per-task"],
    )
    fixed_wave = settings["wave-size"]

    def wave_size() -> int:
        # Recomputed as the run goes: on SLURM workers join (and leave) during the run.
        if fixed_wave:
            return int(fixed_wave)
        threads = sum(client.nthreads().values())
        return 4 * max(threads, 1)

    def submit(task):
        reps_in = sorted({i for pair in task for i in pair})
        ids = [(chosen[i].rep_id, chosen[j].rep_id) for i, j in task]
        return client.submit(
            _compare_pairs,
            ids,
            {chosen[i].rep_id: sources[i] for i in reps_in},
            specs,
            device,
            KEEP_PREPARED_FRACTION,
            key=f"pairs-{task[0][0]}-{task[0][1]}-{len(task)}-{token}",
        )

    hashes = {r.rep_id: r.content_hash for r in chosen}
    buffer: list[PairRecord] = []
    last_flush = time.monotonic()
    pending: dict = {}
    queue = list(reversed(tasks))
    computed = written = 0
    bar = tqdm(
        total=total,
        initial=already,
        unit="pair",
        disable=not progress,
        file=sys.stderr,
        desc="smd-dist",
    )

    def flush():
        nonlocal buffer, last_flush, written
        if buffer:
            sink.append(buffer)
            written += len(buffer)
            buffer = []
        last_flush = time.monotonic()

    try:
        wave, sized_at = wave_size(), time.monotonic()
        while queue or pending:
            if time.monotonic() - sized_at > 5.0:
                wave, sized_at = wave_size(), time.monotonic()
            while queue and len(pending) < wave:
                task = queue.pop()
                pending[submit(task)] = task
            try:
                done, _ = wait(list(pending), timeout=flush_seconds, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                task = pending.pop(future)
                ids = [(chosen[i].rep_id, chosen[j].rep_id) for i, j in task]
                if future.status == "error":
                    err = future.exception()
                    results = [
                        {
                            "metric": name,
                            "rep_a": a,
                            "rep_b": b,
                            "value": float("nan"),
                            "error": f"{type(err).__name__}: {err}",
                            "worker": "",
                        }
                        for a, b in ids
                        for name, _ in specs
                    ]
                else:
                    results = future.result()
                future.release()
                for raw in results:
                    a, b = canonical_pair(raw["rep_a"], raw["rep_b"])
                    buffer.append(
                        PairRecord(
                            **{
                                **raw,
                                "rep_a": a,
                                "rep_b": b,
                                "hash_a": hashes[a],
                                "hash_b": hashes[b],
                            }
                        )
                    )
                computed += len(task)
                bar.update(len(task))
            if buffer and (time.monotonic() - last_flush >= flush_seconds or not pending):
                flush()
    finally:
        flush()
        bar.close()
    return computed, written


def _failures(ds: xr.Dataset, metric_objs) -> list[str]:
    out = []
    ids = [str(x) for x in ds.rep_a.values]
    for metric in metric_objs:
        errors = ds[f"{metric.name}_error"].values
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                if errors[i, j]:
                    out.append(f"{ids[i]} vs {ids[j]} ({metric.name}): {errors[i, j]}")
    return out


def _dataset_attrs(store, chosen, metric_objs, prep, run_config) -> dict:
    # Structured attributes are JSON strings: netCDF takes only flat values.
    return {
        "title": "soft matching distances between neural representations",
        "metrics": json.dumps(
            {m.name: {"kind": m.kind, "definition": m.description} for m in metric_objs}
        ),
        "preprocessing": json.dumps(prep),
        "versions": json.dumps(_versions()),
        "store": str(store.path),
        "store_hashes": json.dumps({r.rep_id: r.content_hash for r in chosen}),
        "n_stimuli": int(store.n_stimuli or 0),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_config": json.dumps(run_config or {}, default=str),
    }


def output_status(path: str | os.PathLike) -> dict:
    """Progress of an output: pairs done and failed, from the ledger; who holds it."""
    out = ResultsOutput(path)
    header = out.header()
    latest, incomplete, _ = out.records(on_corrupt="raise")
    summary = summarize(latest.values())
    pairs = {(record.rep_a, record.rep_b) for record in latest.values()}
    info_path = Path(f"{path}.lock.json")
    holder = None
    if info_path.exists():
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(info_path.read_text())
    n_reps = len(header.get("reps", []))
    return {
        "path": str(path),
        "store": header.get("store"),
        "metrics": header.get("metrics"),
        "pairs_total": n_reps * (n_reps - 1) // 2,
        "preprocessing": header.get("preprocessing"),
        "assembled": bool(header.get("assembled")),
        "pairs_with_results": len(pairs),
        "records": summary["n_records"],
        "failed": summary["failed"],
        "incomplete_parts": incomplete,
        "running": holder,
    }
