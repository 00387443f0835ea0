"""Selecting representations from a results Dataset and checking the matrix analyses use.

A results Dataset (``smd_dist.open_distances``) holds one named DataArray per metric with dims
``(rep_a, rep_b)``, string rep ids ``"model/layer"``, and ``model``/``layer``/``n_neurons`` coords
on each axis. Everything downstream (MDS, clustering, plots) works on one square, symmetric,
finite dissimilarity matrix taken from it, checked here once.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

REP_DIMS = ("rep_a", "rep_b")
_DIAGNOSTIC_SUFFIXES = ("_solver", "_error", "_seconds", "_max_violation", "_gap")
# Similarities are one on the diagonal; these are the known ones when nothing else says so.
_KNOWN_SIMILARITIES = frozenset({"soft_matching_score", "linear_cka"})


def metric_names(ds: xr.Dataset) -> tuple[str, ...]:
    """Names of the metric variables in a results Dataset, in file order.

    Diagnostics variables (``<metric>_solver``, ``_error``, ``_seconds``, ``_max_violation``,
    ``_gap``) are
    left out.
    """
    _check_layout(ds)
    square = [str(n) for n, v in ds.data_vars.items() if tuple(v.dims) == REP_DIMS]
    names = set(square)
    return tuple(
        n
        for n in square
        if not any(n.endswith(s) and n[: -len(s)] in names for s in _DIAGNOSTIC_SUFFIXES)
    )


def select(
    ds: xr.Dataset,
    reps: str | Iterable[str] | None = None,
    *,
    models: str | Iterable[str] | None = None,
    layers: str | Iterable[str] | None = None,
) -> xr.Dataset:
    """Keep the representations whose ids, models and layers match glob patterns.

    Parameters
    ----------
    ds : xarray.Dataset
        Results Dataset with dims ``(rep_a, rep_b)``.
    reps, models, layers : str or iterable of str, optional
        ``fnmatch`` patterns on the rep id ``"model/layer"``, the model name and the layer name.
        A rep is kept when it matches at least one pattern of every criterion given. Each pattern
        must match something, so a misspelt name is an error rather than an empty selection.

    Returns
    -------
    xarray.Dataset
        The same Dataset restricted on both axes, in the order it was given (a run's order:
        models as they were written to the store, each model's layers in depth order), never
        re-sorted by name or by pattern. A rectangular result (``compute_distances(against=
        ...)``, other reps on the two axes) is restricted on each axis by what matches there.

    Raises
    ------
    ValueError
        A pattern matches no representation (the message lists the closest rep ids).
    """
    _check_layout(ds)
    axes = {side: [str(r) for r in ds[f"rep_{side}"].values] for side in ("a", "b")}
    square = axes["a"] == axes["b"]
    sides = ("a",) if square else ("a", "b")
    keep = {side: np.ones(len(axes[side]), dtype=bool) for side in sides}
    for criterion, patterns in (("reps", reps), ("models", models), ("layers", layers)):
        if patterns is None:
            continue
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        values, hit = {}, {}
        for side in sides:
            ids = axes[side]
            values[side] = {
                "reps": ids,
                "models": [str(m) for m in _coord(ds, f"model_{side}", ids)],
                "layers": [str(x) for x in _coord(ds, f"layer_{side}", ids)],
            }[criterion]
            hit[side] = np.zeros(len(ids), dtype=bool)
        unmatched = []
        for pattern in patterns:
            found = False
            for side in sides:
                match = np.array(
                    [fnmatch.fnmatchcase(v, pattern) for v in values[side]], dtype=bool
                )
                found |= bool(match.any())
                hit[side] |= match
            if not found:
                unmatched.append(pattern)
        if unmatched:
            available = sorted({v for side in sides for v in values[side]})
            raise ValueError(_unknown_message(criterion, unmatched, available))
        for side in sides:
            # A rectangle's axis that no pattern of this criterion names keeps its reps.
            if square or hit[side].any():
                keep[side] &= hit[side]
    chosen = {side: [r for r, k in zip(axes[side], keep[side], strict=True) if k]
              for side in sides}
    if not all(chosen.values()):
        raise ValueError(
            f"no representation matches all of reps={reps!r}, models={models!r}, layers={layers!r}"
        )
    return ds.sel(rep_a=chosen["a"], rep_b=chosen["a" if square else "b"])


def dissimilarity(
    ds: xr.Dataset | xr.DataArray,
    metric: str | None = None,
    *,
    min_reps: int = 2,
) -> xr.DataArray:
    """One checked, square dissimilarity matrix from a results Dataset.

    Distances are returned as they are. Similarities ``s`` with ones on the diagonal
    (``soft_matching_score``, ``linear_cka``) are turned into the chordal distance

    .. math:: d = \\sqrt{2 - 2 s},

    which for the soft matching score is exactly the soft matching distance between the
    representations with centred unit-norm tuning curves (:math:`d^2 = 2 - 2s` there), and for
    CKA the distance between the unit-norm centred Gram matrices; both are metrics.

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results Dataset (or one metric's DataArray) with dims ``(rep_a, rep_b)``.
    metric : str, optional
        Metric variable to use. Default: the only metric in the Dataset, else
        ``"soft_matching"`` when present.
    min_reps : int, default 2
        Fewest representations the caller can work with.

    Returns
    -------
    xarray.DataArray
        Named after the metric, dims ``(rep_a, rep_b)``, same coords, float64;
        ``attrs["kind"]`` is ``"distance"`` and ``attrs["source_kind"]`` the original kind.

    Raises
    ------
    ValueError
        Unknown metric, not square, different reps on the two axes, fewer than ``min_reps``
        reps, NaN/inf entries (naming the pairs), not symmetric (naming the worst pair), a
        non-zero diagonal or negative distances.
    """
    da = _pick(ds, metric)
    name = str(da.name)
    ids_a = [str(r) for r in da["rep_a"].values]
    ids_b = [str(r) for r in da["rep_b"].values]
    if ids_a != ids_b:
        raise ValueError(
            f"{name}: rep_a and rep_b hold different representations "
            f"({len(ids_a)} vs {len(ids_b)}; first difference: "
            f"{_first_difference(ids_a, ids_b)}): MDS, clustering and the rotation null need "
            "one square matrix of every pair of one selection, not a rectangle (a run with "
            "against=); analysis.best_matches ranks the rep_a models for each rep_b, and "
            "plot_heatmap draws a rectangle"
        )
    if len(ids_a) < min_reps:
        raise ValueError(
            f"{name}: {len(ids_a)} representation(s) {ids_a}, need at least {min_reps}"
        )
    values = np.asarray(da.values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        errors = _errors(ds, name)
        pairs = [
            f"{ids_a[i]} vs {ids_a[j]}" + (f" ({errors[i, j]})" if errors is not None else "")
            for i, j in zip(*np.nonzero(bad), strict=True)
            if i <= j
        ]
        raise ValueError(
            f"{name}: {len(pairs)} pair(s) are NaN or infinite, e.g. {', '.join(pairs[:5])}"
            " (an unfinished or failed run? `smd-dist status` shows it)"
        )
    scale = max(float(np.abs(values).max()), 1.0)
    asym = np.abs(values - values.T)
    if asym.max() > 1e-6 * scale:
        i, j = np.unravel_index(int(asym.argmax()), asym.shape)
        raise ValueError(
            f"{name}: matrix is not symmetric: {ids_a[i]} vs {ids_a[j]} is "
            f"{float(values[i, j]):.9g} but {ids_a[j]} vs {ids_a[i]} is {float(values[j, i]):.9g}"
        )
    values = (values + values.T) / 2
    kind = _kind(da, values)
    if kind == "similarity":
        _check_diagonal(name, ids_a, values, 1.0)
        dist = np.sqrt(np.clip(2.0 - 2.0 * values, 0.0, None))
    else:
        _check_diagonal(name, ids_a, values, 0.0)
        if (values < -1e-9 * scale).any():
            i, j = np.unravel_index(int(values.argmin()), values.shape)
            raise ValueError(
                f"{name}: negative distance {float(values[i, j]):.9g} between {ids_a[i]} "
                f"and {ids_a[j]}"
            )
        dist = np.clip(values, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    out = da.copy(data=dist)
    out.attrs = {**da.attrs, "kind": "distance", "source_kind": kind}
    return out


def rep_coords(da: xr.DataArray | xr.Dataset, dim: str = "rep") -> dict[str, tuple]:
    """The ``rep``/``model``/``layer``/``layer_index``/``n_neurons`` coords of the ``rep_a``
    axis, renamed (``layer_index`` and ``n_neurons`` where the results carry them)."""
    ids = [str(r) for r in da["rep_a"].values]
    coords: dict[str, tuple] = {dim: (dim, ids)}
    coords["model"] = (dim, [str(m) for m in _coord(da, "model_a", ids)])
    coords["layer"] = (dim, [str(x) for x in _coord(da, "layer_a", ids)])
    for name in ("layer_index", "n_neurons"):
        if f"{name}_a" in da.coords:
            coords[name] = (dim, np.asarray(da[f"{name}_a"].values))
    return coords


def _pick(ds: xr.Dataset | xr.DataArray, metric: str | None) -> xr.DataArray:
    if isinstance(ds, xr.DataArray):
        if tuple(ds.dims) != REP_DIMS:
            raise ValueError(f"expected dims {REP_DIMS}, got {tuple(ds.dims)} for {ds.name!r}")
        if metric is not None and ds.name is not None and metric != ds.name:
            raise ValueError(f"metric {metric!r} asked for, but the DataArray is {ds.name!r}")
        return ds if ds.name is not None else ds.rename(metric or "distance")
    names = metric_names(ds)
    if metric is None:
        if len(names) == 1:
            metric = names[0]
        elif "soft_matching" in names:
            metric = "soft_matching"
        else:
            raise ValueError(f"the Dataset holds several metrics {list(names)}; choose one")
    if metric not in names:
        close = difflib.get_close_matches(metric, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown metric {metric!r}: the Dataset holds {list(names)}{hint}")
    return ds[metric]


def _errors(ds: xr.Dataset | xr.DataArray, name: str) -> np.ndarray | None:
    if isinstance(ds, xr.Dataset) and f"{name}_error" in ds:
        return np.asarray(ds[f"{name}_error"].values).astype(str)
    return None


def _kind(da: xr.DataArray, values: np.ndarray) -> str:
    kind = da.attrs.get("kind")
    if kind in ("distance", "similarity"):
        return kind
    try:
        from smd_dist import metrics

        kind = metrics.get(str(da.name)).kind
    except Exception:  # placeholder registry, or a metric this install does not know
        kind = None
    if kind in ("distance", "similarity"):
        return kind
    if str(da.name) in _KNOWN_SIMILARITIES:
        return "similarity"
    return "similarity" if np.allclose(np.diag(values), 1.0) else "distance"


def _check_diagonal(name: str, ids: Sequence[str], values: np.ndarray, expected: float) -> None:
    off = np.abs(np.diag(values) - expected)
    if off.max() > 1e-6:
        i = int(off.argmax())
        raise ValueError(
            f"{name}: diagonal must be {expected} but {ids[i]} vs itself is "
            f"{float(values[i, i]):.9g}"
        )


def _check_layout(ds: xr.Dataset | xr.DataArray) -> None:
    missing = [d for d in REP_DIMS if d not in ds.dims]
    if missing:
        raise ValueError(
            f"not a results Dataset: dims {missing} missing (has {list(ds.dims)}); "
            "open one with smd_dist.open_distances"
        )


def _coord(ds: xr.Dataset | xr.DataArray, name: str, ids: Sequence[str]) -> list[str]:
    if name in ds.coords:
        return [str(v) for v in ds[name].values]
    # Without coords, fall back on the id "model/layer"; layer names hold no slash.
    part = 0 if name.startswith("model") else 1
    return [r.rsplit("/", 1)[part] if "/" in r else r for r in ids]


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"position {i}: {x!r} vs {y!r}"
    return f"lengths {len(a)} vs {len(b)}"


def _unknown_message(criterion: str, patterns: Sequence[str], available: Sequence[str]) -> str:
    hints = []
    for p in patterns:
        close = difflib.get_close_matches(p, available, n=3, cutoff=0.5)
        hints.append(f"{p!r}" + (f" (closest: {', '.join(close)})" if close else ""))
    shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
    singular = criterion[:-1]
    return f"unknown {singular} pattern(s): {'; '.join(hints)}; available {criterion}: {shown}"
