"""The all-pairs run: :func:`compute_distances`, from a selection to the labeled matrix.

Data flow: the reps are selected (:mod:`~smd_dist.engine.selection`), read, checked and
prepared on the workers (:mod:`~smd_dist.engine.tasks`, each worker keeping what it
prepared, :mod:`~smd_dist.engine.worker_cache`); blocks of the matrix, planned by
:mod:`~smd_dist.engine.planning`, run the metric kernels; the client collects their
arrays as they finish and appends them to the output's ledger every ``flush-seconds``
(:mod:`~smd_dist.engine.dispatch`, :mod:`~smd_dist.engine.ledger`). What is done, and the
labeled matrix at the end, come from the ledger's columns
(:mod:`~smd_dist.engine.assembly`). The engine knows nothing of solvers' internals.
"""

from __future__ import annotations

import contextlib
import functools
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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from smd_dist import config
from smd_dist.engine import assembly, dispatch, planning, tasks
from smd_dist.engine import settings as settings_module
from smd_dist.engine.against import check_same_stimuli, rectangle, resolve_against
from smd_dist.engine.ledger import LedgerRead, Records
from smd_dist.engine.output import OUTPUT_FORMAT, OutputError, ResultsOutput, resolved_path
from smd_dist.engine.selection import InputError, metric_specs, resolve_metrics, select_reps
from smd_dist.engine.settings import engine_settings
from smd_dist.store import locking

__all__ = [
    "OutputLockedError",
    "RunInterrupted",
    "RunPlan",
    "RunReport",
    "SchedulerLostError",
    "compute_distances",
    "current_client",
    "plan_run",
]


class OutputLockedError(OutputError):
    """Another run holds the output."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run. What it saved stays in the output; the same call (or
    command) again computes only the rest.

    Attributes
    ----------
    n_saved, n_pairs : int
        Pairs in the output, of the run's total.
    output : str or None
    """

    def __init__(self, n_saved: int, n_pairs: int, output: str | None):
        self.n_saved, self.n_pairs, self.output = n_saved, n_pairs, output
        where = f"{n_saved} of {n_pairs} pairs saved" if output else "output=None: nothing saved"
        super().__init__(f"interrupted: {where}; run the same command again to resume")


class SchedulerLostError(ConnectionError):
    """The Dask scheduler went away mid-run; the pairs finished before it are kept."""


@dataclass
class RunReport:
    """What a run did: counts, failures, what it skipped or repaired, and where time went.

    ``seconds`` is the whole call; of it, ``seconds_inputs`` read, checked and prepared
    the reps, ``seconds_pairs`` computed the pairs (submission to the last result), and
    ``seconds_finish`` assembled and wrote the labeled matrices. ``n_saved`` counts the
    pairs this run wrote to the output so far (kept up to date while it runs).
    """

    n_reps: int
    n_pairs: int
    n_done_before: int
    n_computed: int = 0
    n_records_written: int = 0
    n_saved: int = 0
    failed: list[str] = field(default_factory=list)
    incomplete_parts: list[str] = field(default_factory=list)
    corrupt_parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_inputs: float = 0.0
    seconds_pairs: float = 0.0
    seconds_finish: float = 0.0


@dataclass(frozen=True)
class RunPlan:
    """What a run would do, found without computing or writing anything
    (:func:`plan_run`, ``smd-dist run --dry-run``).

    Attributes
    ----------
    store, output : str
    reps, metrics : tuple of str
        In matrix order (the store's: models as written, each model's layers in depth
        order); ``reps`` are the matrix's rows (``rep_a``).
    against : str or None
        A rectangular run's second store (the run's own when its selection is in the
        same store); ``None`` for an all-pairs run.
    against_reps : tuple of str
        A rectangular run's columns (``rep_b``), in their store's order.
    n_pairs, n_done, n_todo : int
        Pairs of the selection; of them, already in the output; left to compute.
    output_state : str
        ``"new"``, ``"resumes"``, ``"empty: takes this run's settings"``,
        ``"discarded (fresh)"`` or ``"incompatible: ..."`` (the run would be refused).
    largest_pair : tuple of str
        The pair left to compute that needs the most memory (``largest_pair_bytes``), or
        ``()``.
    largest_pair_bytes : int
        Memory one worker thread needs to solve it, estimated
        (:func:`~smd_dist.engine.planning.pair_memory_bytes`).
    median_pair_bytes : int
        The same for the median pair left to compute.
    cluster : dict
        The cluster section, checked, with the defaults filled in.
    """

    store: str
    output: str | None
    reps: tuple[str, ...]
    metrics: tuple[str, ...]
    n_pairs: int
    n_done: int
    n_todo: int
    output_state: str
    largest_pair: tuple[str, ...]
    largest_pair_bytes: int
    median_pair_bytes: int
    cluster: dict
    against: str | None = None
    against_reps: tuple[str, ...] = ()


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


@contextlib.contextmanager
def _output_lock(path: Path):
    """Hold ``<output>.lock`` for the run (an OS lock: a killed run releases it), on the
    output's resolved path, with who holds it in ``<output>.lock.json``; when the run ends,
    however it ends, both files go (:func:`smd_dist.store.locking.held` with ``remove``)."""
    path = resolved_path(path)
    lock_path = Path(f"{path}.lock")
    info_path = Path(f"{path}.lock.json")
    with contextlib.ExitStack() as stack:
        for attempt in range(3):
            try:
                stack.enter_context(
                    locking.held(lock_path, timeout=0, what=f"output {str(path)!r}", remove=True)
                )
                break
            except locking.LockTimeout:
                if lock_path.exists() or attempt == 2:  # else: released and removed meanwhile
                    holder = ""
                    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                        info = json.loads(info_path.read_text())
                        holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
                    raise OutputLockedError(
                        f"output {str(path)!r} is being written by another run{holder}; wait "
                        "for it to finish or use another output path"
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


@functools.cache
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
    """Stands in for an output when ``output=None``: the run's records stay in memory."""

    def __init__(self):
        self.dropped: dict = {}

    def append(self, records: Records) -> None:
        """Nothing to write: the run keeps what it appended."""


@dataclass
class _Setup:
    """A run's arguments, checked, and what follows from them before any compute.

    ``chosen`` are the run's distinct reps. An all-pairs run compares every pair of them
    (``rows``, ``cols``, ``wanted`` and ``stores`` are None: one store, every rep on both
    axes); a rectangular run only the pairs of ``wanted``, with the first selection
    (``rows``, indices into ``chosen``) against the second (``cols``), each rep read from
    its store in ``stores``.
    """

    store: object
    chosen: list
    layer_index: list
    metric_objs: list
    base_prep: dict
    dropping: bool
    specs: list
    preps_needed: list
    header: dict
    defaults: dict
    n_pairs: int
    device: str | None
    settings: dict
    output: Path | None
    cluster: dict
    against: object = None
    stores: list | None = None
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    wanted: np.ndarray | None = None


def _layer_index(records) -> dict:
    """``rep_id -> position of its layer in its model`` over a store's records."""
    return dict(zip((r.rep_id for r in records), assembly.layer_positions(records), strict=True))


def _setup(
    store,
    *,
    reps,
    against,
    metrics,
    output,
    center,
    normalize,
    constant_neurons,
    device,
    engine,
    cluster,
    flags,
) -> _Setup:
    """Check every argument of a run and select its reps and metrics; read only the store's
    records. Everything wrong is found here, before a cluster starts or a file is written.

    Raises
    ------
    smd_dist.config.ConfigError
        A setting of the wrong type or out of range, an unknown key.
    InputError
        Unknown reps or metrics, an empty selection, or an ``against`` store whose
        stimuli differ from the run's store's.
    smd_dist.store.StoreError
        No store at the path.
    """
    from smd_dist.engine.clusters import resolve_config
    from smd_dist.store.activation_store import ActivationStore

    for name, value in flags.items():
        settings_module.flag(name, value)
    settings = engine_settings(engine)
    base_prep = settings_module.preprocessing(center, normalize, constant_neurons)
    device = settings_module.device_option(device)
    cluster_cfg = resolve_config(cluster)
    if output is not None:
        if not isinstance(output, str | os.PathLike) or "://" in str(output):
            raise config.ConfigError(
                f"output must be a local folder path, got {output!r} (URLs are not supported "
                "for outputs; stores may be URLs)"
            )
        output = resolved_path(output)
    if reps is not None and not (
        isinstance(reps, str)
        or (isinstance(reps, Sequence) and all(isinstance(r, str) for r in reps))
    ):
        raise config.ConfigError(
            f"reps must be a pattern or a list of patterns ('model/layer', a model name, "
            f"globs), got {reps!r}"
        )
    if not isinstance(metrics, str) and not (
        isinstance(metrics, Sequence) and all(isinstance(m, str) for m in metrics)
    ):
        raise config.ConfigError(f"metrics must be a name or a list of names, got {metrics!r}")
    metric_objs = resolve_metrics(metrics)
    if not isinstance(store, ActivationStore):
        if not isinstance(store, str | os.PathLike):
            raise config.ConfigError(
                f"store must be an ActivationStore or its path, got {type(store).__name__}"
            )
        store = ActivationStore(str(store), mode="r")
    records = store.list()
    chosen = select_reps(records, reps, min_reps=1 if against is not None else 2)
    other = resolve_against(store, against)
    layer_index = _layer_index(records)
    shape: dict = {"n_pairs": len(chosen) * (len(chosen) - 1) // 2}
    if other is not None:
        check_same_stimuli(store, chosen, other)
        rect = rectangle(store, chosen, other)
        wanted = assembly.wanted_pairs(len(rect.reps), rect.rows, rect.cols)
        shape = {
            "against": other,
            "stores": rect.stores,
            "rows": rect.rows,
            "cols": rect.cols,
            "wanted": wanted,
            "n_pairs": int(np.count_nonzero(np.triu(wanted, 1))),
        }
        other_index = layer_index if other.same_store else _layer_index(other.store.list())
        indices = [
            layer_index[r.rep_id] if k < len(chosen) else other_index[r.rep_id]
            for k, r in enumerate(rect.reps)
        ]
        chosen = rect.reps
    else:
        indices = [layer_index[r.rep_id] for r in chosen]
    specs = metric_specs(metric_objs, base_prep)
    header = {
        "format": OUTPUT_FORMAT,
        "preprocessing": base_prep,
        "version_series": ".".join(_versions()["smd-dist"].split(".")[:2]),
        "store": config.redact(str(store.path)),
        "reps": [r.rep_id for r in chosen],
        "metrics": [m.name for m in metric_objs],
        "metric_options": {name: options for name, _, options in specs},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if other is not None:
        header["reps"] = [chosen[k].rep_id for k in shape["rows"].tolist()]
        header["against"] = {
            "store": None if other.same_store else config.redact(str(other.store.path)),
            "reps": [r.rep_id for r in other.chosen],
            "n_pairs": shape["n_pairs"],
        }
    return _Setup(
        store=store,
        chosen=chosen,
        layer_index=indices,
        metric_objs=metric_objs,
        base_prep=base_prep,
        dropping=base_prep.get("constant_neurons") == "drop",
        specs=specs,
        preps_needed=sorted({p for _, p, _ in specs}),
        header=header,
        defaults={m.name: dict(m.options) for m in metric_objs},
        device=device,
        settings=settings,
        output=output,
        cluster=cluster_cfg,
        **shape,
    )


def current_client():
    """Dask's current client (the last one made, or the one in a ``with`` block), or None.

    Dask libraries run on the client the user made (``distributed.Client.current``); this
    never imports distributed where nothing has, since no client can exist then.
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Client

    try:
        return Client.current(allow_global=True)
    except ValueError:
        return None


# -- the run ------------------------------------------------------------------------------
def compute_distances(
    store,
    *,
    reps: Sequence[str] | str | None = None,
    against=None,
    metrics: Sequence[str] | str = ("soft_matching",),
    output: str | os.PathLike | None = None,
    client=None,
    resume: bool = True,
    fresh: bool = False,
    center: bool | None = None,
    normalize: str | None = "default",
    constant_neurons: str | None = None,
    device: str | None = None,
    cluster: dict | None = None,
    progress: bool = True,
    run_config: dict | None = None,
    report: RunReport | None = None,
    engine: dict | None = None,
    security=None,
) -> xr.Dataset:
    """Compare every pair of selected representations (or every rep of one selection
    with every rep of another, ``against``); return the labeled matrices.

    For each metric ``m`` and reps ``a``, ``b`` (arrays of shape (stimuli, neurons)),
    the entry ``m[a, b]`` is ``m(prep(X_a), prep(X_b))``, e.g. the soft matching distance

    .. math::

        d(X, Y) = \\sqrt{\\min_{P \\ge 0,\\ P\\mathbf 1 = 1/N_x,\\ P^\\top \\mathbf 1 = 1/N_y}
                  \\sum_{ij} P_{ij} \\lVert x_i - y_j \\rVert^2}.

    Every argument is checked, and the reps and metrics selected, before a cluster starts
    or a file is written. A script that calls this at its top level must do so under
    ``if __name__ == "__main__":`` (the local cluster's worker processes import the
    script again); it is refused otherwise (:class:`~smd_dist.engine.clusters.MainGuardError`).

    Parameters
    ----------
    store : ActivationStore or str
        The activation store (or its path).
    reps : sequence of str, optional
        ``"model/layer"`` ids, model names or glob patterns; all reps by default. The
        matrix keeps the store's order (models as written, layers in depth order).
    against : str, sequence of str, mapping, ActivationStore or path-like, optional
        A second selection: the matrix is then ``reps`` (rows, ``rep_a``) against it
        (columns, ``rep_b``), e.g. models against brain areas. Rep patterns (a string or
        a list of strings) select in ``store``; another store is an ``ActivationStore``
        (a URL store with its ``storage_options``), a ``pathlib.Path``, or a mapping
        ``{"store": path or URL, "reps": patterns}`` (all its reps without ``reps``),
        as in a run config's ``against:``. The other store must hold the same stimuli
        in the same order (refused before anything runs otherwise). A rep in both
        selections of one store meets itself (the identity value) and each pair is
        computed once. ``None`` (default): every pair of ``reps``. An output keeps the
        ``against`` store it was made with.
    metrics : sequence of str
        Names from :func:`smd_dist.metrics.available`.
    output : path, optional
        Folder for the results (zarr) on a local or network file system, not a URL (the
        run locks it, on its resolved path). Pairs are written as they finish; with
        ``resume`` a rerun computes only what is missing or failed. ``None`` keeps
        everything in memory.
    client : distributed.Client, optional
        Run on this client. Without one: Dask's current client if there is one (and
        ``cluster`` is not given), else a cluster started from ``cluster`` for this run
        (:func:`smd_dist.engine.clusters.make_client`; a local cluster by default).
    resume : bool
        Reuse finished pairs found in ``output``.
    fresh : bool
        Discard an existing output at ``output`` first, results and all
        (``smd-dist run --fresh``). A folder that is not an smd-dist output is never
        deleted.
    center, normalize :
        Preprocessing applied once per rep (defaults from the ``smd-dist.preprocessing``
        config): centre each neuron over stimuli; ``None``, ``"unit"`` or ``"zscore"``.
    constant_neurons : {"refuse", "drop"}, optional
        Neurons constant over the stimuli (dead units; default from the config,
        ``"refuse"``): refuse reps whose normalisation would divide by them, or ``"drop"``
        them from every rep before any metric (the count per rep is in the coordinates
        ``n_constant_dropped_a``/``_b``). An output keeps the setting it was made with.
    device : str, optional
        Torch device for the kernels on workers: ``"cpu"``, ``"cuda"``,
        ``"cuda:<index>"`` (``None``: CUDA where present).
    cluster : dict, optional
        A run config's ``cluster:`` section (see :mod:`smd_dist.engine.clusters`).
    progress : bool
        Print the cluster, the dashboard link and a progress bar (pairs done/total,
        rate, ETA). ``False`` prints nothing.
    run_config : dict, optional
        The run config, recorded in the output's attributes with its secrets replaced
        by ``***`` (:func:`smd_dist.config.redact`).
    report : RunReport, optional
        Filled in with counts, failures and repairs, as the run goes.
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
        See :func:`smd_dist.engine.assembly.assemble`; attrs hold the metric definitions,
        preprocessing, package versions, the store's content hashes (of the rows' reps),
        the run config, and for a rectangular run ``against_store`` and
        ``against_hashes`` (of the columns' reps).

    Raises
    ------
    smd_dist.config.ConfigError
        An argument or setting of the wrong type or value, found before anything runs.
    InputError
        Unknown reps or metrics, an empty selection, an ``against`` store with other
        stimuli, or reps that cannot be compared (NaN, too few stimuli or neurons,
        constant neurons under normalisation), found before any pair is computed.
    OutputError
        The output is locked by another run, incompatible, not writable or too small.
    RunInterrupted
        Ctrl-C: the pairs finished so far are saved; the same call again resumes.
    SchedulerLostError
        The Dask scheduler went away mid-run; what finished is in the output.
    """
    started = time.perf_counter()
    report = report if report is not None else RunReport(0, 0, 0)
    if run_config is not None and not isinstance(run_config, dict):
        raise config.ConfigError(f"run_config must be a mapping, got {run_config!r}")
    if not isinstance(report, RunReport):
        raise config.ConfigError(f"report must be a RunReport, got {report!r}")
    if client is None and cluster is None:
        client = current_client()
    setup = _setup(
        store,
        reps=reps,
        against=against,
        metrics=metrics,
        output=output,
        center=center,
        normalize=normalize,
        constant_neurons=constant_neurons,
        device=device,
        engine=engine,
        cluster=cluster,
        flags={"resume": resume, "fresh": fresh, "progress": progress},
    )
    report.n_reps, report.n_pairs = len(setup.chosen), setup.n_pairs
    report.n_computed = report.n_records_written = report.n_saved = 0
    if client is None and setup.cluster["kind"] == "local":
        from smd_dist.engine.clusters import refuse_unguarded_main

        refuse_unguarded_main()
    try:
        ds = _compute(setup, client, report, resume=resume, fresh=fresh, progress=progress,
                      run_config=run_config, security=security)
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, RunInterrupted):
            raise
        output = None if setup.output is None else str(setup.output)
        raise RunInterrupted(
            report.n_done_before + report.n_saved, setup.n_pairs, output
        ) from None
    report.seconds = time.perf_counter() - started
    return ds


def plan_run(
    store,
    *,
    reps: Sequence[str] | str | None = None,
    against=None,
    metrics: Sequence[str] | str = ("soft_matching",),
    output: str | os.PathLike | None = None,
    resume: bool = True,
    fresh: bool = False,
    center: bool | None = None,
    normalize: str | None = "default",
    constant_neurons: str | None = None,
    device: str | None = None,
    cluster: dict | None = None,
    engine: dict | None = None,
) -> RunPlan:
    """What :func:`compute_distances` with these arguments would do; nothing is computed,
    started or written (``smd-dist run --dry-run``).

    Every argument is checked as the run would check it; the reps' data are not read
    (the run checks them on the workers, before any pair).

    Returns
    -------
    RunPlan

    Raises
    ------
    As :func:`compute_distances`, before it would compute.
    """
    from smd_dist.engine.clusters import KIND_KEYS

    setup = _setup(
        store,
        reps=reps,
        against=against,
        metrics=metrics,
        output=output,
        center=center,
        normalize=normalize,
        constant_neurons=constant_neurons,
        device=device,
        engine=engine,
        cluster=cluster,
        flags={"resume": resume, "fresh": fresh},
    )
    state, before = "new", Records.empty()
    if setup.output is not None:
        out = ResultsOutput(setup.output)
        problem = out.incompatibility(setup.header, defaults=setup.defaults)
        if not out.exists():
            state = "new"
        elif fresh:
            state = "discarded (fresh)"
        else:
            before = out.read(on_corrupt="skip").records.latest()
            if problem is None:
                state = "resumes"
            elif out.holds_results():
                state = f"incompatible: {problem}"
            else:
                state = "empty: takes this run's settings"
    if not resume or state != "resumes":
        before = Records.empty()
    chosen = setup.chosen
    names = [m.name for m in setup.metric_objs]
    a, b = assembly.pending_pairs(assembly.done_pairs(before, chosen, names), setup.wanted)
    sizes = _pair_bytes(setup.store, chosen, a, b)
    order = np.lexsort((b, a, sizes))
    largest = int(order[-1]) if a.size else None
    other = setup.against
    return RunPlan(
        store=str(setup.store.path),
        output=None if setup.output is None else str(setup.output),
        reps=tuple(setup.header["reps"]),
        metrics=tuple(m.name for m in setup.metric_objs),
        n_pairs=setup.n_pairs,
        n_done=setup.n_pairs - int(a.size),
        n_todo=int(a.size),
        output_state=state,
        largest_pair=() if largest is None else (chosen[a[largest]].rep_id,
                                                 chosen[b[largest]].rep_id),
        largest_pair_bytes=0 if largest is None else int(sizes[largest]),
        median_pair_bytes=int(sizes[order[a.size // 2]]) if a.size else 0,
        cluster={k: v for k, v in setup.cluster.items()
                 if k == "kind" or k in KIND_KEYS[setup.cluster["kind"]]},
        against=None if other is None else str(other.store.path),
        against_reps=() if other is None else tuple(r.rep_id for r in other.chosen),
    )


def _compute(
    setup: _Setup, client, report: RunReport, *, resume, fresh, progress, run_config, security
):
    """The run proper: lock and open the output, compute what is missing, assemble."""
    store, chosen, metric_objs = setup.store, setup.chosen, setup.metric_objs
    n_pairs = setup.n_pairs
    if setup.output is not None:
        cells = len(chosen) ** 2 if setup.rows is None else setup.rows.size * setup.cols.size
        needed = 600 * n_pairs * len(metric_objs) + 64 * cells * len(metric_objs) + 2**20
        _check_output_writable(setup.output, 2 * needed)
        lock = _output_lock(setup.output)
    else:
        lock = contextlib.nullcontext()
    with lock, _gc_frozen():
        if setup.output is not None:
            sink = ResultsOutput(setup.output)
            if fresh:
                sink.discard()
            sink.initialise(setup.header, defaults=setup.defaults)
            read = sink.read(on_corrupt="quarantine")
        else:
            sink = _MemorySink()
            read = LedgerRead(Records.empty(), (), (), (), False)
        names = [m.name for m in metric_objs]
        before = read.records.latest() if resume else Records.empty()
        a, b = assembly.pending_pairs(
            assembly.done_pairs(before, chosen, names), setup.wanted
        )
        report.n_done_before = n_pairs - int(a.size)
        report.incomplete_parts = list(read.incomplete)
        report.corrupt_parts = list(read.corrupt)
        for message in read.corrupt:
            warnings.warn(f"smd-dist: quarantined, pairs recomputed: {message}", stacklevel=3)
        written: list[Records] = []
        if a.size:
            with (
                _quiet_connection_loss(),
                _client_context(
                    client, _layout(setup, a, b), quiet=not progress, security=security
                ) as active,
                _scheduler_loss_is_an_error(active, setup.output),
            ):
                if progress and client is not None:  # make_client prints it for its own
                    print(
                        f"smd-dist: using the Dask client of {active.scheduler.address}; "
                        f"dashboard {active.dashboard_link}",
                        file=sys.stderr,
                    )
                phase = time.perf_counter()
                sources = _sources(setup.stores or store, chosen, setup.preps_needed)
                token = dask.base.tokenize(str(store.path), setup.preps_needed, time.time_ns())
                threads = max(sum(active.nthreads().values()), 1)
                dropped = _check_inputs(
                    active, chosen, np.union1d(a, b), sources, token=token, threads=threads
                )
                if setup.dropping:
                    _record_dropped(sink, setup.header, setup.defaults, chosen, dropped)
                _check_memory(active, store, chosen, a, b)
                report.seconds_inputs = time.perf_counter() - phase
                phase = time.perf_counter()
                written = dispatch.run_blocks(
                    active,
                    _plan(chosen, a, b, setup.settings, threads),
                    sources,
                    setup.specs,
                    setup.device,
                    sink,
                    dispatch.ResultBuffer(chosen, names),
                    progress=progress,
                    already=n_pairs - int(a.size),
                    total=n_pairs,
                    settings=setup.settings,
                    token=token,
                    report=report,
                )
                report.seconds_pairs = time.perf_counter() - phase
        phase = time.perf_counter()
        final = Records.concat([read.records, *written]).latest()
        attrs = _dataset_attrs(setup, run_config)
        counts = _known_dropped(sink, chosen) if setup.dropping else None
        ds = assembly.assemble(
            final,
            chosen,
            metric_objs,
            rows=setup.rows,
            cols=setup.cols,
            attrs=attrs,
            layer_index=setup.layer_index,
            constant_dropped=counts,
        )
        failures = assembly.failures(final, chosen, names, setup.wanted)
        ds.attrs["n_failed_pairs"] = len(failures)
        ds.attrs["failed_pairs"] = failures
        report.failed = failures
        if setup.output is not None:
            sink.write_dataset(ds)
            parts = sink.ledger.part_names()
            if written or read.old_layout or len(parts) > 1:
                sink.ledger.compact(final, replaces=parts)
            sink.consolidate()
        report.seconds_finish = time.perf_counter() - phase
    return ds


def _layout(setup: _Setup, a, b) -> dict:
    """The run's cluster config, a local cluster's layout decided by the pairs to compute
    (:func:`smd_dist.engine.clusters.local_layout`)."""
    if setup.cluster["kind"] != "local":
        return setup.cluster
    from smd_dist.engine.clusters import GIL_BOUND_ENTRIES, local_layout

    widths = np.array([r.n_neurons for r in setup.chosen], dtype=np.int64)
    small = int(np.count_nonzero(widths[a] * widths[b] < GIL_BOUND_ENTRIES))
    return local_layout(setup.cluster, gil_bound_pairs=small)


def _plan(chosen, a, b, settings: dict, threads: int) -> list:
    """The pairs ``(a[k], b[k])`` (matrix order) as blocks, each pair in solve order: the
    rep whose id sorts first (then its content hash: two stores may hold the same id) is
    solved as the first argument, whatever the matrix order, so a value is the same bits
    in every run, resumed, reordered or not."""
    keys = sorted(range(len(chosen)), key=lambda k: (chosen[k].rep_id, chosen[k].content_hash))
    rank = np.empty(len(chosen), dtype=np.int64)
    rank[keys] = np.arange(len(chosen))
    swap = rank[a] > rank[b]
    first, second = np.where(swap, b, a), np.where(swap, a, b)
    return planning.plan_blocks(
        [r.n_neurons for r in chosen],
        first,
        second,
        task_entries=settings["task-entries"],
        max_pairs=settings["max-pairs-per-task"],
        min_tasks=4 * threads,
    )


@contextlib.contextmanager
def _client_context(client, cluster_config, *, quiet: bool = False, security=None):
    if client is not None:
        yield client
        return
    from smd_dist.engine.clusters import make_client

    with make_client(cluster_config, quiet=quiet, security=security) as made:
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
    """Each selected rep's :class:`RepSource` (by index into ``chosen``); ``store`` is the
    store of them all, or a list of each one's (a rectangular run across two stores)."""
    stores = store if isinstance(store, list) else [store] * len(chosen)
    out = []
    for r, where in zip(chosen, stores, strict=True):
        options = where.storage_options
        out.append(tasks.RepSource(
            str(where.path), r.model, r.layer, r.content_hash, tuple(preps),
            storage_options=json.dumps(options, sort_keys=True) if options else "",
        ))
    return out


def _check_inputs(client, chosen, involved, sources, *, token: str, threads: int) -> dict:
    """Read and validate every rep that takes part, on the workers, before any pair.

    Each rep is checked once, by whichever worker is free; that worker keeps it prepared
    (within ``KEEP_PREPARED_FRACTION`` of its memory) for the pairs it later computes.
    Reps are checked in batches of about a quarter of a worker thread's share of the
    neurons (a task per rep would cost the scheduler more than reading small reps).
    Returns the neurons each checked rep (by index) left out as constant.
    """
    from distributed import wait

    # Widest first: the phase ends when its last read does, and a narrow rep read last
    # keeps the other workers' wait for it short.
    involved = sorted(involved.tolist(), key=lambda i: -chosen[i].n_neurons)
    target = sum(chosen[i].n_neurons for i in involved) / (4 * threads)
    batches, batch, size = [], [], 0
    for i in involved:
        batch.append(i)
        size += chosen[i].n_neurons
        if size >= target:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    # One submission for all: each call is a round trip through the scheduler's event
    # loop, which shares the machine with the workers.
    submitted = client.map(
        tasks.check_reps,
        [[sources[i] for i in batch] for batch in batches],
        [tasks.KEEP_PREPARED_FRACTION] * len(batches),
        key=[f"check-{k}-{token}" for k in range(len(batches))],
    )
    wait(submitted)
    # The answers in one round trip (each future.result() would be one).
    answered = [k for k, future in enumerate(submitted) if future.status != "error"]
    answers = dict(zip(answered, client.gather([submitted[k] for k in answered]), strict=True))
    outcome = {}
    for k, (batch, future) in enumerate(zip(batches, submitted, strict=True)):
        failed = None if k in answers else (str(future.exception()), 0)
        for position, i in enumerate(batch):
            outcome[i] = failed or answers[k][position]
        future.release()
    problems = []
    dropped = {}
    for i in sorted(outcome):
        message, n_dropped = outcome[i]
        if message is not None:
            if chosen[i].rep_id not in message:
                message = f"{chosen[i].rep_id}: {message}"
            problems.append(message)
        else:
            dropped[i] = n_dropped
    if problems:
        raise InputError(
            f"{len(problems)} representation(s) cannot be compared; nothing was computed:\n  "
            + "\n  ".join(problems)
        )
    return dropped


def _record_dropped(sink, header, defaults, chosen, dropped) -> None:
    """Keep each checked rep's count of constant neurons, with its content hash, in the
    output's header (an in-memory run keeps it on the sink): a resumed run that checks
    no rep still labels every rep. Entries are read back by hash
    (:func:`_known_dropped`); a rep whose id an earlier rep of the run has (two stores)
    is keyed ``id@hash``."""
    first = {}
    for k, r in enumerate(chosen):
        first.setdefault(r.rep_id, k)
    counts = {
        (r.rep_id if first[r.rep_id] == i else f"{r.rep_id}@{r.content_hash}"):
            [r.content_hash, n]
        for i, n in dropped.items()
        for r in (chosen[i],)
    }
    if isinstance(sink, _MemorySink):
        sink.dropped.update(counts)
        return
    known = sink.header().get("constant_dropped", {})
    sink.initialise({**header, "constant_dropped": {**known, **counts}}, defaults=defaults)


def _known_dropped(sink, chosen) -> list[int]:
    """Per rep: the constant neurons dropped, -1 for a rep whose content was not checked."""
    known = sink.dropped if isinstance(sink, _MemorySink) else sink.header().get(
        "constant_dropped", {}
    )
    by_hash = {content: int(n) for content, n in known.values()}
    return [by_hash.get(r.content_hash, -1) for r in chosen]


def _check_memory(client, store, chosen, a, b) -> None:
    """Refuse pairs that cannot fit in one worker thread's share of its process's memory,
    before compute (the threads of a worker solve their pairs at the same time)."""
    workers = client.scheduler_info()["workers"].values()
    limits = [(w.get("memory_limit") or 0) // (w.get("nthreads") or 1) for w in workers]
    limit = min((m for m in limits if m), default=0)
    if not limit:
        return
    sizes = _pair_bytes(store, chosen, a, b)
    # By the estimate, not by N_a·N_b: a pair just below the blocked path's threshold
    # needs more than one just above it.
    worst = int(np.argmax(sizes))
    ra, rb = chosen[a[worst]], chosen[b[worst]]
    need = int(np.max(sizes))
    if need > 0.7 * limit:
        raise InputError(
            f"pair {ra.rep_id} ({ra.n_neurons} neurons) vs {rb.rep_id} ({rb.n_neurons} "
            f"neurons) needs about {need / 2**30:.2f} GiB to solve exactly, worker threads "
            f"have {limit / 2**30:.2f} GiB each (a worker's memory limit over its threads); "
            "remedies: pool the layer at extraction (pooling='mean'), give workers more "
            "memory (cluster.memory-limit, or fewer workers or threads per node), or leave "
            "these reps out (reps: ...)"
        )


def _pair_bytes(store, chosen, a, b) -> np.ndarray:
    """Memory one worker thread needs for each pair ``(a[k], b[k])``
    (:func:`~smd_dist.engine.planning.pair_memory_bytes`)."""
    widths = np.array([r.n_neurons for r in chosen], dtype=np.int64)
    return planning.pair_memory_bytes(store.n_stimuli or 0, widths[a], widths[b])


def _dataset_attrs(setup: _Setup, run_config) -> dict:
    store, metric_objs, prep = setup.store, setup.metric_objs, setup.base_prep
    chosen = setup.chosen
    if setup.rows is not None:
        chosen = [setup.chosen[k] for k in setup.rows.tolist()]
    # Structured attributes are JSON strings: netCDF takes only flat values.
    attrs = {
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
    if setup.against is not None:
        attrs["against_store"] = config.redact(str(setup.against.store.path))
        attrs["against_hashes"] = json.dumps(
            {setup.chosen[k].rep_id: setup.chosen[k].content_hash for k in setup.cols.tolist()}
        )
    return attrs
