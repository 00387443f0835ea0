"""The all-pairs run: :func:`compute_distances`, from a selection to the labeled matrix.

Data flow: the reps are selected (:mod:`~smd_dist.engine.selection`), read, checked and
prepared on the workers (:mod:`~smd_dist.engine.tasks`, each worker keeping what it
prepared, :mod:`~smd_dist.engine.worker_cache`); pair tasks, batched by
:mod:`~smd_dist.engine.planning`, run the metric kernels; the client collects records as
they finish and appends them to the output's ledger every ``flush-seconds``
(:mod:`~smd_dist.engine.output`). The labeled matrix is assembled from the ledger at the
end. The engine knows nothing of solvers' internals.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import xarray as xr

from smd_dist import config
from smd_dist.engine import planning, tasks
from smd_dist.engine.output import (
    OUTPUT_FORMAT,
    OutputError,
    PairRecord,
    ResultsOutput,
    assemble,
    canonical_pair,
    summarize,
)
from smd_dist.engine.selection import InputError, metric_specs, resolve_metrics, select_reps
from smd_dist.engine.settings import engine_settings
from smd_dist.store import locking

__all__ = [
    "OutputLockedError",
    "RunReport",
    "SchedulerLostError",
    "compute_distances",
    "output_status",
]


class OutputLockedError(OutputError):
    """Another run holds the output."""


class SchedulerLostError(ConnectionError):
    """The Dask scheduler went away mid-run; the pairs finished before it are kept."""


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


def _check_output_writable(path: Path, needed_bytes: int) -> None:
    """Refuse before compute when the output folder cannot take the results."""
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        # A fresh name, created exclusively: never a file some other user linked there.
        fd, probe = tempfile.mkstemp(prefix=".smd-dist-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
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


def _resolved(output: str | os.PathLike) -> Path:
    """The output's real path: every alias of a folder (symbolic links, ``..``) shares
    one lock.

    Raises
    ------
    OutputError
        ``output`` is a URL (``s3://``, ``memory://``): refused before any compute.
    """
    if "://" in str(output):
        ResultsOutput(str(output))  # raises, naming the URL
    return Path(output).expanduser().resolve()


@contextlib.contextmanager
def _output_lock(path: Path):
    """Hold ``<output>.lock`` for the run (an OS lock: a killed run releases it), on the
    output's resolved path, with who holds it in ``<output>.lock.json``."""
    path = _resolved(path)
    info_path = Path(f"{path}.lock.json")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                locking.held(f"{path}.lock", timeout=0, what=f"output {str(path)!r}")
            )
        except locking.LockTimeout:
            holder = ""
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                info = json.loads(info_path.read_text())
                holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
            raise OutputLockedError(
                f"output {str(path)!r} is being written by another run{holder}; wait for it "
                "to finish or use another output path"
            ) from None
        except locking.LockError as err:
            raise OutputError(f"output {str(path)!r}: {err}") from err
        # Renamed into place: a link planted at the name is replaced, never written through.
        locking.replace_file(info_path, json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                info_path.unlink()


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
    security=None,
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
        Folder for the results (zarr) on a local or network file system, not a URL (the
        run locks it, on its resolved path). Pairs are written as they finish; with
        ``resume`` a rerun computes only what is missing or failed. ``None`` keeps
        everything in memory.
    client : distributed.Client, optional
        Use this client; otherwise one is made from ``cluster`` (see
        :func:`smd_dist.engine.clusters.make_client`; a local cluster by default).
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
        The run config, recorded in the output's attributes with its secrets replaced
        by ``***`` (:func:`smd_dist.config.redact`).
    report : RunReport, optional
        Filled in with counts, failures and repairs.
    engine : dict, optional
        Engine settings (:data:`ENGINE_KEYS`) over the ``smd-dist.engine`` config; a run
        config's ``engine:`` section.
    security : distributed.Security, optional
        TLS certificates for the cluster made from ``cluster`` (see
        :func:`smd_dist.engine.clusters.make_client`): those a ``kind: address``
        scheduler expects, or those to give a cluster started here.

    Returns
    -------
    xarray.Dataset
        See :func:`smd_dist.engine.output.assemble`; attrs hold the metric definitions,
        preprocessing, package versions, the store's content hashes, the run config.

    Raises
    ------
    InputError
        Unknown reps or metrics, an empty selection, or reps that cannot be compared
        (NaN, too few stimuli or neurons, constant neurons under normalisation), found
        before any pair is computed.
    OutputError
        The output is locked by another run, incompatible, not writable or too small.
    SchedulerLostError
        The Dask scheduler went away mid-run; what finished is in the output.
    """
    from smd_dist.store.activation_store import ActivationStore

    started = time.perf_counter()
    output_path = _resolved(output) if output is not None else None
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
    specs = metric_specs(metric_objs, base_prep)
    preps_needed = sorted({p for _, p in specs})
    header = {
        "format": OUTPUT_FORMAT,
        "preprocessing": base_prep,
        "version_series": ".".join(_versions()["smd-dist"].split(".")[:2]),
        "store": config.redact(str(store.path)),
        "reps": [r.rep_id for r in chosen],
        "metrics": [m.name for m in metric_objs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    n_pairs = len(chosen) * (len(chosen) - 1) // 2
    if output is not None:
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
            with (
                _quiet_connection_loss(),
                _client_context(client, cluster, security) as active,
                _scheduler_loss_is_an_error(active, output_path),
            ):
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
def _client_context(client, cluster_config, security=None):
    if client is not None:
        yield client
        return
    from smd_dist.engine.clusters import make_client

    with make_client(cluster_config, security=security) as made:
        yield made


class _QuietConnectionLoss(logging.Filter):
    """Drops the Dask client's tracebacks about a lost scheduler connection: the run
    reports the loss itself, in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.until = float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if time.monotonic() > self.until:
            return True
        if record.getMessage().startswith("Failed to reconnect"):
            return False
        from asyncio import CancelledError as AsyncCancelled
        from concurrent.futures import CancelledError

        err = record.exc_info[1] if record.exc_info else None
        while err is not None:
            # The lost connection, or the client's tasks cancelled as it closes after it.
            if isinstance(err, OSError | CancelledError | AsyncCancelled):
                return False
            err = err.__cause__ or err.__context__
        return True


def _connection_lost(client, err: BaseException) -> bool:
    from asyncio import CancelledError as AsyncCancelled
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    if isinstance(err, CommClosedError):
        return True
    return isinstance(err, CancelledError | AsyncCancelled) and client.status != "running"


@contextlib.contextmanager
def _quiet_connection_loss():
    """While a run uses its client (and closes it): see :class:`_QuietConnectionLoss`."""
    quiet = _QuietConnectionLoss()
    log = logging.getLogger("distributed.client")
    log.addFilter(quiet)
    lost = False
    try:
        yield
    except SchedulerLostError:
        # The lost client's tasks may still be winding down, and logging: a minute more.
        lost, quiet.until = True, time.monotonic() + 60
        raise
    finally:
        if not lost:
            log.removeFilter(quiet)


@contextlib.contextmanager
def _scheduler_loss_is_an_error(client, output: Path | None):
    """Turn the Dask scheduler's going away mid-run into :class:`SchedulerLostError`,
    one line that says a rerun resumes (the pairs finished before are in the output)."""
    try:
        yield
    except Exception as err:
        if not _connection_lost(client, err):
            raise
        where = client.scheduler.address if client.scheduler else "?"
        kept = (f"the pairs finished before are kept in {str(output)!r}: rerun the same "
                "command to resume" if output is not None
                else "nothing was kept (output=None): rerun")
        raise SchedulerLostError(
            f"lost the connection to the Dask scheduler {where} mid-run; {kept}"
        ) from None


def _sources(store, chosen, preps) -> list[tasks.RepSource]:
    """Each selected rep's :class:`RepSource` (by index into ``chosen``)."""
    options = json.dumps(store.storage_options, sort_keys=True) if store.storage_options else ""
    return [
        tasks.RepSource(str(store.path), r.model, r.layer, r.content_hash, tuple(preps),
                        storage_options=options)
        for r in chosen
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
        tasks.check_rep,
        [sources[i] for i in involved],
        [tasks.KEEP_PREPARED_FRACTION] * len(involved),
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
    need = planning.pair_memory_bytes(n_stimuli, a.n_neurons, b.n_neurons)
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
    batches = planning.plan_tasks(
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
            tasks.compare_pairs,
            ids,
            {chosen[i].rep_id: sources[i] for i in reps_in},
            specs,
            device,
            tasks.KEEP_PREPARED_FRACTION,
            key=f"pairs-{task[0][0]}-{task[0][1]}-{len(task)}-{token}",
        )

    hashes = {r.rep_id: r.content_hash for r in chosen}
    buffer: list[PairRecord] = []
    last_flush = time.monotonic()
    pending: dict = {}
    queue = list(reversed(batches))
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
        "store": config.redact(str(store.path)),
        "store_hashes": json.dumps({r.rep_id: r.content_hash for r in chosen}),
        "n_stimuli": int(store.n_stimuli or 0),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Recorded for provenance, without the tokens and passwords a config may hold.
        "run_config": json.dumps(config.redact(run_config or {}), default=str),
    }


def output_status(path: str | os.PathLike) -> dict:
    """Progress of an output: pairs done and failed, from the ledger; who holds it."""
    out = ResultsOutput(_resolved(path))
    header = out.header()
    latest, incomplete, _ = out.records(on_corrupt="raise")
    summary = summarize(latest.values())
    pairs = {(record.rep_a, record.rep_b) for record in latest.values()}
    info_path = Path(f"{out.path}.lock.json")
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
