"""What a worker process keeps between tasks: prepared representations, within a budget.

Every pair task needs its two representations read from the store, checked and
preprocessed. Each worker process keeps what it has prepared, least recently used out
first, within a share of its memory, so a rep is read and prepared about once per worker
rather than once per pair, and each :class:`~smd_dist.kernel.prepared.PreparedRep` keeps
its per-neuron quantities across all the pairs it takes part in.

A prepared rep grows after it is kept (the low-precision copies its first sparse pair
makes): :func:`remeasure`, called when a task is done with its reps, counts them. Past
Dask's ``distributed.worker.memory.spill`` fraction of the worker's memory limit (process
memory, as Dask measures it), the least recently used values are let go until the rest of
the process and what stays kept fit under it, before Dask itself would spill, pause or
restart the worker.

The values never travel between workers: on the engine benchmark (2 workers on 2 cores)
the prepared arrays that crossed Dask's comms, 350 MB a run, cost more than each worker
reading and preparing the reps again (median run 9.0 s against 8.4 s over six
interleaved runs), and a worker that dies takes nothing with it that another worker
cannot rebuild.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TypeVar

from cachetools import LRUCache

__all__ = ["clear", "kept", "memory_limit", "nbytes", "remeasure", "stats"]

T = TypeVar("T")

_LOCK = threading.Lock()
_CACHE: LRUCache = LRUCache(maxsize=0)
_STATS = {"hits": 0, "made": 0, "seconds_making": 0.0, "released_under_pressure": 0}
# Values being made now, by key: the threads that ask meanwhile wait on the Future.
_MAKING: dict[Hashable, Future] = {}


def nbytes(value) -> int:
    """Bytes held by ``value``: an array or anything with ``nbytes`` (a prepared rep), or a
    mapping or sequence of them."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0


def kept(key: Hashable, make: Callable[[], T], *, budget: int) -> T:
    """``make()``, kept under ``key`` in this process while the cache fits in ``budget`` bytes.

    The least recently used values leave first; a value larger than ``budget`` is made and
    returned but not kept. A new ``budget`` starts an empty cache. A thread asking for a
    key that another thread of the process is making waits for that value (or its
    exception) instead of making it a second time: the task threads of a worker start
    their pairs together and often need the same reps.
    """
    global _CACHE
    budget = max(int(budget), 0)
    with _LOCK:
        if _CACHE.maxsize != budget:
            _CACHE = LRUCache(maxsize=budget, getsizeof=nbytes)
        value = _CACHE.get(key)
        if value is not None:
            _STATS["hits"] += 1
            return value
        pending = _MAKING.get(key)
        maker = pending is None
        if maker:
            pending = _MAKING[key] = Future()
    if not maker:
        value = pending.result()
        with _LOCK:
            _STATS["hits"] += 1
        return value
    start = time.perf_counter()
    try:
        value = make()
    except BaseException as err:
        with _LOCK:
            del _MAKING[key]
        pending.set_exception(err)
        raise
    with _LOCK:
        _STATS["made"] += 1
        _STATS["seconds_making"] += time.perf_counter() - start
        if nbytes(value) <= _CACHE.maxsize:
            value = _CACHE.setdefault(key, value)
        del _MAKING[key]
        _relieve_pressure()
    pending.set_result(value)
    return value


def remeasure(keys) -> None:
    """Count again the bytes of the values kept under ``keys`` (they may have grown since
    they were kept), letting the least recently used others go if the budget is passed."""
    with _LOCK:
        for key in keys:
            value = _CACHE.get(key)
            if value is None:
                continue
            try:
                _CACHE[key] = value  # cachetools measures a value as it is set
            except ValueError:  # grown past the whole budget
                _CACHE.pop(key, None)
        _relieve_pressure()


def _relieve_pressure() -> None:
    """Let kept values go, least recently used first, while the process is past Dask's
    spill threshold; call with the lock held."""
    import dask.config

    if not _CACHE.currsize:
        return
    spill = dask.config.get("distributed.worker.memory.spill", default=0.7)
    if not spill:
        return
    ceiling = float(spill) * memory_limit()
    used = _this_process().memory_info().rss
    if used <= ceiling:
        return
    allowed = max(0.0, ceiling - (used - _CACHE.currsize))
    while _CACHE and _CACHE.currsize > allowed:
        _CACHE.popitem()
        _STATS["released_under_pressure"] += 1


_PROCESS: dict = {}


def _this_process():
    """This process's :class:`psutil.Process` (made once per pid)."""
    import psutil

    pid = os.getpid()
    if pid not in _PROCESS:
        _PROCESS.clear()
        _PROCESS[pid] = psutil.Process(pid)
    return _PROCESS[pid]


def stats() -> dict:
    """Counts since this process started: values found kept (``hits``), values made
    (``made``), the seconds spent making them, values let go under memory pressure
    (``released_under_pressure``), and the bytes kept now (``kept_bytes``)."""
    with _LOCK:
        return {**_STATS, "kept_bytes": int(_CACHE.currsize)}


def clear() -> int:
    """Drop everything kept in this process; returns the bytes released."""
    with _LOCK:
        released = int(_CACHE.currsize)
        _CACHE.clear()
    return released


def memory_limit() -> int:
    """This worker's memory limit in bytes (Dask's); without one, a core's share of the
    machine's physical memory (a worker per core is the usual layout)."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    if not limit:
        import psutil

        limit = psutil.virtual_memory().total // max(1, os.cpu_count() or 1)
    return int(limit)
