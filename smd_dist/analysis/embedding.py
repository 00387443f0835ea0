"""Embeddings of a distance matrix: classical (Torgerson) and metric (SMACOF) MDS."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import xarray as xr

from smd_dist.analysis._matrix import dissimilarity, rep_coords


@dataclass(frozen=True, eq=False)
class Embedding:
    """Coordinates of each representation in a low-dimensional Euclidean space.

    Attributes
    ----------
    coords : xarray.DataArray
        Named ``"mds"``, dims ``(rep, component)``; coords ``rep`` (``"model/layer"``),
        ``model``, ``layer``, ``n_neurons`` on ``rep`` and ``component`` = 1, 2, ...
    stress : float
        Kruskal's stress-1 of the embedding against the input distances (0 is a perfect fit;
        0.05 good, 0.1 fair, 0.2 poor).
    method : str
        ``"classical"`` or ``"metric"``.
    metric : str
        Name of the metric the distances came from.
    eigenvalues : numpy.ndarray or None
        Classical MDS: all eigenvalues of the double-centred matrix, largest first.
    negative_mass : float or None
        Classical MDS: :math:`\\sum_{\\lambda<0}|\\lambda| / \\sum|\\lambda|`, how far the
        distances are from being Euclidean (0 for Euclidean distances).
    """

    coords: xr.DataArray
    stress: float
    method: str
    metric: str
    eigenvalues: np.ndarray | None = None
    negative_mass: float | None = None


def classical_mds(
    ds: xr.Dataset | xr.DataArray, *, metric: str | None = None, n_components: int = 2
) -> Embedding:
    """Classical (Torgerson) multidimensional scaling.

    With :math:`D^{(2)}` the matrix of squared distances and :math:`J = I - \\frac1n 11^\\top`,

    .. math::

        B = -\\tfrac12 J D^{(2)} J = V \\Lambda V^\\top, \\qquad
        Z = V_k \\Lambda_k^{1/2},

    keeping the ``n_components`` largest eigenvalues (negative ones are clipped to zero). For
    Euclidean distances this recovers the configuration up to rotation, reflection and
    translation; the negative eigenvalue mass measures the departure from Euclidean.

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results Dataset (or one metric) with dims ``(rep_a, rep_b)``; similarities are turned
        into distances as in :func:`smd_dist.analysis.dissimilarity`.
    metric : str, optional
        Metric variable of the Dataset.
    n_components : int, default 2

    Returns
    -------
    Embedding

    References
    ----------
    Torgerson, W. S. (1952). Multidimensional scaling: I. Theory and method. Psychometrika 17.
    Khosla, M. & Williams, A. H. (2024). Soft matching distance: a metric on neural
    representations that captures single-neuron tuning. UniReps workshop, PMLR 243.
    """
    D = dissimilarity(ds, metric, min_reps=n_components + 1)
    values = D.values
    n = values.shape[0]
    J = np.eye(n) - 1.0 / n
    B = -0.5 * J @ (values**2) @ J
    eigvals, eigvecs = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    # eigh's eigenvector signs are arbitrary; fix them so the output is reproducible.
    signs = np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(n)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    top = np.clip(eigvals[:n_components], 0.0, None)
    Z = eigvecs[:, :n_components] * np.sqrt(top)
    total = float(np.abs(eigvals).sum())
    negative = float(np.abs(eigvals[eigvals < 0]).sum())
    return Embedding(
        coords=_labeled(Z, D, "classical"),
        stress=kruskal_stress(values, Z),
        method="classical",
        metric=str(D.name),
        eigenvalues=eigvals,
        negative_mass=negative / total if total > 0 else 0.0,
    )


def metric_mds(
    ds: xr.Dataset | xr.DataArray,
    *,
    metric: str | None = None,
    n_components: int = 2,
    init: str = "classical",
    n_init: int = 4,
    max_iter: int = 3000,
    random_state: int = 0,
) -> Embedding:
    """Metric multidimensional scaling (SMACOF) on the precomputed distances.

    Minimises the raw stress

    .. math:: \\sigma(Z) = \\sum_{i<j} \\bigl(\\lVert z_i - z_j \\rVert - d_{ij}\\bigr)^2

    with :class:`sklearn.manifold.MDS` (precomputed dissimilarities). The reported stress is
    Kruskal's stress-1 of the result, the same measure as for :func:`classical_mds`.

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results Dataset (or one metric) with dims ``(rep_a, rep_b)``.
    metric : str, optional
        Metric variable of the Dataset.
    n_components : int, default 2
    init : {"classical", "random"}, default "classical"
        Start from the classical MDS solution (one deterministic run) or from ``n_init``
        random starts drawn from ``random_state``.
    n_init : int, default 4
        Random starts when ``init="random"``.
    max_iter : int, default 3000
    random_state : int, default 0

    Returns
    -------
    Embedding

    References
    ----------
    de Leeuw, J. (1977). Applications of convex analysis to multidimensional scaling.
    Borg, I. & Groenen, P. (2005). Modern Multidimensional Scaling. Springer.
    """
    from sklearn.manifold import MDS

    if init not in ("classical", "random"):
        raise ValueError(f"init must be 'classical' or 'random', got {init!r}")
    D = dissimilarity(ds, metric, min_reps=n_components + 1)
    values = D.values
    params = inspect.signature(MDS).parameters
    kwargs: dict = {
        "n_components": n_components,
        "max_iter": max_iter,
        "random_state": random_state,
        "n_init": 1 if init == "classical" else n_init,
        "eps": 1e-9,
    }
    # scikit-learn 1.8 renamed dissimilarity= to metric= and metric= to metric_mds=.
    if "metric_mds" in params:
        kwargs.update(metric_mds=True, metric="precomputed", init="random")
    else:
        kwargs.update(metric=True, dissimilarity="precomputed")
    if "normalized_stress" in params:
        kwargs["normalized_stress"] = False
    start = None
    if init == "classical":
        start = classical_mds(D, n_components=n_components).coords.values
    Z = MDS(**kwargs).fit_transform(values, init=start)
    return Embedding(
        coords=_labeled(Z, D, "metric"),
        stress=kruskal_stress(values, Z),
        method="metric",
        metric=str(D.name),
    )


def kruskal_stress(distances: np.ndarray, Z: np.ndarray) -> float:
    """Kruskal's stress-1 of coordinates ``Z`` (n, k) against a distance matrix (n, n).

    .. math::

        S_1 = \\sqrt{\\frac{\\sum_{i<j} (\\lVert z_i - z_j\\rVert - d_{ij})^2}
                           {\\sum_{i<j} d_{ij}^2}}
    """
    i, j = np.triu_indices(distances.shape[0], k=1)
    fitted = np.linalg.norm(Z[i] - Z[j], axis=1)
    target = distances[i, j]
    denom = float((target**2).sum())
    return float(np.sqrt(((fitted - target) ** 2).sum() / denom)) if denom > 0 else 0.0


def _labeled(Z: np.ndarray, D: xr.DataArray, method: str) -> xr.DataArray:
    coords = rep_coords(D)
    coords["component"] = ("component", np.arange(1, Z.shape[1] + 1))
    return xr.DataArray(
        np.asarray(Z, dtype=np.float64),
        dims=("rep", "component"),
        coords=coords,
        name="mds",
        attrs={"method": method, "metric": str(D.name), "source_kind": D.attrs["source_kind"]},
    )
