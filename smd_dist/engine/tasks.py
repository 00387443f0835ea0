"""What runs on a worker: read and prepare reps, compare the pairs of one task.

Pair tasks name their reps (:class:`RepSource`) and never carry their data: each worker
reads and prepares a rep once and keeps the :class:`~smd_dist.kernel.prepared.PreparedRep`
within a share of its memory (:mod:`smd_dist.engine.worker_cache`). A failure on one pair
is recorded with the pair, never raised, so the run goes on.
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

__all__ = ["KEEP_PREPARED_FRACTION", "RepSource", "check_rep", "compare_pairs", "prepare_rep"]

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


def compare_pairs(
    pairs: list, sources: dict, metric_specs: list, device, keep_fraction: float
) -> list[dict]:
    """Run every metric on every pair of one task; a failure is recorded, not raised."""
    from smd_dist.engine import worker_cache
    from smd_dist.kernel.allocator import reuse_freed_memory

    reuse_freed_memory()
    worker = _worker_name()
    prepared = {rep: _prepared(source, keep_fraction) for rep, source in sources.items()}
    try:
        return _compare(pairs, prepared, metric_specs, device, worker)
    finally:
        # The solves may have made low-precision copies of the kept reps: count them.
        worker_cache.remeasure(sources.values())


def _compare(pairs, prepared, metric_specs, device, worker) -> list[dict]:
    from smd_dist.kernel.validation import check_same_stimuli

    out = []
    for rep_a, rep_b in pairs:
        for name, prep, options in metric_specs:
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
                check_same_stimuli(xa.columns, xb.columns, names=(rep_a, rep_b))
                result = metric.compute(xa, xb, device=device, **options)
            except Exception as err:  # recorded with the pair; the run goes on
                record.update(value=float("nan"), error=f"{type(err).__name__}: {err}")
            else:
                cert = result.certificate or {}
                record.update(
                    value=float(result.value),
                    solver=result.solver,
                    max_violation=float(cert.get("max_violation", np.nan)),
                    gap=float(cert.get("gap", np.nan)),
                    lower=np.nan if result.lower is None else float(result.lower),
                    upper=np.nan if result.upper is None else float(result.upper),
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
