"""Every pair of a few in-memory representations: :func:`pairwise`, no store needed.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column. Each array is prepared
once (:func:`smd_dist.kernel.prepared.prepare`, float64 from the caller's values, no
float32 round trip) and the metric runs on every pair, in this process for small inputs
or on a Dask client; the values equal the pair functions' (``soft_matching_distance``,
...) bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import xarray as xr

from smd_dist import metrics as metric_registry
from smd_dist.config import ConfigError
from smd_dist.engine import planning
from smd_dist.engine.settings import device_option, engine_settings, flag, preprocessing

__all__ = ["IN_PROCESS_ENTRIES", "pairwise"]

#: Without an explicit ``client``, work of at most this many cost entries (``Σ Nx·Ny``
#: over the pairs) runs in this process even when a Dask client exists: shipping the
#: arrays would cost more than the solves (about 4 s of solving here).
IN_PROCESS_ENTRIES = 2**26


def pairwise(
    reps: Mapping[str, object],
    metric: str = "soft_matching",
    *,
    against: Mapping[str, object] | None = None,
    center: bool = True,
    normalize: str | None = None,
    device=None,
    client=None,
) -> xr.DataArray:
    """One metric on every pair of in-memory representations (or every rep of ``reps``
    against every rep of ``against``), as a labeled matrix.

    For ``soft_matching``, entry ``(a, b)`` is

    .. math::

        d(X_a, X_b) = \\Big(\\min_{P \\ge 0,\\ P\\mathbf 1 = 1/N_a,\\ P^\\top\\mathbf 1 = 1/N_b}
        \\sum_{ij} P_{ij} \\lVert x_i - y_j \\rVert^2\\Big)^{1/2},

    for ``a`` before ``b`` in ``reps``: exactly what :func:`smd_dist.soft_matching_distance`
    returns for ``(reps[a], reps[b])`` (the matrix is symmetric; a solve's last bit may
    depend on the order of its arguments). With ``against``, entry ``(a, b)`` is exactly
    the pair function on ``(reps[a], against[b])``.

    Parameters
    ----------
    reps : mapping of str to array_like
        Name -> (stimuli, neurons) array; every array has the same stimuli, in the same
        order. The matrix keeps the mapping's order.
    metric : str
        A name from :func:`smd_dist.metrics.available`.
    against : mapping of str to array_like, optional
        A second set of (stimuli, neurons) arrays with the same stimuli (e.g. recorded
        areas): the matrix is then ``reps`` (rows, ``rep_a``) against them (columns,
        ``rep_b``). A name in both mappings for the same array object is one rep: it
        meets itself (the identity value) and each pair is solved once.
    center, normalize :
        Preprocessing, as in :func:`smd_dist.soft_matching_distance` (a metric with its
        own, such as ``soft_matching_score``, uses its own).
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"`` for the products (default: CUDA where
        present).
    client : distributed.Client, optional
        Run the pairs on this Dask client. Without one, the pairs run in this process,
        unless the work exceeds :data:`IN_PROCESS_ENTRIES` cost entries and Dask has a
        current client, which is then used. No cluster is ever started here.

    Returns
    -------
    xarray.DataArray
        Named after the metric, float64, dims ``(rep_a, rep_b)`` with the names as coords
        and ``n_neurons_a``/``n_neurons_b``; 0 (distances) or 1 (similarities) where a rep
        meets itself, symmetric without ``against``; NaN for a pair the metric does not
        define (``permutation`` on different widths). attrs: ``kind``, ``long_name``,
        ``preprocessing`` (JSON).

    Raises
    ------
    ValueError
        Not a mapping of names to arrays, an unknown metric, an array that cannot be
        compared (naming it: NaN/Inf, shape, constant neurons under normalisation), or
        different stimulus counts (naming both).
    smd_dist.SolverError
        A solve that could not be certified optimal (the note names the pair).

    Examples
    --------
    >>> import numpy as np, smd_dist
    >>> rng = np.random.default_rng(0)
    >>> reps = {f"layer{i}": rng.standard_normal((100, 20 + i)) for i in range(3)}
    >>> d = smd_dist.pairwise(reps)
    >>> d.sel(rep_a="layer0", rep_b="layer2").item() == smd_dist.soft_matching_distance(
    ...     reps["layer0"], reps["layer2"])
    True
    """
    _check_mapping(reps, "reps")
    if against is not None:
        _check_mapping(against, "against")
    chosen = metric_registry.get(metric)
    prep = chosen.preprocessing(**preprocessing(flag("center", center), normalize))
    device = device_option(device) if device is not None else None
    rows, cols, arrays = _keys(reps, against)
    names = list(arrays)
    widths = {}
    for name, array in arrays.items():
        if array.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D (stimuli, neurons) array, got shape {array.shape}"
            )
        widths[name] = array.shape[1]
    first = names[0]
    for name in names[1:]:
        if arrays[name].shape[0] != arrays[first].shape[0]:
            raise ValueError(
                f"stimulus count mismatch: {first} has {arrays[first].shape[0]} stimuli, "
                f"{name} has {arrays[name].shape[0]}"
            )
    if against is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    else:
        # A pair of reps that are on both axes is met twice: solved once, in row order.
        pairs = _once([(a, b) for a in rows for b in cols if a != b])
    defined = [p for p in pairs if not chosen.equal_width_only or widths[p[0]] == widths[p[1]]]
    entries = sum(widths[a] * widths[b] for a, b in defined)
    if client is None and entries > IN_PROCESS_ENTRIES:
        from smd_dist.engine.run import current_client

        client = current_client()
    if client is None:
        values = _pair_values(chosen.name, prep, device, defined, arrays)
    else:
        values = _on_client(client, chosen.name, prep, device, defined, arrays, widths)
    out = np.full((len(rows), len(cols)), np.nan)
    row_at = {key: i for i, key in enumerate(rows)}
    col_at = {key: j for j, key in enumerate(cols)}
    for (a, b), value in values.items():
        for u, v in ((a, b), (b, a)):
            if u in row_at and v in col_at:
                out[row_at[u], col_at[v]] = value
    for key in set(rows) & set(cols):
        out[row_at[key], col_at[key]] = 0.0 if chosen.kind == "distance" else 1.0
    return xr.DataArray(
        out,
        dims=("rep_a", "rep_b"),
        coords={
            "rep_a": np.array(list(reps), dtype=object),
            "rep_b": np.array(list(against or reps), dtype=object),
            "n_neurons_a": ("rep_a", np.array([widths[key] for key in rows], dtype="i8")),
            "n_neurons_b": ("rep_b", np.array([widths[key] for key in cols], dtype="i8")),
        },
        name=chosen.name,
        attrs={
            "kind": chosen.kind,
            "long_name": chosen.description,
            "preprocessing": json.dumps(prep),
        },
    )


def _once(pairs: list) -> list:
    """``pairs`` without the second of ``(a, b)`` and ``(b, a)``."""
    seen, out = set(), []
    for a, b in pairs:
        if (b, a) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def _check_mapping(reps, what: str) -> None:
    if not isinstance(reps, Mapping) or not reps:
        raise ConfigError(
            f"{what} must be a non-empty mapping of names to (stimuli, neurons) arrays, got "
            f"{type(reps).__name__}"
        )
    bad = [name for name in reps if not isinstance(name, str)]
    if bad:
        raise ConfigError(f"{what}: rep names must be strings, got {bad[:5]!r}")


def _keys(reps: Mapping, against: Mapping | None) -> tuple[list, list, dict]:
    """The matrix's rows and columns as keys of the arrays to compare (each once).

    A name of ``against`` that ``reps`` gives another array is keyed
    ``"<name> (against)"`` (numbered if need be), so that both are compared.
    """
    arrays = {name: np.asarray(value) for name, value in reps.items()}
    rows = list(reps)
    if against is None:
        return rows, rows, arrays
    cols = []
    for name, value in against.items():
        key = name
        if name in reps and reps[name] is not value:
            key, k = f"{name} (against)", 1
            while key in arrays:
                key, k = f"{name} (against {k})", k + 1
        arrays.setdefault(key, np.asarray(value))
        cols.append(key)
    return rows, cols, arrays


def _pair_values(metric: str, prep: dict, device, pairs, arrays) -> dict:
    """``{(a, b): value}`` for ``pairs``, each array prepared once, here."""
    from smd_dist.kernel.prepared import prepare

    chosen = metric_registry.get(metric)
    needed = dict.fromkeys(name for pair in pairs for name in pair)
    prepared = {name: prepare(arrays[name], **prep, name=name) for name in needed}
    out = {}
    for a, b in pairs:
        try:
            out[(a, b)] = float(chosen.compute(prepared[a], prepared[b], device=device).value)
        except Exception as err:
            err.add_note(f"pair {a} vs {b} ({metric})")
            raise
    return out


def _on_client(client, metric, prep, device, pairs, arrays, widths) -> dict:
    """:func:`_pair_values` in tasks of about ``task-entries`` cost entries on ``client``."""
    settings = engine_settings()
    names = list(dict.fromkeys(name for pair in pairs for name in pair))
    position = {name: i for i, name in enumerate(names)}
    blocks = planning.plan_blocks(
        [widths[name] for name in names],
        [position[a] for a, _ in pairs],
        [position[b] for _, b in pairs],
        task_entries=settings["task-entries"],
        max_pairs=settings["max-pairs-per-task"],
    )
    scattered = client.scatter({name: arrays[name] for name in names})
    futures = []
    for block in blocks:
        task_pairs = [(names[i], names[j]) for i, j in zip(block.a.tolist(), block.b.tolist(),
                                                              strict=True)]
        used = {name: scattered[name] for pair in task_pairs for name in pair}
        futures.append(
            client.submit(_pair_values, metric, prep, device, task_pairs, used, pure=False)
        )
    values = {}
    for part in client.gather(futures):
        values.update(part)
    return values
