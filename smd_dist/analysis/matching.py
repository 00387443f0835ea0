"""Models against recordings: each model's best-matching layer for each recorded rep.

Reads a rectangular result (``compute_distances(store, against=...)``, dims ``(rep_a,
rep_b)``: model layers against, e.g., brain areas) and ranks the models of ``rep_a`` for
every rep of ``rep_b`` by their best layer.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from smd_dist.analysis._matrix import _coord, _kind, _pick

__all__ = ["best_matches"]


def best_matches(ds: xr.Dataset | xr.DataArray, metric: str | None = None) -> xr.Dataset:
    """For every rep of ``rep_b`` and every model of ``rep_a``: the model's best layer.

    Best is the smallest value of a distance and the largest of a similarity (the
    metric's ``kind``); pairs with no value (failed or not computed) are left out, and a
    model none of whose layers has a value for an area gets NaN there.

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results with dims ``(rep_a, rep_b)``, the models' layers on ``rep_a``.
    metric : str, optional
        Metric variable (default: the only one, else ``soft_matching``).

    Returns
    -------
    xarray.Dataset
        Dims ``(model, rep_b)``, models in the order of ``rep_a``: ``value`` (float64, the
        metric at the best layer), ``layer`` and ``rep`` (str: that layer and its rep id,
        ``""`` where none), ``rank`` (int, 1 for the best model of each ``rep_b``, ties in
        model order; 0 where none). attrs: ``metric``, ``kind``.

    Examples
    --------
    >>> best = analysis.best_matches(ds)                            # doctest: +SKIP
    >>> best["value"].sel(rep_b="brain/IT").to_series().sort_values()  # doctest: +SKIP
    """
    da = _pick(ds, metric)
    values = np.asarray(da.values, dtype=np.float64)
    kind = _kind(da, np.full((1, 1), np.nan))  # no diagonal to tell it by
    ids_a = [str(r) for r in da["rep_a"].values]
    models_a = np.array(_coord(da, "model_a", ids_a), dtype=object)
    layers_a = np.array(_coord(da, "layer_a", ids_a), dtype=object)
    models = list(dict.fromkeys(models_a.tolist()))
    n_b = values.shape[1]
    # Minimise: a similarity's best is its largest value.
    score = np.where(np.isfinite(values), values if kind == "distance" else -values, np.inf)
    best = np.full((len(models), n_b), np.nan)
    layer = np.full((len(models), n_b), "", dtype=object)
    rep = np.full((len(models), n_b), "", dtype=object)
    for k, model in enumerate(models):
        rows = np.flatnonzero(models_a == model)
        pick = rows[np.argmin(score[rows], axis=0)]
        found = np.isfinite(score[pick, np.arange(n_b)])
        best[k, found] = values[pick[found], np.flatnonzero(found)]
        layer[k, found] = layers_a[pick[found]]
        rep[k, found] = np.array(ids_a, dtype=object)[pick[found]]
    ordered = np.where(np.isfinite(best), best if kind == "distance" else -best, np.inf)
    rank = np.argsort(np.argsort(ordered, axis=0, kind="stable"), axis=0) + 1
    rank[~np.isfinite(best)] = 0
    dims = ("model", "rep_b")
    return xr.Dataset(
        {
            "value": (dims, best),
            "layer": (dims, layer),
            "rep": (dims, rep),
            "rank": (dims, rank.astype(np.int64)),
        },
        coords={"model": np.array(models, dtype=object), "rep_b": da["rep_b"].values},
        attrs={"metric": str(da.name), "kind": kind},
    )
