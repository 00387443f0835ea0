"""Figures: distance heatmap, MDS scatter, dendrogram (matplotlib, Agg, no pyplot state).

Every function returns the :class:`matplotlib.figure.Figure` and, given a path ending in
``.png``, ``.svg`` or ``.pdf``, writes it there at ``figsize * dpi`` pixels (no tight bbox,
so the size is what was asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from smd_dist.analysis._matrix import _coord, _pick, dissimilarity, rep_coords
from smd_dist.analysis.clustering import Clustering
from smd_dist.analysis.embedding import Embedding

_FORMATS = (".png", ".svg", ".pdf")


def plot_heatmap(
    ds: xr.Dataset | xr.DataArray,
    path: str | Path | None = None,
    *,
    metric: str | None = None,
    order: Sequence[str] | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
    max_labels: int = 80,
    title: str | None = None,
):
    """Heatmap of one metric with layer tick labels, model names and lines between models.

    When every rep is the same layer of a different model, the ticks name the models. The
    colour range spans the off-diagonal entries only (the diagonal, 0 for a distance and 1
    for a similarity, would stretch it and wash out every difference), and the diagonal
    is drawn in grey.

    Parameters
    ----------
    ds : xarray.Dataset or xarray.DataArray
        Results Dataset (or one metric) with dims ``(rep_a, rep_b)``. The matrix is checked
        as in :func:`smd_dist.analysis.dissimilarity` but drawn in its own units (a score is
        drawn as a score).
    path : str or Path, optional
        Write the figure here (``.png``, ``.svg`` or ``.pdf``).
    metric : str, optional
        Metric variable of the Dataset.
    order : sequence of str, optional
        Rep ids in the order to draw (e.g. ``Clustering.leaves``). Default: Dataset order,
        models in blocks and layers in depth order.
    max_labels : int, default 80
        Above this many reps the per-layer tick labels are left out.

    A rectangular result (``compute_distances(against=...)``: other reps on the two axes)
    is drawn as it is, ``rep_a`` down and ``rep_b`` across, ticks naming the reps, the
    colour range over every value; ``order`` does not apply to it.
    """
    from matplotlib import colormaps

    picked = _pick(ds, metric)
    if [str(r) for r in picked["rep_a"].values] != [str(r) for r in picked["rep_b"].values]:
        return _plot_rectangle(picked, path, cmap=cmap, figsize=figsize, dpi=dpi,
                               max_labels=max_labels, title=title)
    D = dissimilarity(ds, metric)
    name = str(D.name)
    da = ds[name] if isinstance(ds, xr.Dataset) else ds
    if order is not None:
        order = [str(r) for r in order]
        missing = sorted(set(order) ^ set(str(r) for r in D["rep_a"].values))
        if missing:
            raise ValueError(f"order must list every rep exactly once; differs at {missing[:5]}")
        da = da.sel(rep_a=order, rep_b=order)
        D = D.sel(rep_a=order, rep_b=order)
    coords = rep_coords(D)
    models, layers = coords["model"][1], coords["layer"][1]
    n = len(models)
    if figsize is None:
        side = float(np.clip(3.0 + 0.22 * n, 5.0, 20.0))
        figsize = (side + 1.2, side)
    fig, ax = _figure(figsize)
    values = np.asarray(da.values, dtype=float).copy()
    np.fill_diagonal(values, np.nan)
    colours = colormaps[cmap].with_extremes(bad="0.85")
    off = values[np.isfinite(values)]
    limits = (float(off.min()), float(off.max())) if off.size else (None, None)
    image = ax.imshow(values, cmap=colours, interpolation="nearest", vmin=limits[0],
                      vmax=limits[1])
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(name)
    spans = _runs(models)
    # One layer across many nets: label the models and skip the per-model separators.
    by_model = len(set(layers)) == 1 and len(spans) > 1
    ticks = models if by_model else layers
    if n <= max_labels:
        ax.set_xticks(np.arange(n), ticks, rotation=90, fontsize=7)
        ax.set_yticks(np.arange(n), ticks, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if not by_model and len(spans) > 1:
        for start, _, _ in spans[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=1.2)
            ax.axvline(start - 0.5, color="white", linewidth=1.2)
        centres = [(a + b - 1) / 2 for a, b, _ in spans]
        names = [m for _, _, m in spans]
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, names, rotation=90, fontsize=8)
        right = ax.secondary_yaxis("right")
        right.set_yticks(centres, names, fontsize=8)
    if title is None:
        where = models[0] if len(spans) == 1 else f"{n} representations"
        where = f"{layers[0]} of {len(spans)} models" if by_model else where
        title = f"{name} ({where})"
    ax.set_title(title)
    return _finish(fig, path, dpi)


def _plot_rectangle(da, path, *, cmap, figsize, dpi, max_labels, title):
    """:func:`plot_heatmap` of a rectangular result."""
    from matplotlib import colormaps

    ids_a = [str(r) for r in da["rep_a"].values]
    ids_b = [str(r) for r in da["rep_b"].values]
    values = np.asarray(da.values, dtype=float)
    if figsize is None:
        figsize = (float(np.clip(3.0 + 0.22 * len(ids_b), 5.0, 20.0)) + 1.2,
                   float(np.clip(3.0 + 0.22 * len(ids_a), 4.0, 20.0)))
    fig, ax = _figure(figsize)
    image = ax.imshow(values, cmap=colormaps[cmap].with_extremes(bad="0.85"),
                      interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(str(da.name))
    for n, ids, set_ticks in ((len(ids_a), ids_a, ax.set_yticks),
                              (len(ids_b), ids_b, ax.set_xticks)):
        if n <= max_labels:
            kwargs = {"rotation": 90} if set_ticks == ax.set_xticks else {}
            set_ticks(np.arange(n), ids, fontsize=7, **kwargs)
        else:
            set_ticks([])
    spans = _runs([str(m) for m in _coord(da, "model_a", ids_a)])
    for start, _, _ in spans[1:]:
        ax.axhline(start - 0.5, color="white", linewidth=1.2)
    ax.set_title(title or f"{da.name} ({len(ids_a)} against {len(ids_b)} representations)")
    return _finish(fig, path, dpi)


#: ``plot_mds(annotate="auto")`` names every layer up to this many points, else the ends.
LABEL_ALL_UP_TO = 40


def plot_mds(
    embedding: Embedding,
    path: str | Path | None = None,
    *,
    components: tuple[int, int] = (1, 2),
    figsize: tuple[float, float] = (7.0, 6.0),
    dpi: int = 150,
    annotate: str | bool = "auto",
    title: str | None = None,
):
    """MDS scatter, one colour per model, each model's layers joined in depth order.

    Depth order is the ``layer_index`` the results carry (the order the layers were
    written to the store), else the order the reps appear in. The first layer of each
    model is drawn as a hollow square.

    Parameters
    ----------
    annotate : {"auto", "all", "ends", "none"} or bool
        Which points are named: every layer (``"all"``), each model's first and last
        (``"ends"``), none; ``"auto"`` names all of them up to :data:`LABEL_ALL_UP_TO`
        points, else the ends (``True`` is ``"auto"``, ``False`` is ``"none"``). The axes
        grow so that every name lies inside them.
    """
    modes = {True: "auto", False: "none"}
    mode = modes.get(annotate, annotate) if isinstance(annotate, bool) else annotate
    if mode not in ("auto", "all", "ends", "none"):
        raise ValueError(f"annotate must be 'auto', 'all', 'ends' or 'none', got {annotate!r}")
    Z = embedding.coords
    comps = [int(c) for c in Z["component"].values]
    for c in components:
        if c not in comps:
            raise ValueError(f"component {c} not in the embedding (has {comps})")
    x = Z.sel(component=components[0]).values
    y = Z.sel(component=components[1]).values
    models = [str(m) for m in Z["model"].values]
    layers = [str(v) for v in Z["layer"].values]
    depth = (
        [int(v) for v in Z["layer_index"].values]
        if "layer_index" in Z.coords
        else list(range(len(models)))
    )
    if mode == "auto":
        mode = "all" if len(models) <= LABEL_ALL_UP_TO else "ends"
    fig, ax = _figure(figsize)
    colours = _colours(_unique(models))
    named = []
    for model, colour in colours.items():
        idx = sorted((i for i, m in enumerate(models) if m == model), key=lambda i: depth[i])
        ax.plot(x[idx], y[idx], "-", color=colour, alpha=0.6, linewidth=1.2)
        ax.scatter(x[idx], y[idx], color=colour, s=28, label=model, zorder=3)
        ax.scatter(
            x[idx[0]], y[idx[0]], s=90, marker="s", facecolors="none", edgecolors=colour, zorder=3
        )
        named += {"all": idx, "ends": list(dict.fromkeys([idx[0], idx[-1]]))}.get(mode, [])
    # "box": the limits set below (names inside, the axes' area filled) are kept; with
    # "datalim" Matplotlib would move them again.
    ax.set_aspect("equal", adjustable="box")
    _fit_limits(fig, ax, _annotate(ax, [(layers[i], x[i], y[i]) for i in named]))
    if len(colours) <= 20:
        ax.legend(fontsize=7, loc="best", frameon=False)
    ax.set_xlabel(f"MDS {components[0]}")
    ax.set_ylabel(f"MDS {components[1]}")
    what = _distance_label(embedding.metric, embedding.coords.attrs.get("source_kind"))
    ax.set_title(title or f"{embedding.method} MDS of {what} (stress {embedding.stress:.3f})")
    return _finish(fig, path, dpi)


def plot_dendrogram(
    clustering: Clustering,
    path: str | Path | None = None,
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
    title: str | None = None,
):
    """Dendrogram with leaf labels ``model/layer`` coloured by model."""
    from scipy.cluster import hierarchy

    n = len(clustering.labels)
    if figsize is None:
        figsize = (float(np.clip(2.0 + 0.25 * n, 6.0, 24.0)), 5.0)
    fig, ax = _figure(figsize)
    hierarchy.dendrogram(
        clustering.linkage,
        labels=list(clustering.labels),
        ax=ax,
        leaf_rotation=90,
        leaf_font_size=7 if n <= 80 else 4,
        color_threshold=0,
        above_threshold_color="0.3",
    )
    models = dict(zip(clustering.labels, clustering.clusters["model"].values, strict=True))
    colours = _colours(_unique([str(models[r]) for r in clustering.labels]))
    for label in ax.get_xticklabels():
        label.set_color(colours.get(str(models.get(label.get_text(), "")), "black"))
    ax.set_ylabel(_distance_label(clustering.metric, clustering.clusters.attrs.get("source_kind")))
    ax.set_title(
        title
        or f"{clustering.method} linkage, cophenetic r = {clustering.cophenetic_correlation:.3f}"
    )
    return _finish(fig, path, dpi)


def _annotate(ax, points) -> list:
    """Name each point (text, x, y), each text pointing away from the middle of the cloud."""
    if not points:
        return []
    mid_x = float(np.median([p[1] for p in points]))
    mid_y = float(np.median([p[2] for p in points]))
    texts = []
    for text, px, py in points:
        right, up = px >= mid_x, py >= mid_y
        texts.append(
            ax.annotate(
                text,
                (px, py),
                fontsize=7,
                xytext=(4 if right else -4, 3 if up else -3),
                textcoords="offset points",
                ha="left" if right else "right",
                va="bottom" if up else "top",
            )
        )
    return texts


def _fit_limits(fig, ax, texts) -> None:
    """Widen the limits until every text lies inside them and the data fill the axes' area
    at equal aspect (one unit the same length on both axes)."""
    for _ in range(8):  # the limits move the points, which move the texts: a few rounds
        fig.canvas.draw()
        to_data = ax.transData.inverted()
        boxes = [t.get_window_extent().transformed(to_data) for t in texts]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        nx0, nx1 = min([x0, *(b.x0 for b in boxes)]), max([x1, *(b.x1 for b in boxes)])
        ny0, ny1 = min([y0, *(b.y0 for b in boxes)]), max([y1, *(b.y1 for b in boxes)])
        area = ax.get_position(original=True)
        width, height = fig.get_size_inches()
        ratio = (area.height * height) / (area.width * width)
        if (ny1 - ny0) < ratio * (nx1 - nx0):
            grow = (ratio * (nx1 - nx0) - (ny1 - ny0)) / 2
            ny0, ny1 = ny0 - grow, ny1 + grow
        else:
            grow = ((ny1 - ny0) / ratio - (nx1 - nx0)) / 2
            nx0, nx1 = nx0 - grow, nx1 + grow
        if np.allclose([nx0, nx1, ny0, ny1], [x0, x1, y0, y1], rtol=0, atol=1e-9 * (nx1 - nx0)):
            return
        ax.set_xlim(nx0, nx1)
        ax.set_ylim(ny0, ny1)


def _distance_label(metric: str, source_kind: str | None) -> str:
    # Similarities were turned into sqrt(2 - 2 s) before embedding or clustering.
    return f"sqrt(2 - 2 {metric})" if source_kind == "similarity" else metric


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, path, dpi):
    if path is not None:
        path = Path(path)
        if path.suffix.lower() not in _FORMATS:
            raise ValueError(f"figure path {str(path)!r} must end in one of {list(_FORMATS)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _runs(values: Sequence[str]) -> list[tuple[int, int, str]]:
    """Maximal runs of equal consecutive values as (start, stop, value)."""
    runs: list[tuple[int, int, str]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i + 1, v)
        else:
            runs.append((i, i + 1, v))
    return runs


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    if cmap.N < 256:
        return {m: cmap(i % cmap.N) for i, m in enumerate(names)}
    return {m: cmap(i / max(len(names) - 1, 1)) for i, m in enumerate(names)}
