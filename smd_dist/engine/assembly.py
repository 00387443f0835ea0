"""From ledger records to a run's matrix: which pairs are done, and the labeled Dataset.

A run's reps are its distinct representations (a rep is its id and content hash). An
all-pairs run compares every pair of them; a rectangular run (``against=``) only the
pairs of its ``wanted`` mask, and its matrix has the first selection's reps as rows and
the second's as columns (``rows``/``cols``: indices into the run's reps). Every step is a
few array operations over the records (:class:`~smd_dist.engine.ledger.Records`) and
``(reps, reps)`` arrays: nothing here makes a Python object per pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from smd_dist.engine.ledger import NUM_FIELDS, Records

__all__ = [
    "assemble",
    "done_pairs",
    "failures",
    "layer_positions",
    "pending_pairs",
    "positions",
    "wanted_pairs",
]


def positions(
    records: Records, reps: Sequence, metric_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each record's place in a run: rows ``i``, ``j`` of its two reps in ``reps`` (matched
    by id and content hash) and its metric's index in ``metric_names``; -1 where a record
    is not of this run (another rep, an older content, another metric).

    ``reps`` have ``rep_id`` and ``content_hash``.
    """
    where = {(r.rep_id, r.content_hash): k for k, r in enumerate(reps)}
    rep_at = np.array(
        [where.get(key, -1) for key in zip(records.reps, records.hashes, strict=True)] + [-1],
        dtype=np.int64,
    )
    metric_at = np.array(
        [metric_names.index(m) if m in metric_names else -1 for m in records.metrics] + [-1],
        dtype=np.int64,
    )
    i = rep_at[records.codes[:, 0]]
    j = rep_at[records.codes[:, 1]]
    m = metric_at[records.codes[:, 2]]
    outside = (i < 0) | (j < 0) | (m < 0)
    i[outside] = j[outside] = m[outside] = -1
    return i, j, m


def done_pairs(records: Records, reps: Sequence, metric_names: Sequence[str]) -> np.ndarray:
    """``(reps, reps)`` bool: the pairs every metric has a value for (no error).

    ``records`` should be :meth:`~smd_dist.engine.ledger.Records.latest`: a pair whose
    last record failed is not done.
    """
    n = len(reps)
    ok = np.zeros((max(len(metric_names), 1), n, n), dtype=bool)
    i, j, m = positions(records, reps, metric_names)
    rows = (m >= 0) & records.ok
    ok[m[rows], i[rows], j[rows]] = True
    ok[m[rows], j[rows], i[rows]] = True
    done = ok.all(axis=0)
    np.fill_diagonal(done, True)
    return done


def layer_positions(reps: Sequence) -> list[int]:
    """Per rep: how many reps of its model come before it, the position of its layer in
    its model (0 for a model's first); ``reps`` have ``model``."""
    seen: dict[str, int] = {}
    out = []
    for r in reps:
        out.append(seen.get(r.model, 0))
        seen[r.model] = out[-1] + 1
    return out


def wanted_pairs(n: int, rows, cols) -> np.ndarray:
    """``(n, n)`` bool, symmetric: the pairs of a rectangular run, every rep of ``rows``
    against every rep of ``cols`` (indices into the run's ``n`` reps); a rep against itself
    is no pair. A pair found twice (both reps in both selections) is one pair."""
    wanted = np.zeros((n, n), dtype=bool)
    wanted[np.asarray(rows)[:, None], np.asarray(cols)[None, :]] = True
    wanted |= wanted.T
    np.fill_diagonal(wanted, False)
    return wanted


def pending_pairs(
    done: np.ndarray, wanted: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``a < b`` (indices in matrix order) not done, row by row; of ``wanted``
    (:func:`wanted_pairs`) only, when given."""
    todo = ~done if wanted is None else wanted & ~done
    a, b = np.nonzero(np.triu(todo, 1))
    return a.astype(np.int32), b.astype(np.int32)


def failures(
    records: Records,
    reps: Sequence,
    metric_names: Sequence[str],
    wanted: np.ndarray | None = None,
) -> list[str]:
    """``"rep_a vs rep_b (metric): error"`` for this run's failed pairs (of ``wanted``
    only, when given), in matrix order (``rep_a`` before ``rep_b`` in ``reps``), metrics in
    order."""
    i, j, m = positions(records, reps, metric_names)
    keep = (m >= 0) & ~records.ok
    if wanted is not None:
        keep[keep] = wanted[i[keep], j[keep]]
    rows = np.flatnonzero(keep)
    lo, hi = np.minimum(i[rows], j[rows]), np.maximum(i[rows], j[rows])
    order = np.lexsort((m[rows], hi, lo))
    errors = records.column("error")[rows]
    return [
        f"{reps[a].rep_id} vs {reps[b].rep_id} ({metric_names[k]}): {records.errors[e]}"
        for a, b, k, e in zip(
            lo[order].tolist(), hi[order].tolist(), m[rows][order].tolist(),
            errors[order].tolist(), strict=True,
        )
    ]


def assemble(
    records: Records,
    reps: Sequence,
    metrics: Sequence,
    *,
    rows=None,
    cols=None,
    attrs: dict | None = None,
    layer_index: Sequence[int] | None = None,
    constant_dropped: Sequence[int] | None = None,
) -> xr.Dataset:
    """Build the labeled distance matrices from pair records.

    Parameters
    ----------
    records : Records
        The ledger's records (the last of each key counts).
    reps : sequence
        The representations, in matrix order (the store's: models in the order they were
        written, each model's layers in depth order); each has ``rep_id``, ``model``,
        ``layer``, ``n_neurons`` and ``content_hash``.
    metrics : sequence
        :class:`smd_dist.metrics.Metric` objects (their ``name``, ``kind`` and
        ``description``; ``interval`` when they give certified intervals).
    rows, cols : array_like of int, optional
        A rectangular run's matrix: the reps (indices into ``reps``) of ``rep_a`` and of
        ``rep_b``. By default every rep on both axes.
    layer_index : sequence of int, optional
        Per rep: the position of its layer in its model (0 for the first layer written);
        by default, the position among ``reps``.
    constant_dropped : sequence of int, optional
        Per rep: the neurons left out as constant (runs with ``constant_neurons="drop"``;
        -1 where unknown); becomes the coordinates ``n_constant_dropped_a``/``_b``.

    Returns
    -------
    xarray.Dataset
        Per metric ``m``: ``m`` (rep_a, rep_b) float64, with the identity value where a
        rep meets itself (0 for distances, 1 for similarities), symmetric when the axes
        hold the same reps; ``m_solver``, ``m_error``
        (str), ``m_seconds``, ``m_max_violation``, ``m_gap`` (float64); for a metric with
        certified intervals (``metric.interval``) also ``m_lower`` and ``m_upper`` (NaN
        where the pair was solved exactly; the identity value on the diagonal). Missing
        pairs are NaN with the error ``"not computed"``. Coords on each axis ``s`` (``a``,
        ``b``): ``model_s``, ``layer_s``, ``layer_index_s``, ``n_neurons_s``, and with
        ``constant_dropped`` ``n_constant_dropped_s``.
    """
    records = records.latest()
    if layer_index is None:
        layer_index = layer_positions(reps)
    n = len(reps)
    square = rows is None and cols is None
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.arange(n) if cols is None else np.asarray(cols, dtype=np.int64)
    # Each rep's row and column in the matrix (-1: not on that axis).
    row_at = np.full(n + 1, -1, dtype=np.int64)
    col_at = np.full(n + 1, -1, dtype=np.int64)
    row_at[rows] = np.arange(rows.size)
    col_at[cols] = np.arange(cols.size)
    shape = (rows.size, cols.size)
    names = [metric.name for metric in metrics]
    i, j, m = positions(records, reps, names)
    if square:
        itself_r = itself_c = rows
    else:
        itself_r, itself_c = np.nonzero(rows[:, None] == cols[None, :])
    dims = ("rep_a", "rep_b")
    data_vars = {}
    for k, metric in enumerate(metrics):
        rows_k = np.flatnonzero(m == k)
        ri, rj = i[rows_k], j[rows_k]
        # A pair lands at (row of i, column of j) and at (row of j, column of i), where
        # both exist (every pair of the run on a square matrix).
        cells = []
        for u, v in ((ri, rj), (rj, ri)):
            if square:
                cells.append((slice(None), u, v))
                continue
            r, c = row_at[u], col_at[v]
            on = (r >= 0) & (c >= 0)
            cells.append((on, r[on], c[on]))
        identity = 0.0 if metric.kind == "distance" else 1.0
        bounds = ("lower", "upper") if getattr(metric, "interval", False) else ()

        def matrix(values, fill, on_diagonal, cells=cells):
            values = np.asarray(values)
            out = np.full(shape, fill, dtype=values.dtype)
            for on, r, c in cells:
                out[r, c] = values[on]
            out[itself_r, itself_c] = on_diagonal
            return out

        def strings(table, column, missing, on_diagonal, picked=rows_k):
            # Codes into the words, then one gather: the cells share the table's strings.
            # After the table: "" (code -1: no error), missing pairs, the diagonal.
            words = np.array([*table, "", missing, on_diagonal], dtype=object)
            codes = records.column(column)[picked].astype(np.int64)
            codes[codes < 0] = len(table)
            return words[matrix(codes, len(table) + 1, len(table) + 2)]

        data_vars[metric.name] = xr.Variable(
            dims,
            matrix(records.num[rows_k, 0], np.nan, identity),
            attrs={"kind": metric.kind, "long_name": metric.description},
        )
        data_vars[f"{metric.name}_solver"] = xr.Variable(
            dims, strings(records.solvers, "solver", "", "identity")
        )
        data_vars[f"{metric.name}_error"] = xr.Variable(
            dims, strings(records.errors, "error", "not computed", "")
        )
        for name in ("seconds", "max_violation", "gap", *bounds):
            on_diagonal = identity if name in bounds else 0.0
            column = records.num[rows_k, NUM_FIELDS.index(name)]
            data_vars[f"{metric.name}_{name}"] = xr.Variable(
                dims, matrix(column, np.nan, on_diagonal)
            )
    coords = {}
    for side, axis in (("a", rows), ("b", cols)):
        dim = f"rep_{side}"
        on_axis = [reps[k] for k in axis.tolist()]
        coords[dim] = np.array([r.rep_id for r in on_axis], dtype=object)
        coords[f"model_{side}"] = (dim, np.array([r.model for r in on_axis], dtype=object))
        coords[f"layer_{side}"] = (dim, np.array([r.layer for r in on_axis], dtype=object))
        coords[f"layer_index_{side}"] = (
            dim, np.asarray(layer_index, dtype="i8")[axis],
        )
        coords[f"n_neurons_{side}"] = (dim, np.array([r.n_neurons for r in on_axis], dtype="i8"))
        if constant_dropped is not None:
            coords[f"n_constant_dropped_{side}"] = (
                dim, np.asarray(constant_dropped, dtype="i8")[axis],
            )
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))
