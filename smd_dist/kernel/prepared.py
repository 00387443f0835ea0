"""A representation prepared once for every pair it takes part in.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. A representation
compared with many others (all pairs: each rep meets every other) needs the same
per-neuron quantities in every pair: its centred (and maybe normalised) columns, their
squared norms, the groups of identical columns (dead units, exact copies), and the
low-precision copy the cost bounds are built from. :class:`PreparedRep` holds them, made
once by :func:`prepare`; the engine keeps one per rep and passes it to every solve, and the
public functions make one per call from plain arrays.

Identical columns are interchangeable in every metric here (each is invariant to permuting
neurons), and the solver merges each group into one neuron carrying the group's mass. A
prepared rep therefore keeps one column of each group first, in order, and the copies
after them: the merged problem's columns are a prefix, a view, and no merged copy of the
rep exists next to it (in float64 or in low precision). ``neurons`` maps each column back to
the neuron it came from, so plans are reported in the caller's order.

A prepared rep's squared column norms lie in :data:`NORM_RANGE` (or are all zero): inside
it every cost, dual and certificate of a solve is a normal float64 number, and the solvers
see costs of order one (:func:`smd_dist.kernel.certificate.cost_unit`), so results scale
exactly with the data. Data beyond it is refused, never computed into a wrong number.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np

from smd_dist.kernel.bounds import LowPrecision, low_precision
from smd_dist.kernel.certificate import squared_norms
from smd_dist.kernel.preparation import neuron_major, preprocess_columns
from smd_dist.kernel.validation import check_same_stimuli

__all__ = [
    "NORM_RANGE",
    "PreparedRep",
    "as_prepared",
    "identical_columns",
    "prepare",
    "prepare_pair",
]

#: Range of the largest squared tuning-curve norm of a prepared rep. Above it a squared
#: distance (up to four times it) could overflow; below it the certificate's tolerance,
#: 1e-11 of it, would be subnormal. Values from about 1e-150 to 1e152 pass (M = 40).
NORM_RANGE = (2.0**-1000, 2.0**1016)


@dataclass(frozen=True, eq=False)
class PreparedRep:
    """One representation's prepared tuning curves and the per-neuron quantities of a solve.

    Attributes
    ----------
    columns : numpy.ndarray, shape (M, N), float64
        The prepared (stimuli, neurons) array: one column of each group of identical
        columns first, in their original order, then the other copies. Read-only when
        made by :func:`prepare`.
    sq_norms : numpy.ndarray, shape (N,)
        :math:`\\lVert x_i \\rVert^2` of each column of ``columns``.
    n_distinct : int
        Groups of identical columns; ``columns[:, :n_distinct]`` holds one of each.
    group : numpy.ndarray of int, shape (N,)
        The group of each column of ``columns`` (``group[q] == q`` for ``q < n_distinct``).
    counts : numpy.ndarray of int64, shape (n_distinct,)
        Columns per group.
    neurons : numpy.ndarray of int, shape (N,), or None
        The original neuron of each column of ``columns``; None when the order is the
        original one.
    name : str
        Label for messages (``"model/layer"``).
    dropped : numpy.ndarray of int
        Neurons (columns of the caller's array) left out as constant over the stimuli
        (``constant_neurons="drop"``); ``neurons`` and ``columns`` index the others.
    """

    columns: np.ndarray
    sq_norms: np.ndarray
    n_distinct: int
    group: np.ndarray
    counts: np.ndarray
    neurons: np.ndarray | None = None
    name: str = "X"
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _low: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(stimuli, neurons)``."""
        return self.columns.shape

    @property
    def merged(self) -> bool:
        """Whether some columns are identical (the solver then merges them)."""
        return self.n_distinct < self.columns.shape[1]

    def distinct(self) -> np.ndarray:
        """One column of each group of identical columns: a view of ``columns``."""
        return self.columns if not self.merged else self.columns[:, : self.n_distinct]

    def low_precision(self, device, dtype) -> LowPrecision:
        """The scaled low-precision copy of ``columns`` for the cost bounds
        (:func:`smd_dist.kernel.bounds.low_precision`), made once per device and dtype."""
        key = (str(device), str(dtype))
        with self._lock:  # the task threads of a worker share prepared reps
            low = self._low.get(key)
            if low is None:
                low = self._low[key] = low_precision(self.columns, self.sq_norms, dtype)
        return low

    def distinct_low_precision(self, device, dtype) -> LowPrecision:
        """:meth:`low_precision` of the distinct columns (views of the whole rep's copy, so
        a rep merged in one pair and whole in another sees the same bounds)."""
        low = self.low_precision(device, dtype)
        return low if not self.merged else low.head(self.n_distinct)

    @property
    def nbytes(self) -> int:
        """Bytes held: the columns and every low-precision copy made so far."""
        low = sum(
            copy.low.element_size() * copy.low.nelement() + copy.err.nbytes + copy.norm_low.nbytes
            for copy in list(self._low.values())
        )
        return int(self.columns.nbytes + self.sq_norms.nbytes + self.group.nbytes + low)


def identical_columns(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of identical columns of a (stimuli, neurons) array.

    Columns are bucketed by a weighted sum (non-constant weights, since centred columns all
    sum to about zero; the same operations for every column, so identical columns get
    identical fingerprints) and a bucket's members are merged only after an exact
    comparison with the bucket's first column. Groups are numbered by first occurrence.

    Returns
    -------
    keep : numpy.ndarray of int
        The first column of each group, ascending.
    group : numpy.ndarray of int, shape (N,)
        Each column's group (an index into ``keep``).
    counts : numpy.ndarray of int64
        Columns per group.
    """
    m, n = X.shape
    f = np.einsum("m,mn->n", _fingerprint_weights(m), X)
    ranked = np.sort(f)
    first_of = np.arange(n)
    if (ranked[1:] != ranked[:-1]).all():  # the usual case: no two fingerprints alike
        return first_of, np.arange(n), np.ones(n, np.int64)
    order = np.argsort(f, kind="stable")  # ties in column order
    ranked = f[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    sizes = np.diff(np.append(starts, n))
    for s, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        members = order[s : s + size]  # ascending column index within a bucket
        first = members[0]
        for j in members[1:].tolist():
            if np.array_equal(X[:, j], X[:, first]):
                first_of[j] = first
    # Every column points at its group's first column, a leader pointing at itself: the
    # groups are the leaders' ranks (np.unique's answer, without its sorts).
    leader = first_of == np.arange(n)
    group = (np.cumsum(leader) - 1)[first_of]
    return np.flatnonzero(leader), group, np.bincount(group).astype(np.int64)


#: Reps up to this size are reordered with one gather; larger ones column by column, in
#: place, without a second copy of the rep.
_GATHER_BYTES = 1 << 23


@functools.lru_cache(maxsize=1024)
def _no_groups(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``group`` and ``counts`` of a rep whose ``n`` columns all differ (shared, read-only)."""
    group, counts = np.arange(n), np.ones(n, np.int64)
    group.flags.writeable = counts.flags.writeable = False
    return group, counts


@functools.lru_cache(maxsize=64)
def _fingerprint_weights(m: int) -> np.ndarray:
    """Fixed, non-constant weights over ``m`` stimuli, made once per stimulus count."""
    w = np.cos(np.arange(m) * 0.7548776662466927) + 1.5
    w.flags.writeable = False
    return w


def _made(
    X, *, name: str, owned: bool, group: bool = True, sq_norms=None, dropped=None
) -> PreparedRep:
    """The prepared rep of an already prepared array; ``owned``: reorder ``X`` in place
    and make it read-only (else a reordered copy is made where columns repeat);
    ``group=False``: every column its own group, copies not looked for; ``sq_norms``:
    those of ``X``, when already computed; ``dropped``: the columns preparation left out
    as constant."""
    n = X.shape[1]
    sq_norms = squared_norms(X) if sq_norms is None else sq_norms
    _check_range(X, sq_norms, name=name)
    extra = {} if dropped is None else {"dropped": dropped}
    if group:
        by_norm = np.argsort(sq_norms, kind="stable")
        ranked = sq_norms[by_norm]
        alike = ranked[1:] == ranked[:-1]
    if not group or not alike.any():
        # Identical columns have identical norms (the same operations on the same values),
        # so all-distinct norms rule out copies without a fingerprint pass over X.
        if owned:
            X.flags.writeable = False
        group, counts = _no_groups(n)
        return PreparedRep(
            columns=X,
            sq_norms=sq_norms,
            n_distinct=n,
            group=group,
            counts=counts,
            name=name,
            **extra,
        )
    # Only columns that share their norm can be copies: fingerprints of those alone (dead
    # units, typically a few columns, not a pass over the rep).
    shared = np.zeros(n, bool)
    shared[by_norm[1:][alike]] = shared[by_norm[:-1][alike]] = True
    candidates = np.flatnonzero(shared)
    firsts, groups, _ = identical_columns(X[:, candidates])
    first_of = np.arange(n)
    first_of[candidates] = candidates[firsts[groups]]
    leader = first_of == np.arange(n)
    group = (np.cumsum(leader) - 1)[first_of]
    keep, counts = np.flatnonzero(leader), np.bincount(group).astype(np.int64)
    k = keep.size
    neurons = None
    if k < n:
        copies = np.flatnonzero(keep[group] != np.arange(n))  # not their group's first
        neurons = np.concatenate([keep, copies])
        if owned and X.nbytes <= _GATHER_BYTES:
            # Copies hold their first column's values, so the reordered array is X[:, neurons]
            # (gathered as whole tuning curves: rows of the transpose).
            X.T[...] = X.T[neurons]
        elif owned:
            # keep is ascending, so keep[q] >= q: moving left never overwrites a
            # representative that has not moved yet, only copies, whose values their
            # representative still holds.
            for q, j in enumerate(keep):
                if q != j:
                    X[:, q] = X[:, j]
            for t, j in enumerate(copies, start=k):
                X[:, t] = X[:, group[j]]  # the copy's representative, now at its group's number
        else:
            X = neuron_major(X[:, neurons], kept=False)
        group = group[neurons]
    if owned:
        X.flags.writeable = False
    return PreparedRep(
        columns=X,
        sq_norms=sq_norms[neurons] if k < n else sq_norms,  # the same bits, reordered
        n_distinct=int(k),
        group=group,
        counts=counts,
        neurons=neurons,
        name=name,
        **extra,
    )



def _check_range(X: np.ndarray, sq_norms: np.ndarray, *, name: str) -> None:
    """Refuse a prepared array whose squared norms leave :data:`NORM_RANGE`."""
    peak = float(sq_norms.max())
    low, high = NORM_RANGE
    if peak <= high and (peak >= low or not X.any()):
        return
    largest = float(np.abs(X).max())
    raise ValueError(
        f"{name} (shape {X.shape}): its largest squared tuning-curve norm after "
        f"preprocessing is {peak:.3g} (largest |value| {largest:.3g}), outside "
        f"{low:.3g}..{high:.3g} where float64 costs keep their precision; multiply the "
        "data by a constant (distances scale with it; scores and CKA do not change), or "
        "normalise it (normalize='unit')"
    )


def prepare(
    X,
    *,
    center: bool = True,
    normalize: str | None = None,
    constant_neurons: str = "refuse",
    name: str = "X",
    kept: bool = True,
    group: bool = True,
):
    """Validate, centre and normalise one (stimuli, neurons) array into a :class:`PreparedRep`.

    Parameters
    ----------
    X : array_like, shape (M, N)
        Stimuli in rows, neurons in columns.
    center, normalize, constant_neurons, name, kept :
        As :func:`smd_dist.kernel.preparation.preprocess`: ``kept=False`` for a rep used
        in one pair and dropped.
    group : bool
        Look for identical columns (dead units, copies). ``False`` makes every column its
        own group: still exact, for a pair too small for merging to pay
        (:func:`smd_dist.kernel.transport.merging_can_pay`).

    Returns
    -------
    PreparedRep
        Its ``columns`` are a fresh, read-only, neuron-major array.

    Raises
    ------
    ValueError
        Bad input (see :mod:`smd_dist.kernel.validation`), a constant neuron under
        normalisation with ``constant_neurons="refuse"``, or values whose squared norms
        leave :data:`NORM_RANGE`.
    """
    columns, dropped = preprocess_columns(
        X,
        center=center,
        normalize=normalize,
        constant_neurons=constant_neurons,
        name=name,
        kept=kept,
    )
    return _made(columns, name=name, owned=True, group=group, dropped=dropped)


def prepare_pair(
    X,
    Y,
    *,
    center: bool = True,
    normalize: str | None = None,
    constant_neurons: str = "refuse",
    names=("X", "Y"),
    kept: bool = True,
    group=True,
) -> tuple[PreparedRep, PreparedRep]:
    """:func:`prepare` both (stimuli, neurons) arrays of a pair and check their stimuli.

    ``group`` may also be a function of both reps' squared column norms and the stimulus
    count, ``group(sq_norms_x, sq_norms_y, stimuli) -> bool``, deciding whether to look
    for copies at all (:func:`smd_dist.kernel.transport.merging_can_pay`).

    Raises
    ------
    ValueError
        Bad input in either (named by ``names``) or different stimulus counts.
    """
    options = {
        "center": center,
        "normalize": normalize,
        "constant_neurons": constant_neurons,
        "kept": kept,
    }
    prepared = [
        preprocess_columns(A, name=name, **options) for A, name in zip((X, Y), names, strict=True)
    ]
    columns = [c for c, _ in prepared]
    check_same_stimuli(*columns, names=names)
    norms = [squared_norms(c) for c in columns]
    if callable(group):
        group = bool(group(*norms, columns[0].shape[0]))
    x, y = (
        _made(c, name=name, owned=True, group=group, sq_norms=sq, dropped=dropped)
        for (c, dropped), name, sq in zip(prepared, names, norms, strict=True)
    )
    return x, y


def as_prepared(X, *, name: str = "X") -> PreparedRep:
    """``X`` itself when it is a :class:`PreparedRep`, else the prepared rep of a float64
    (stimuli, neurons) array that is already centred and validated as the caller wants.

    The array is not modified; where columns repeat, the rep holds a reordered copy.
    """
    if isinstance(X, PreparedRep):
        return X
    return _made(np.asarray(X, dtype=np.float64), name=name, owned=False)
