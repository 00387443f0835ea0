"""Quantities derived from a prepared array, computed once per array rather than per pair.

A representation compared with many others (all pairs: each rep meets every other) needs the
same per-neuron quantities in every pair: squared norms, groups of identical tuning curves,
its low-precision copy for the cost bounds. For arrays that cannot change — read-only NumPy
arrays, which is how the engine holds prepared representations — :func:`derived` computes
each once and keeps it while the array lives. A writeable array gets a fresh computation
every time, so a caller that edits its data in place never sees a stale value.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import numpy as np

__all__ = ["derived", "freeze"]

T = TypeVar("T")

_VALUES: dict[int, dict[str, object]] = {}
_LOCK = threading.Lock()


def freeze(array: np.ndarray) -> np.ndarray:
    """Mark ``array`` read-only (in place) so that its derived quantities are kept; returns it."""
    array.flags.writeable = False
    return array


def derived(array: np.ndarray, name: str, compute: Callable[[np.ndarray], T]) -> T:
    """``compute(array)``, remembered under ``name`` while a read-only ``array`` lives.

    The cached value is dropped when the array is garbage collected (its id cannot be
    reused before then). Writeable arrays are never cached.
    """
    if array.flags.writeable:
        return compute(array)
    key = id(array)
    with _LOCK:
        values = _VALUES.get(key)
        if values is not None and name in values:
            return values[name]  # type: ignore[return-value]
    value = compute(array)
    with _LOCK:
        if key not in _VALUES:
            _VALUES[key] = {}
            weakref.finalize(array, _VALUES.pop, key, None)
        return _VALUES[key].setdefault(name, value)  # type: ignore[return-value]
