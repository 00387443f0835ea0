"""What a worker process keeps between tasks: prepared representations, within a budget.

Every pair task needs its two representations read from the store, checked and
preprocessed. Each worker process keeps what it has prepared, least recently used out
first, within a share of its memory, so a rep is read and prepared about once per worker
rather than once per pair, and each :class:`~smd_dist.kernel.prepared.PreparedRep` keeps
its per-neuron quantities across all the pairs it takes part in.

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

__all__ = ["clear", "kept", "memory_limit", "nbytes", "stats"]

T = TypeVar("T")

_LOCK = threading.Lock()
_CACHE: LRUCache = LRUCache(maxsize=0)
_STATS = {"hits": 0, "made": 0, "seconds_making": 0.0}
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
    pending.set_result(value)
    return value


def stats() -> dict:
    """Counts since this process started: values found kept (``hits``), values made
    (``made``), the seconds spent making them, and the bytes kept now (``kept_bytes``)."""
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
