"""What runs on a worker: read and prepare reps, compare the pairs of one block.

Block tasks name their reps (:class:`RepSource`) and never carry their data: each worker
reads and prepares a rep once and keeps the :class:`~smd_dist.kernel.prepared.PreparedRep`
within a share of its memory (:mod:`smd_dist.engine.worker_cache`). A block returns arrays
over its pairs (:class:`BlockResult`), never an object per pair. A failure on one pair is
recorded with the pair, never raised, so the run goes on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from smd_dist import metrics as metric_registry
from smd_dist.engine.selection import InputError
from smd_dist.store.activation_store import rep_id

__all__ = [
    "KEEP_PREPARED_FRACTION",
    "BlockResult",
    "RepSource",
    "check_rep",
    "check_reps",
    "compare_block",
    "prepare_rep",
]

#: Each worker keeps the reps it has prepared (:mod:`smd_dist.engine.worker_cache`) within
#: this fraction of its memory limit; beyond it, the least recently used are read again.
KEEP_PREPARED_FRACTION = 0.25


@dataclass(frozen=True)
class RepSource:
    """Where a pair task finds one rep: the store, the rep and its content hash at the
    start of the run, and the preprocessings it needs (a few hundred bytes in the graph).
    A store at a URL also carries its fsspec ``storage_options`` (JSON; kept out of the
    repr, as they may hold credentials)."""

    store: str
    model: str
    layer: str
    content_hash: str
    preps: tuple[str, ...]
    storage_options: str = field(default="", repr=False)

    @property
    def rep_id(self) -> str:
        return rep_id(self.model, self.layer)


def _read_rep(source: RepSource) -> np.ndarray:
    """The rep's values with the content hash the run started with, hashed as read."""
    from smd_dist.store import ActivationStore
    from smd_dist.store.activation_store import RepChangedError

    options = json.loads(source.storage_options) if source.storage_options else None
    store = ActivationStore(source.store, mode="r", storage_options=options)
    try:
        return store.read(source.model, source.layer, content_hash=source.content_hash)
    except RepChangedError as err:
        raise InputError(f"{source.rep_id} changed in the store during the run: {err}") from err


def prepare_rep(source: RepSource) -> dict:
    """Read one rep and make a :class:`~smd_dist.kernel.prepared.PreparedRep` for each
    preprocessing it needs; keyed by prep key."""
    from smd_dist.kernel.allocator import reuse_freed_memory
    from smd_dist.kernel.prepared import prepare

    reuse_freed_memory()
    array = _read_rep(source)
    prepared = {}
    for key in source.preps:
        try:
            prepared[key] = prepare(array, **json.loads(key), name=source.rep_id)
        except ValueError as err:
            raise InputError(f"{source.rep_id} (shape {array.shape}): {err}") from err
    return prepared


def _prepared(source: RepSource, keep_fraction: float) -> dict:
    """The rep's prepared values: kept by this worker, or read and prepared now."""
    from smd_dist.engine import worker_cache

    return worker_cache.kept(
        source,
        lambda: prepare_rep(source),
        budget=int(keep_fraction * worker_cache.memory_limit()),
    )


def check_rep(source: RepSource, keep_fraction: float) -> tuple[str | None, int]:
    """Validate one rep as a pair task would see it (and keep it, within the budget).

    Returns what is wrong with it (``None`` when nothing is), and how many of its neurons
    were left out as constant over the stimuli (the same for every preprocessing:
    ``constant_neurons="drop"`` applies to all of them). A bad rep is an answer here, not a
    task error: Dask would log each failed task with its traceback on the worker.
    """
    try:
        prepared = _prepared(source, keep_fraction)
    except ValueError as err:  # InputError, StoreError, CorruptStoreError
        return str(err), 0
    return None, max((int(rep.dropped.size) for rep in prepared.values()), default=0)


def check_reps(sources: list, keep_fraction: float) -> list[tuple[str | None, int]]:
    """:func:`check_rep` on each of ``sources`` (a batch: one task checks many small reps)."""
    return [check_rep(source, keep_fraction) for source in sources]


@dataclass(frozen=True, eq=False)
class BlockResult:
    """What one block task returns: arrays over its pairs (in the order given) and the
    run's metrics (in the order of its specs).

    Attributes
    ----------
    num : ndarray
        float64, ``(pairs, metrics, 6)``: value, max_violation, gap, seconds, lower,
        upper (NaN where not applicable).
    solver : ndarray
        int32 ``(pairs, metrics)``: entries of ``solvers``.
    error : ndarray
        int32 ``(pairs, metrics)``: entries of ``errors``, -1 where the metric succeeded.
    solvers, errors : tuple of str
    worker : str
        The worker's address.
    """

    num: np.ndarray
    solver: np.ndarray
    error: np.ndarray
    solvers: tuple[str, ...]
    errors: tuple[str, ...]
    worker: str


def compare_block(
    a, b, sources: dict, metric_specs: list, device, keep_fraction: float
) -> BlockResult:
    """Run every metric on the pairs ``(a[k], b[k])`` of one block; a pair's failure is
    recorded with it, never raised, so the block goes on.

    ``a`` and ``b`` are keys of ``sources`` (:class:`RepSource` of each rep the block
    uses); each pair is solved in the order given (the engine gives the rep whose id sorts
    first as ``a``: a value is the same bits in every run).
    """
    from smd_dist.engine import worker_cache
    from smd_dist.kernel.allocator import reuse_freed_memory

    reuse_freed_memory()
    worker = _worker_name()
    prepared = {key: _prepared(source, keep_fraction) for key, source in sources.items()}
    try:
        return _compare(
            np.asarray(a).tolist(), np.asarray(b).tolist(), prepared, sources, metric_specs,
            device, worker,
        )
    finally:
        # The solves may have made low-precision copies of the kept reps: count them.
        worker_cache.remeasure(sources.values())


def _compare(a, b, prepared, sources, metric_specs, device, worker) -> BlockResult:
    from smd_dist.kernel.validation import check_same_stimuli

    metrics = [
        (metric_registry.get(name), prep, options) for name, prep, options in metric_specs
    ]
    n, n_metrics = len(a), len(metrics)
    num = np.full((n, n_metrics, 6), np.nan)
    solver = np.zeros((n, n_metrics), dtype=np.int32)
    error = np.full((n, n_metrics), -1, dtype=np.int32)
    solvers: dict[str, int] = {}
    errors: list[str] = []
    timer = time.perf_counter
    for k, (ia, ib) in enumerate(zip(a, b, strict=True)):
        name_a, name_b = sources[ia].rep_id, sources[ib].rep_id
        for m, (metric, prep, options) in enumerate(metrics):
            xa, xb = prepared[ia][prep], prepared[ib][prep]
            if metric.equal_width_only and xa.shape[1] != xb.shape[1]:
                solver[k, m] = solvers.setdefault("undefined: widths differ", len(solvers))
                continue
            start = timer()
            try:
                # Each rep passed check_array when it was prepared; per pair only the
                # stimulus counts can disagree, and a full pass over both would cost more.
                check_same_stimuli(xa.columns, xb.columns, names=(name_a, name_b))
                result = metric.compute(xa, xb, device=device, **options)
            except Exception as err:  # recorded with the pair; the block goes on
                error[k, m] = len(errors)
                errors.append(f"{type(err).__name__}: {err}")
                solver[k, m] = solvers.setdefault("", len(solvers))
            else:
                cert = result.certificate or {}
                row = num[k, m]
                row[0] = result.value
                row[1] = cert.get("max_violation", np.nan)
                row[2] = cert.get("gap", np.nan)
                if result.lower is not None:
                    row[4] = result.lower
                if result.upper is not None:
                    row[5] = result.upper
                solver[k, m] = solvers.setdefault(result.solver, len(solvers))
            num[k, m, 3] = timer() - start
    return BlockResult(num, solver, error, tuple(solvers), tuple(errors), worker)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"
