"""From ledger records to a run's matrix: which pairs are done, and the labeled Dataset.

Every step is a few array operations over the records (:class:`~smd_dist.engine.ledger.
Records`) and ``(reps, reps)`` arrays: nothing here makes a Python object per pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from smd_dist.engine.ledger import NUM_FIELDS, Records

__all__ = ["assemble", "done_pairs", "failures", "pending_pairs", "positions"]


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


def pending_pairs(done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``a < b`` (indices in matrix order) not done, row by row."""
    a, b = np.nonzero(np.triu(~done, 1))
    return a.astype(np.int32), b.astype(np.int32)


def failures(records: Records, reps: Sequence, metric_names: Sequence[str]) -> list[str]:
    """``"rep_a vs rep_b (metric): error"`` for this run's failed pairs, in matrix order
    (``rep_a`` before ``rep_b`` in ``reps``), metrics in order."""
    i, j, m = positions(records, reps, metric_names)
    rows = np.flatnonzero((m >= 0) & ~records.ok)
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
    attrs: dict | None = None,
    layer_index: dict | None = None,
    constant_dropped: dict | None = None,
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
    layer_index : dict, optional
        ``rep_id -> position of the layer in its model`` (0 for the first layer written);
        by default, the position among ``reps``.
    constant_dropped : dict, optional
        ``rep_id -> neurons left out as constant`` (runs with ``constant_neurons="drop"``);
        becomes the coordinates ``n_constant_dropped_a``/``_b`` (-1 where unknown).

    Returns
    -------
    xarray.Dataset
        Per metric ``m``: ``m`` (rep_a, rep_b) float64, symmetric, with the identity value
        on the diagonal (0 for distances, 1 for similarities); ``m_solver``, ``m_error``
        (str), ``m_seconds``, ``m_max_violation``, ``m_gap`` (float64); for a metric with
        certified intervals (``metric.interval``) also ``m_lower`` and ``m_upper`` (NaN
        where the pair was solved exactly; the identity value on the diagonal). Missing
        pairs are NaN with the error ``"not computed"``. Coords on each axis ``s`` (``a``,
        ``b``): ``model_s``, ``layer_s``, ``layer_index_s``, ``n_neurons_s``, and with
        ``constant_dropped`` ``n_constant_dropped_s``.
    """
    records = records.latest()
    ids = np.array([r.rep_id for r in reps], dtype=object)
    if layer_index is None:
        seen: dict[str, int] = {}
        layer_index = {}
        for r in reps:
            layer_index[r.rep_id] = seen.get(r.model, 0)
            seen[r.model] = layer_index[r.rep_id] + 1
    n = len(reps)
    names = [metric.name for metric in metrics]
    i, j, m = positions(records, reps, names)
    diagonal = np.arange(n)
    dims = ("rep_a", "rep_b")
    data_vars = {}
    for k, metric in enumerate(metrics):
        rows = np.flatnonzero(m == k)
        ri, rj = i[rows], j[rows]
        identity = 0.0 if metric.kind == "distance" else 1.0
        bounds = ("lower", "upper") if getattr(metric, "interval", False) else ()

        def matrix(values, fill, on_diagonal, ri=ri, rj=rj):
            out = np.full((n, n), fill, dtype=np.asarray(values).dtype)
            out[ri, rj] = values
            out[rj, ri] = values
            out[diagonal, diagonal] = on_diagonal
            return out

        def strings(table, column, missing, on_diagonal, rows=rows):
            # Codes into the words, then one gather: the cells share the table's strings.
            # After the table: "" (code -1: no error), missing pairs, the diagonal.
            words = np.array([*table, "", missing, on_diagonal], dtype=object)
            codes = records.column(column)[rows].astype(np.int64)
            codes[codes < 0] = len(table)
            return words[matrix(codes, len(table) + 1, len(table) + 2)]

        data_vars[metric.name] = xr.Variable(
            dims,
            matrix(records.num[rows, 0], np.nan, identity),
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
            column = records.num[rows, NUM_FIELDS.index(name)]
            data_vars[f"{metric.name}_{name}"] = xr.Variable(
                dims, matrix(column, np.nan, on_diagonal)
            )
    coords = {"rep_a": ids, "rep_b": ids}
    for side in ("a", "b"):
        dim = f"rep_{side}"
        coords[f"model_{side}"] = (dim, np.array([r.model for r in reps], dtype=object))
        coords[f"layer_{side}"] = (dim, np.array([r.layer for r in reps], dtype=object))
        coords[f"layer_index_{side}"] = (
            dim, np.array([layer_index[r.rep_id] for r in reps], dtype="i8"),
        )
        coords[f"n_neurons_{side}"] = (dim, np.array([r.n_neurons for r in reps], dtype="i8"))
        if constant_dropped is not None:
            coords[f"n_constant_dropped_{side}"] = (
                dim,
                np.array([constant_dropped.get(r.rep_id, -1) for r in reps], dtype="i8"),
            )
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))
