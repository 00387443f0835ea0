"""The second selection of a rectangular run (``against=``): its store, its reps, and the
check that both stores hold the same stimuli.

A rectangular run compares every rep of the first selection (the matrix's rows,
``rep_a``) with every rep of the second (its columns, ``rep_b``). Its reps are the distinct
reps of both selections, a rep being its id and content hash: a rep in both (the same
store, overlapping selections) is one rep, met by itself on the diagonal and compared with
every other once. Arrays are (stimuli, neurons): a neuron's tuning curve is a column.
Everything here reads the stores' records and stimulus ids only, never a rep's values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smd_dist import config
from smd_dist.engine.selection import InputError, select_reps

__all__ = ["Against", "Rectangle", "check_same_stimuli", "rectangle", "resolve_against"]


@dataclass(frozen=True)
class Against:
    """The second selection, resolved.

    Attributes
    ----------
    store : ActivationStore
        Where it lives (the run's own store when ``same_store``).
    chosen : list of RepRecord
        Its reps, in that store's order.
    same_store : bool
    """

    store: object
    chosen: list
    same_store: bool

    def describe(self) -> str:
        """``"<reps> in store '<path>'"``, for messages."""
        return f"{_listed(self.chosen)} in store {config.redact(str(self.store.path))!r}"


@dataclass(frozen=True)
class Rectangle:
    """A rectangular run's reps and matrix.

    Attributes
    ----------
    reps : list of RepRecord
        The run's distinct reps: the first selection's, then the second's not among them.
    stores : list of ActivationStore
        Where each of ``reps`` is read.
    rows, cols : ndarray of int
        Indices into ``reps`` of ``rep_a`` (the first selection) and ``rep_b`` (the
        second), in their stores' order.
    """

    reps: list
    stores: list
    rows: np.ndarray
    cols: np.ndarray


def _listed(records: Sequence, limit: int = 4) -> str:
    ids = [r.rep_id for r in records]
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _split(against) -> tuple[object | None, object | None]:
    """``(store or None for the run's own, patterns or None for all)`` from ``against``.

    Strings are rep patterns; another store is an ``ActivationStore``, a path object or
    a mapping ``{"store": path or URL, "reps": patterns}``.
    """
    from smd_dist.store.activation_store import ActivationStore

    if isinstance(against, str):
        return None, [against]
    if isinstance(against, ActivationStore | os.PathLike):
        return against, None
    if isinstance(against, Mapping):
        config.check_keys(against, config.AGAINST_KEYS, where="against")
        store, patterns = against.get("store"), against.get("reps")
        if store is not None and not isinstance(store, str | os.PathLike | ActivationStore):
            raise config.ConfigError(
                f"against['store'] must be a store path, URL or ActivationStore, got {store!r}"
            )
        if patterns is not None and not _patterns(patterns):
            raise config.ConfigError(
                f"against['reps'] must be a pattern or a list of patterns, got {patterns!r}"
            )
        return store, patterns
    if _patterns(against):
        return None, list(against)
    raise config.ConfigError(
        "against must be rep patterns (a str or a list of str: the same store), another "
        "store (an ActivationStore or a path object), or a mapping {'store': PATH, "
        f"'reps': [...]}}, got {type(against).__name__} {against!r}"
    )


def _patterns(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, Sequence) and bool(value) and all(isinstance(v, str) for v in value)
    )


def resolve_against(store, against) -> Against | None:
    """The second selection ``against`` names, checked against ``store`` (the run's).

    Parameters
    ----------
    store : ActivationStore
        The run's store (the first selection's).
    against : str, sequence of str, ActivationStore, path-like, mapping or None
        Rep patterns in ``store``; another store (all its reps); or ``{"store": path or
        URL, "reps": patterns}``. ``None``: no second selection (an all-pairs run).

    Raises
    ------
    smd_dist.config.ConfigError
        ``against`` of the wrong type or with unknown keys.
    InputError
        A pattern that matches nothing (with a hint when it looks like a store path), or
        stores with different stimuli (:func:`check_same_stimuli`).
    smd_dist.store.StoreError
        No store at the path.
    """
    from smd_dist.store.activation_store import ActivationStore

    if against is None:
        return None
    other, patterns = _split(against)
    if other is None:
        other = store
    elif not isinstance(other, ActivationStore):
        other = ActivationStore(os.fspath(other), mode="r")
    same = other.path == store.path and other.storage_options == store.storage_options
    if same:
        other = store
    try:
        chosen = select_reps(other.list(), patterns, min_reps=1)
    except InputError as err:
        looks_like_a_store = [
            p for p in (patterns or []) if "://" in p or os.path.isdir(os.path.expanduser(p))
        ]
        if same and looks_like_a_store:
            raise InputError(
                f"{err}; strings in against are rep patterns: to compare against the store "
                f"at {looks_like_a_store[0]!r}, give against={{'store': "
                f"{looks_like_a_store[0]!r}}} (or a pathlib.Path or an ActivationStore)"
            ) from None
        raise InputError(f"against: {err}") from None
    return Against(store=other, chosen=chosen, same_store=same)


def check_same_stimuli(store, chosen: Sequence, other: Against) -> None:
    """Refuse two stores whose stimuli differ (count, ids or their order), naming both
    stores, both selections and the first difference.

    Stores that both record stimulus ids must hold the same ids in the same order; stores
    that record none must have the same count; a store that records ids against one that
    records none is refused (nothing would show that the rows are the same stimuli).

    Raises
    ------
    InputError
    """
    if other.same_store:
        return
    a_path = config.redact(str(store.path))
    b_path = config.redact(str(other.store.path))
    what = (f"cannot compare {_listed(chosen)} (store {a_path!r}) against "
            f"{other.describe()}")
    n_a, n_b = store.n_stimuli, other.store.n_stimuli
    if n_a != n_b:
        raise InputError(
            f"{what}: store {a_path!r} has {n_a} stimuli, store {b_path!r} has {n_b}; "
            "the two stores must hold the same stimuli in the same order"
        )
    ids_a, ids_b = store.stimulus_ids, other.store.stimulus_ids
    if ids_a is None and ids_b is None:
        return
    if ids_a is None or ids_b is None:
        has, lacks = (a_path, b_path) if ids_b is None else (b_path, a_path)
        raise InputError(
            f"{what}: store {has!r} records stimulus ids, store {lacks!r} records none, so "
            "nothing shows that their rows are the same stimuli; record the ids in "
            f"{lacks!r} (ActivationStore.set_stimuli, or `smd-dist store import --ids`)"
        )
    differ = np.flatnonzero(ids_a != ids_b)
    if differ.size:
        k = int(differ[0])
        raise InputError(
            f"{what}: their stimuli differ at row {k}: {str(ids_a[k])!r} in {a_path!r}, "
            f"{str(ids_b[k])!r} in {b_path!r} ({differ.size} of {n_a} rows differ); the "
            "two stores must hold the same stimuli in the same order"
        )


def rectangle(store, chosen: Sequence, other: Against) -> Rectangle:
    """The reps and matrix of ``chosen`` (in ``store``) against ``other``.

    Raises
    ------
    InputError
        The rectangle holds no pair (one rep against itself).
    """
    reps, stores = list(chosen), [store] * len(chosen)
    index = {(r.rep_id, r.content_hash): k for k, r in enumerate(reps)}
    cols = []
    for r in other.chosen:
        key = (r.rep_id, r.content_hash)
        if key not in index:
            index[key] = len(reps)
            reps.append(r)
            stores.append(other.store)
        cols.append(index[key])
    rows = np.arange(len(chosen), dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if not (rows[:, None] != cols[None, :]).any():
        raise InputError(
            f"{_listed(chosen)} against {other.describe()} holds no pair: a rep against "
            "itself only; select other reps on either side"
        )
    return Rectangle(reps=reps, stores=stores, rows=rows, cols=cols)
