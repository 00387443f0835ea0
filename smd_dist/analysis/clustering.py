"""Hierarchical clustering of representations from their distance matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from smd_dist.analysis._matrix import dissimilarity, rep_coords

_METHODS = ("single", "complete", "average", "weighted", "centroid", "median", "ward")


@dataclass(frozen=True, eq=False)
class Clustering:
    """Agglomerative clustering of representations.

    Attributes
    ----------
    linkage : numpy.ndarray
        SciPy linkage matrix, shape (n - 1, 4).
    labels : tuple of str
        Rep ids ``"model/layer"`` in Dataset order (the linkage's leaf numbering).
    leaf_order : tuple of int
        Indices into ``labels`` in dendrogram order, left to right.
    clusters : xarray.DataArray
        Named ``"cluster"``, dim ``rep`` with ``model``/``layer``/``n_neurons`` coords: flat
        cluster ids 1..k.
    method : str
        Linkage method.
    metric : str
        Name of the metric the distances came from.
    cophenetic_correlation : float
        Correlation between the input distances and the dendrogram's cophenetic distances.
    """

    linkage: np.ndarray
    labels: tuple[str, ...]
    leaf_order: tuple[int, ...]
    clusters: xr.DataArray
    method: str
    metric: str
    cophenetic_correlation: float

    @property
    def leaves(self) -> tuple[str, ...]:
        """Rep ids in dendrogram order."""
        return tuple(self.labels[i] for i in self.leaf_order)


def cluster(
    ds: xr.Dataset | xr.DataArray,
    *,
    metric: str | None = None,
    method: str = "average",
    n_clusters: int | None = None,
    threshold: float | None = None,
    optimal_ordering: bool = True,
) -> Clustering:
    """Hierarchical clustering of representations on their precomputed distances.

    Runs :func:`scipy.cluster.hierarchy.linkage` on the condensed distance matrix and cuts the
    tree into flat clusters, either into ``n_clusters`` groups or at a cophenetic
    ``threshold``. With ``method="average"`` (UPGMA) the merge distance of clusters
    :math:`A, B` is

    .. math:: d(A, B) = \\frac{1}{|A||B|} \\sum_{a \\in A} \\sum_{b \\in B} d(a, b).

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results Dataset (or one metric) with dims ``(rep_a, rep_b)``.
    metric : str, optional
        Metric variable of the Dataset.
    method : str, default "average"
        One of ``single, complete, average, weighted, centroid, median, ward``. The last three
        assume Euclidean distances (the soft matching distance is a metric but not Euclidean).
    n_clusters : int, optional
        Number of flat clusters. Default: the number of distinct models.
    threshold : float, optional
        Cut the tree at this distance instead (exclusive with ``n_clusters``).
    optimal_ordering : bool, default True
        Reorder leaves so that neighbours in the dendrogram are close (Bar-Joseph et al.).

    Returns
    -------
    Clustering

    References
    ----------
    Müllner, D. (2011). Modern hierarchical, agglomerative clustering algorithms.
    arXiv:1109.2378.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    if method not in _METHODS:
        raise ValueError(f"unknown linkage method {method!r}; choose one of {list(_METHODS)}")
    if n_clusters is not None and threshold is not None:
        raise ValueError(f"give n_clusters ({n_clusters}) or threshold ({threshold}), not both")
    D = dissimilarity(ds, metric, min_reps=2)
    coords = rep_coords(D)
    labels = tuple(coords["rep"][1])
    condensed = squareform(D.values, checks=False)
    Z = hierarchy.linkage(condensed, method=method, optimal_ordering=optimal_ordering)
    if threshold is not None:
        flat = hierarchy.fcluster(Z, t=threshold, criterion="distance")
    else:
        k = n_clusters if n_clusters is not None else len(set(coords["model"][1]))
        if not 1 <= k <= len(labels):
            raise ValueError(f"n_clusters must be between 1 and {len(labels)}, got {k}")
        flat = hierarchy.fcluster(Z, t=k, criterion="maxclust")
    coph, _ = hierarchy.cophenet(Z, condensed)
    return Clustering(
        linkage=Z,
        labels=labels,
        leaf_order=tuple(int(i) for i in hierarchy.leaves_list(Z)),
        clusters=xr.DataArray(
            flat.astype(np.int64),
            dims=("rep",),
            coords=coords,
            name="cluster",
            attrs={"method": method, "metric": str(D.name), "source_kind": D.attrs["source_kind"]},
        ),
        method=method,
        metric=str(D.name),
        cophenetic_correlation=float(coph) if np.isfinite(coph) else float("nan"),
    )
