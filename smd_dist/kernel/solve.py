"""Exact optimal transport between two uniform clouds of tuning curves, with a certificate.

The problem solved for every pair is the discrete 2-Wasserstein transport with uniform
marginals,

.. math::

    \\min_{P \\ge 0} \\sum_{ij} P_{ij} D_{ij}, \\qquad P\\mathbf 1 = \\tfrac{1}{N_x}\\mathbf 1,
    \\quad P^\\top \\mathbf 1 = \\tfrac{1}{N_y}\\mathbf 1, \\qquad
    D_{ij} = \\lVert x_i - y_j \\rVert^2,

and its dual :math:`\\max \\sum_i u_i/N_x + \\sum_j v_j/N_y` subject to
:math:`D_{ij} - u_i - v_j \\ge 0`. Every solve returns a plan, dual potentials and a
:class:`Certificate`: the worst violation ``max(0, -min_ij (D_ij - u_i - v_j))`` and the gap
``primal - dual``. For any feasible plan :math:`Q`,
:math:`\\langle Q, D\\rangle \\ge \\text{dual} - \\text{violation}` (the masses sum to one), so
the returned plan is within ``gap + violation`` of the optimum; the solve is accepted only
when that is at most the tolerance, else :class:`SolverError` is raised.

Methods (``solver`` strings), chosen per pair from the data (:func:`solve`):

``"merged-…"``
    Identical columns (dead units, exact copies) are interchangeable: each group becomes one
    neuron carrying the group's mass, the smaller problem is solved by one of the methods
    below, and the plan is spread evenly back over the copies (same cost and duals, so the
    certificate holds for the original problem).
``"sparse-network-simplex"``
    Pairs from :data:`SPARSE_MIN_ENTRIES` entries, any widths. The full cost matrix is never
    formed in float64: :class:`smd_dist.screening.CostBounds` gives a rigorous lower bound on
    every entry from one low-precision product, POT's network simplex solves the problem on
    a sparse candidate set with exact costs, and every entry the bounds cannot prove dual
    feasible is computed exactly and joins the candidates until none is violated
    (:mod:`smd_dist.sparse_simplex`). The certificate is then a proof over the whole
    matrix: exact on the candidates, by the bound elsewhere. Any failure falls back to the
    dense methods below, which work on the float64 cost matrix.
``"assignment"``
    Equal widths without near ties: the optimum is a permutation matrix divided by N
    (Birkhoff–von Neumann), found with SciPy's Jonker–Volgenant shortest augmenting path
    solver (:func:`scipy.optimize.linear_sum_assignment`). It returns no duals; they are
    shortest-path distances in the residual graph (column j reachable from the column matched
    to row i at cost ``D_ij - D_i,σ(i)``), computed by vectorised Bellman–Ford on a sparse
    candidate edge set that grows by pricing every entry until no reduced cost is negative.
``"network-simplex"``
    Different widths, near ties on many rows or columns (redundant neurons, where augmenting
    path solvers stall), and the last fallback: POT's network simplex with an iteration cap
    that cannot bind and its status checked.
``"replicated-assignment"``
    Only on request (``method=``): each neuron copied L/N times, L = lcm(Nx, Ny), and the
    L×L assignment solved (exact by Birkhoff; compact duals are the copies' mean duals). The
    copies are exact ties, and it was measured about twice as slow as network simplex at
    1024×2048.

References
----------
.. [1] Jonker, R., & Volgenant, A. (1987). A shortest augmenting path algorithm for dense and
   sparse linear assignment problems. Computing, 38(4), 325–340.
.. [2] Crouse, D. F. (2016). On implementing 2D rectangular assignment algorithms. IEEE
   Transactions on Aerospace and Electronic Systems, 52(4), 1679–1696.
.. [3] Higham, N. J. (2002). Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1
   (inner products in floating point). SIAM.
.. [4] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
.. [5] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import ot
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from smd_dist.derived import derived, freeze
from smd_dist.prepare import resolve_device, squared_distances
from smd_dist.screening import (
    BoundViolation,
    CostBounds,
    LowPrecision,
    ReducedPrecision,
    low_precision,
    product_dtype,
    reduced_float32_matmul,
)
from smd_dist.sparse_simplex import MAX_EXACT_FRACTION, MAX_ITER, SparseUnsuitable, solve_sparse
from smd_dist.sparse_simplex import SOLVER as SPARSE_SOLVER

__all__ = [
    "Certificate",
    "SolverError",
    "Transport",
    "certify",
    "plan_cost",
    "representatives_first",
    "solve",
    "solve_assignment",
    "tolerance",
]

#: Relative tolerance of the certificate, scaled by ``max ||x||² + max ||y||²``. Each float64
#: cost entry is off by at most a few ulps of that scale from the expansion
#: ``|x|² + |y|² - 2 xᵀy`` (rounding grows like sqrt(M)·eps ≈ 1e-14 even at M = 10⁴), so
#: 1e-11 is three orders above rounding yet far below any difference that matters: a plan
#: found in float32 was measured 2e-9 relatively suboptimal, which this rejects.
RELATIVE_TOLERANCE = 1e-11

#: Network simplex iteration cap, dense as sparse: high enough never to bind.
NETWORK_SIMPLEX_MAX_ITER = MAX_ITER

#: ``method="replicated-assignment"`` refuses L = lcm(Nx, Ny) above this × max(Nx, Ny).
REPLICATION_FACTOR = 4

_ROW_CHUNK = 1024


class SolverError(ValueError):
    """A transport solve that did not reach, or could not prove, optimality."""


@dataclass(frozen=True)
class Certificate:
    """Proof of optimality of a transport plan.

    Attributes
    ----------
    max_violation : float
        ``max(0, -min_ij (D_ij - u_i - v_j))``: how far the dual potentials are from feasible.
    gap : float
        ``primal - dual``, with primal ``Σ P_ij D_ij`` and dual ``Σ u_i a_i + Σ v_j b_j``.
    tolerance : float
        Bound that ``max(gap, 0) + max_violation`` and ``-gap`` must not exceed.
    primal, dual : float
        The two objective values.
    """

    max_violation: float
    gap: float
    tolerance: float
    primal: float
    dual: float

    @property
    def bound(self) -> float:
        """Upper bound on ``primal - optimum``."""
        return max(self.gap, 0.0) + self.max_violation

    @property
    def passed(self) -> bool:
        return self.bound <= self.tolerance and self.gap >= -self.tolerance

    def raise_if_failed(self) -> None:
        """Raise :class:`SolverError` quoting the numbers unless the certificate passed."""
        if not self.passed:
            raise SolverError(
                f"certificate failed: gap {self.gap:.3g}, max violation "
                f"{self.max_violation:.3g}, tolerance {self.tolerance:.3g}"
            )

    def as_dict(self) -> dict:
        """JSON-safe summary (the engine stores these three)."""
        return {
            "max_violation": float(self.max_violation),
            "gap": float(self.gap),
            "tolerance": float(self.tolerance),
        }


@dataclass(frozen=True)
class Transport:
    """An optimal, certified transport plan between two clouds of tuning curves.

    Attributes
    ----------
    cost : float
        ``Σ P_ij ||x_i - y_j||²`` evaluated in float64 directly from the columns (no
        ``|x|² + |y|² - 2xᵀy`` cancellation), summed exactly with :func:`math.fsum`.
    rows, cols, mass : numpy.ndarray
        The plan's support: ``P[rows[k], cols[k]] = mass[k]``, sorted by (row, col).
    u, v : numpy.ndarray
        Dual potentials, shapes (Nx,) and (Ny,).
    shape : tuple of int
        ``(Nx, Ny)``.
    solver : str
        ``"assignment"``, ``"replicated-assignment"`` or ``"network-simplex"``.
    certificate : Certificate
    """

    cost: float
    rows: np.ndarray
    cols: np.ndarray
    mass: np.ndarray
    u: np.ndarray
    v: np.ndarray
    shape: tuple
    solver: str
    certificate: Certificate

    def plan(self) -> sp.coo_array:
        """The transport plan as a SciPy sparse (COO) array of shape (Nx, Ny)."""
        return sp.coo_array((self.mass, (self.rows, self.cols)), shape=self.shape)


def tolerance(X: np.ndarray, Y: np.ndarray) -> float:
    """Certificate tolerance ``RELATIVE_TOLERANCE · (max ||x_i||² + max ||y_j||²)``."""
    return _tolerance(_squared_norms(X), _squared_norms(Y))


def _squared_norms(A: np.ndarray) -> np.ndarray:
    return np.einsum("mi,mi->i", A, A)


def _tolerance(sq_norms_x, sq_norms_y) -> float:
    return float(RELATIVE_TOLERANCE * (sq_norms_x.max() + sq_norms_y.max()))


def _min_reduced_cost(D: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    out = math.inf
    for s in range(0, D.shape[0], _ROW_CHUNK):
        R = D[s : s + _ROW_CHUNK] - u[s : s + _ROW_CHUNK, None] - v[None, :]
        low = float(R.min())
        if math.isnan(low):  # NaN costs or duals: nothing is proven
            return -math.inf
        out = min(out, low)
    return out


def _marginals(shape, counts):
    """Row and column masses: uniform, or ``counts / counts.sum()`` for merged duplicates."""
    if counts is None:
        return np.full(shape[0], 1.0 / shape[0]), np.full(shape[1], 1.0 / shape[1])
    cx, cy = counts
    return cx / cx.sum(), cy / cy.sum()


def certify(
    D, rows, cols, mass, u, v, min_reduced=None, *, tol: float, counts=None
) -> Certificate:
    """Certificate of a plan ``(rows, cols, mass)`` with duals ``(u, v)`` on costs ``D``.

    Also checks the plan is feasible (non-negative, marginals right to 1e-9 relative); an
    infeasible plan raises :class:`SolverError` since no gap could vouch for it. ``counts``
    are integer multiplicities of merged identical neurons (uniform marginals when None);
    ``min_reduced``, when the solver already priced every entry with these duals, is the
    smallest reduced cost it found (saving a pass over ``D``).
    """
    nx, ny = D.shape
    a, b = _marginals(D.shape, counts)
    if mass.size == 0 or mass.min() < 0:
        raise SolverError("transport plan has negative or no mass")
    rs = np.bincount(rows, weights=mass, minlength=nx)
    cs = np.bincount(cols, weights=mass, minlength=ny)
    err = max(np.abs(rs / a - 1).max(), np.abs(cs / b - 1).max())
    if not err <= 1e-9:
        raise SolverError(f"transport plan marginals off by {err:.3g} (relative)")
    primal = math.fsum(mass * D[rows, cols])
    dual = math.fsum(a * u) + math.fsum(b * v)
    if min_reduced is None or math.isnan(min_reduced):
        min_reduced = _min_reduced_cost(D, u, v)
    violation = max(0.0, -min_reduced)
    return Certificate(
        max_violation=violation, gap=primal - dual, tolerance=tol, primal=primal, dual=dual
    )


def plan_cost(X, Y, rows, cols, mass) -> float:
    """``Σ_k mass_k ||x_{rows_k} - y_{cols_k}||²`` in float64 without cancellation.

    Summed with :func:`math.fsum` (correctly rounded), so the value depends only on the plan,
    not on summation order or thread count.
    """
    terms = exact_costs(X, Y, rows, cols)
    return math.fsum(mass * terms)


# --------------------------------------------------------------------------- assignment


def _bellman_ford(n, src, dst, w, *, slack, start=None):
    """Shortest distances from a virtual source joined to every node by a zero edge.

    Vectorised over edges; a node is updated only when it improves by more than ``slack``,
    so rounding-level cycles cannot stall it (the certificate absorbs ``slack``). ``start``
    may be any potentials (e.g. a previous round's): what the duals need is a fixed point,
    ``d[dst] >= d[src] + w - slack`` on every edge, not the shortest distances themselves,
    and a fixed point exists exactly when no cycle is negative.
    """
    order = np.lexsort((src, dst))
    src, dst, w = src[order], dst[order], w[order]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
    d = np.zeros(n) if start is None else start.copy()
    for _ in range(n + 1):
        nd = np.minimum.reduceat(d[src] + w, starts)
        better = nd < d - slack
        if not better.any():
            return d
        d = np.where(better, nd, d)
    raise SolverError("negative cycle in the residual graph: the assignment is not optimal")


def _assignment_duals(D, sigma, *, tol, k=8, max_rounds=50):
    """Dual potentials (u, v) certifying the permutation ``sigma`` (row i -> column sigma[i]),
    and the smallest reduced cost over all entries.

    Column potentials are shortest-path distances on a sparse set of candidate edges (the
    matched edges plus the k cheapest per row and per column); every entry is then priced,
    and the most violated ones per row and column join the set until none is violated.
    """
    n = D.shape[0]
    ar = np.arange(n)
    matched = D[ar, sigma]
    keys = np.unique(np.concatenate([ar * np.int64(n) + sigma, _candidates(D, k)]))
    slack = tol / 8
    v = None
    for _ in range(max_rounds):
        ri, cj = keys // n, keys % n
        v = _bellman_ford(n, sigma[ri], cj, D[ri, cj] - matched[ri], slack=slack, start=v)
        u = matched - v[sigma]
        new, low = _violations(D, u, v, thr=tol / 16, k=k)
        if new.size == 0:
            return u, v, low
        keys = np.union1d(keys, new)
    raise SolverError(f"dual pricing did not converge in {max_rounds} rounds")


def solve_assignment(D, *, tol):
    """Optimal permutation for a square cost matrix and certifying duals.

    Returns
    -------
    sigma : numpy.ndarray of int
        Row i is matched to column ``sigma[i]``.
    u, v : numpy.ndarray
        Dual potentials with ``D - u - v >= -tol`` (to the certificate's precision).
    """
    rows, sigma = linear_sum_assignment(D)
    if not np.array_equal(rows, np.arange(D.shape[0])):
        raise SolverError("linear_sum_assignment returned an incomplete assignment")
    u, v, _ = _assignment_duals(D, sigma, tol=tol)
    return sigma, u, v


def _assignment(D, *, tol):
    n = D.shape[0]
    rows, sigma = linear_sum_assignment(D)
    if not np.array_equal(rows, np.arange(n)):
        raise SolverError("linear_sum_assignment returned an incomplete assignment")
    u, v, low = _assignment_duals(D, sigma, tol=tol)
    return rows, sigma, np.full(n, 1.0 / n), u, v, low


#: Pairs with at least this many entries (``Nx·Ny``, after merging identical neurons) go
#: to the sparse path first; below it the dense float64 path is faster (measured on one
#: core at M = 2000: 128² 7 ms dense against 9 ms sparse, 256x512 53 against 32 ms).
SPARSE_MIN_ENTRIES = 256 * 256
#: Below this many entries, pairs with more than :data:`SPARSE_TIED_LIMIT` nearly tied rows
#: or columns (near-duplicate neurons) go dense: the sparse path needs more rounds there
#: (measured at 512²: 67 ms dense against 84 ms sparse; even at 1024²).
SPARSE_TIED_MIN_ENTRIES = 1024 * 1024
SPARSE_TIED_LIMIT = 0.5


def _replicated(D, *, tol):
    nx, ny = D.shape
    L = math.lcm(nx, ny)
    if L > REPLICATION_FACTOR * max(nx, ny):
        raise SolverError(f"replicating {nx}x{ny} needs an {L}x{L} assignment; too large")
    rx, ry = L // nx, L // ny
    DL = np.repeat(np.repeat(D, rx, axis=0), ry, axis=1)
    sigma, uL, vL = solve_assignment(DL, tol=tol)
    # Averaging the copies' duals keeps feasibility (each compact reduced cost is a mean of
    # the copies' non-negative ones) and the dual objective (same weights 1/L per copy).
    u = uL.reshape(nx, rx).mean(axis=1)
    v = vL.reshape(ny, ry).mean(axis=1)
    keys, counts = np.unique((np.arange(L) // rx) * np.int64(ny) + sigma // ry, return_counts=True)
    return keys // ny, keys % ny, counts / L, u, v


def _network_simplex(D, *, tol, potentials=None, counts=None):
    a, b = _marginals(D.shape, counts)
    G, u, v = _emd(a, b, D, potentials)
    rows, cols = np.nonzero(G > 0)
    return rows, cols, G[rows, cols], u, v


def exact_costs(X, Y, rows, cols) -> np.ndarray:
    """``||x_{rows_k} - y_{cols_k}||²`` for each k, in float64 from the differences."""
    step = max(1, (1 << 15) // max(X.shape[0], 1))  # blocks that stay in cache
    XT, YT = X.T, Y.T  # rows are tuning curves: contiguous for neuron-major arrays
    out = np.empty(len(rows))
    for s in range(0, len(rows), step):
        # The gathered copy is the difference's buffer: one temporary fewer (20 % faster
        # at 2048 neurons, M = 2000), and (y - x)² is (x - y)² bit for bit.
        diff = YT[cols[s : s + step]]
        diff -= XT[rows[s : s + step]]
        diff *= diff
        out[s : s + step] = diff.sum(axis=1)
    return out


def _two_smallest_per_column(D):
    """Smallest and second smallest entry of every column (ties count twice).

    Three row-wise vectorised passes; a column-wise argmin or sort is several times slower
    on a C-ordered matrix.
    """
    first = D.min(axis=0)
    at_min = D == first
    second = np.where(at_min, np.inf, D).min(axis=0)
    return first, np.where(at_min.sum(axis=0) > 1, first, second)


def _candidates(D, k):
    """Keys ``i*ny + j`` of the k cheapest entries of every row."""
    nx, ny = D.shape
    kr = min(k, ny)
    cr = torch.topk(torch.from_numpy(D), kr, dim=1, largest=False, sorted=False).indices.numpy()
    return (np.arange(nx)[:, None] * np.int64(ny) + cr).ravel()


def _violations(D, u, v, *, thr, k):
    """Keys of the k most violated entries (reduced cost below ``-thr``) of every row, and
    the smallest reduced cost of all (the certificate's, so no second pass is needed).

    Rows suffice: every violated entry lies in a violated row.
    """
    nx, ny = D.shape
    kk = min(k, ny)
    new = []
    low = math.inf
    for s in range(0, nx, _ROW_CHUNK):
        R = D[s : s + _ROW_CHUNK] - u[s : s + _ROW_CHUNK, None]
        R -= v[None, :]
        row_min = R.min(axis=1)
        m = float(row_min.min())
        low = m if (math.isnan(m) or m < low) else low  # a NaN sticks: nothing is proven
        bad = np.flatnonzero(row_min < -thr)
        if bad.size:
            Rb = R[bad]
            idx = (
                np.argpartition(Rb, kk - 1, axis=1)[:, :kk]
                if kk < ny
                else np.tile(np.arange(ny), (bad.size, 1))
            )
            keep = np.take_along_axis(Rb, idx, axis=1) < -thr
            new.append(((bad + s)[:, None] * np.int64(ny) + idx)[keep])
    return (np.concatenate(new) if new else np.empty(0, np.int64)), low


def _emd(a, b, D, potentials=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        G, log = ot.emd(
            a, b, D, numItermax=NETWORK_SIMPLEX_MAX_ITER, log=True, potentials_init=potentials
        )
    code = int(log.get("result_code", -1))
    if code != 1 or any("numItermax" in str(w.message) for w in caught):
        msg = log.get("warning") or "; ".join(str(w.message) for w in caught)
        raise SolverError(f"network simplex did not reach optimality (code {code}): {msg}")
    return G, np.asarray(log["u"], float), np.asarray(log["v"], float)


_METHODS = {
    "assignment": _assignment,
    "replicated-assignment": _replicated,
    "network-simplex": _network_simplex,
}


#: A row (column) is *ambiguous* when its two cheapest entries differ by less than this
#: fraction of its typical cost spread: near-duplicate or dead neurons, i.e. near ties.
AMBIGUITY_GAP = 1e-3
#: Above this fraction of ambiguous rows or columns, shortest augmenting path solvers stall on
#: the ties (measured: Jonker–Volgenant 10× slower than simplex on redundant layers) and the
#: network simplex, which pivots through degenerate ties cheaply, is used directly.
AMBIGUITY_LIMIT = 0.05


def ambiguity(D: np.ndarray) -> float:
    """Fraction of rows or columns (the larger) whose best two costs are nearly tied.

    A cheap structural probe that detects redundant and dead neurons: it looks at every
    8th row (for rows) and every 8th column (for columns) only.
    """
    if isinstance(D, torch.Tensor):
        D = D.cpu().numpy()
    if min(D.shape) < 2:
        return 0.0
    sub = D[::8]
    t = torch.topk(torch.from_numpy(sub), 2, dim=1, largest=False).values.numpy()
    rows = (t[:, 1] - t[:, 0]) <= AMBIGUITY_GAP * (sub.mean(axis=1) - t[:, 0])
    sub = np.ascontiguousarray(D[:, ::8])
    c1, c2 = _two_smallest_per_column(sub)
    cols = (c2 - c1) <= AMBIGUITY_GAP * (sub.mean(axis=0) - c1)
    return float(max(rows.mean(), cols.mean()))


def choose_method(D: np.ndarray) -> str:
    """The exact method tried first on float64 costs ``D`` (deterministic in ``D``)."""
    nx, ny = D.shape
    if nx == ny and nx > 1 and ambiguity(D) <= AMBIGUITY_LIMIT:
        return "assignment"
    return "network-simplex"


def _unique_columns(X):
    """Representative column of each group of identical columns, each column's group, counts.

    Columns are bucketed by a weighted sum (non-constant weights, since centred columns all
    sum to about zero; the same operations for every column, so identical columns get
    identical fingerprints) and a bucket's members are merged only after an exact
    comparison with the bucket's first column. Groups are numbered by first occurrence.
    """
    m, n = X.shape
    w = np.cos(np.arange(m) * 0.7548776662466927) + 1.5  # any fixed, non-constant weights
    f = np.einsum("m,mn->n", w, X)
    order = np.lexsort((np.arange(n), f))
    same = f[order][1:] == f[order][:-1]
    group = np.arange(n)
    if same.any():
        starts = np.flatnonzero(np.r_[True, ~same])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = order[s:e]  # ascending column index within a bucket
            first = members[0]
            for j in members[1:]:
                if np.array_equal(X[:, j], X[:, first]):
                    group[j] = first
    reps, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    return reps, inverse, counts.astype(np.int64)


def representatives_first(X: np.ndarray) -> np.ndarray:
    """``X`` with its columns reordered so that one of each group of identical columns
    comes first, in order, and the other copies after them.

    :func:`solve` merges identical columns (dead units, exact copies) into one neuron
    carrying the group's mass. On an array in this order the merged problem's columns are
    a prefix of it, a view, and the kernel keeps no second, merged copy of a prepared rep
    next to it (in float64 and in low precision). Every metric here is invariant to
    permuting neurons, so the engine prepares reps this way.

    Parameters
    ----------
    X : numpy.ndarray, shape (M, N), writeable
        Reordered in place (no copy: a copy of each kept rep is what this avoids). In
        Fortran (neuron-major) order the prefix is contiguous.

    Returns
    -------
    numpy.ndarray
        ``X`` itself.
    """
    keep, group, _ = _unique_columns(X)
    if keep.size == X.shape[1]:
        return X
    # keep is ascending, so keep[q] >= q: moving left never overwrites a representative
    # that has not moved yet, only copies, whose values their representative still holds.
    for q, j in enumerate(keep):
        if q != j:
            X[:, q] = X[:, j]
    copies = np.setdiff1d(np.arange(X.shape[1]), keep, assume_unique=True)
    for t, j in enumerate(copies, start=keep.size):
        X[:, t] = X[:, group[j]]  # the copy's representative, now at its group's number
    return X


def _is_prefix(keep: np.ndarray) -> bool:
    return keep.size == 0 or int(keep[-1]) == keep.size - 1


def _expand(rows, cols, mass, gx, gy, cx, cy):
    """Spread each merged plan entry evenly over all pairs of the merged neurons' copies."""
    mx = np.argsort(gx, kind="stable")
    my = np.argsort(gy, kind="stable")
    sx = np.r_[0, np.cumsum(cx)]
    sy = np.r_[0, np.cumsum(cy)]
    n = cx[rows] * cy[cols]
    k = np.repeat(np.arange(rows.size), n)
    off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    r = mx[sx[rows][k] + off // cy[cols][k]]
    c = my[sy[cols][k] + off % cy[cols][k]]
    order = np.lexsort((c, r))
    return r[order], c[order], np.repeat(mass / n, n)[order]


def _run(D, order, *, tol, counts=None):
    """Try each method in turn; return the first certified ``(name, plan, duals, cert)``."""
    failures = []
    for name in order:
        try:
            fn = _METHODS[name]
            out = fn(D, tol=tol) if counts is None else fn(D, tol=tol, counts=counts)
            cert = certify(D, *out, tol=tol, counts=counts)
            if not cert.passed and cert.max_violation > 0:
                # Duals carried through many pivots drift by ~1e-11; the c-transform of v
                # (u_i = min_j D_ij - v_j) is feasible by construction, and its gap alone
                # bounds primal - optimum, usually far tighter than gap + violation.
                out = _c_transform(D, out)
                cert = certify(D, *out, tol=tol, counts=counts)
            cert.raise_if_failed()
        except SolverError as err:
            failures.append(f"{name}: {err}")
            continue
        return name, out, cert
    nx, ny = D.shape
    raise SolverError(
        f"no exact solver certified the {nx}x{ny} transport problem: " + " | ".join(failures)
    )


def _screenable(norms) -> bool:
    """Whether float32 bound matrices can hold these costs (squared norms 1e-30..1e30)."""
    peak = max(float(norms[0].max()), float(norms[1].max()))
    return 1e-30 < peak < 1e30


def _bounds_trusted(device: torch.device) -> bool:
    """Whether torch runs float32 products on ``device`` (resolved) in IEEE float32, as the
    cost bounds assume; else warns that pairs go to the dense path (exact, slower)."""
    reduced = reduced_float32_matmul(device)
    if reduced is not None:
        warnings.warn(
            f"torch is set to run float32 matrix products on {device} at {reduced!r} "
            "precision (torch.set_float32_matmul_precision or an fp32_precision flag); the "
            "sparse solver's cost bounds assume IEEE float32, so pairs are solved on their "
            "full float64 cost matrix instead: exact, but slower for wide layers. "
            "torch.set_float32_matmul_precision('highest') restores the sparse path.",
            RuntimeWarning,
            stacklevel=3,
        )
    return reduced is None


def _low_precision(A, sq_norms, device) -> LowPrecision:
    """``A``'s low-precision copy for the cost bounds (kept with a read-only ``A``)."""
    dtype = product_dtype(device)
    return derived(
        A, f"low-precision/{device}/{dtype}", lambda a: low_precision(a, sq_norms, dtype)
    )


def _merged_low_precision(A, sq_norms, keep, device) -> LowPrecision:
    """The low-precision copy of the neurons ``keep`` of ``A``.

    Made of the whole representation and cut down, so a rep merged in one pair and whole
    in another sees the same bounds; both are kept with a read-only ``A``.
    """
    low = _low_precision(A, sq_norms, device)
    if keep.size == A.shape[1]:
        return low
    cut = (lambda a: low.head(keep.size)) if _is_prefix(keep) else (lambda a: low.take(keep))
    return derived(A, f"merged-low-precision/{device}/{low.low.dtype}", cut)


def _merged_columns(A, keep) -> np.ndarray:
    """``A[:, keep]``, read-only, kept with a read-only ``A``: a view where ``keep`` is a
    prefix (:func:`representatives_first`), else a copy (a pass over ``A``)."""
    if keep.size == A.shape[1]:
        return A
    columns = slice(keep.size) if _is_prefix(keep) else keep
    return derived(A, "merged-columns", lambda a: freeze(a[:, columns]))


def _sparse(X, Y, norms, *, tol, device, counts=None, forced=False, low=None):
    """Certified plan from :func:`smd_dist.sparse_simplex.solve_sparse`, dense-path shaped.

    Returns ``(rows, cols, mass, u, v, certificate)``; raises :class:`SolverError` when the
    sparse path cannot settle or certify the pair (the dense path then solves it afresh).
    Unless ``forced``, it also gives up where the dense path would be faster. ``low``:
    the two low-precision copies, when the caller has them.
    """
    if not _screenable(norms):
        raise SolverError("squared norms outside 1e-30..1e30: no float32 cost bounds")
    device = resolve_device(device)
    try:
        if low is None:
            low = (_low_precision(X, norms[0], device), _low_precision(Y, norms[1], device))
        bounds = CostBounds(X, Y, norms, device=device, low=low)
        if not forced and bounds.lower.numel() < SPARSE_TIED_MIN_ENTRIES:
            tied = ambiguity(bounds.lower)
            if tied > SPARSE_TIED_LIMIT:
                raise SolverError(
                    f"{tied:.0%} of rows or columns nearly tied: the dense path is faster"
                )
        fraction = 1.0 if forced else MAX_EXACT_FRACTION
        sol = solve_sparse(bounds, tol=tol, counts=counts, max_exact_fraction=fraction)
    except (SparseUnsuitable, BoundViolation, ReducedPrecision) as err:
        raise SolverError(str(err)) from err
    a, b = _marginals(bounds.shape, counts)
    primal = math.fsum(sol.mass * sol.costs)
    dual = math.fsum(a * sol.u) + math.fsum(b * sol.v)
    cert = Certificate(
        max_violation=max(0.0, -sol.min_reduced),
        gap=primal - dual,
        tolerance=tol,
        primal=primal,
        dual=dual,
    )
    cert.raise_if_failed()
    return sol.rows, sol.cols, sol.mass, sol.u, sol.v, cert


def _c_transform(D, out):
    """The plan with ``u`` replaced by the c-transform of ``v``: dual feasible exactly."""
    rows, cols, mass, u, v = out[:5]
    u_new = np.empty_like(u)
    for s in range(0, D.shape[0], _ROW_CHUNK):
        u_new[s : s + _ROW_CHUNK] = (D[s : s + _ROW_CHUNK] - v[None, :]).min(axis=1)
    return (rows, cols, mass, u_new, v, *([None] if len(out) > 5 else []))


def _check_finite(D, norms=None):
    # With finite squared norms below 1e150 every |x_i - y_j|² is finite: no pass over D.
    if norms is not None and all(np.isfinite(n).all() and n.max() < 1e150 for n in norms):
        return
    if not np.isfinite(D).all():
        # POT returns 0.0 for a NaN cost matrix; nothing downstream may see such a number.
        raise SolverError(f"the {D.shape[0]}x{D.shape[1]} cost matrix has non-finite entries")


def solve(X, Y, *, device=None, method: str = "auto", D=None) -> Transport:
    """Certified optimal transport between the columns of ``X`` and ``Y``.

    With ``method="auto"``, identical columns (dead units, copies) are first merged into one
    neuron carrying the group's mass (same cost, same duals, so the certificate carries
    over and the plan is spread evenly back over the copies). Pairs of at least
    :data:`SPARSE_MIN_ENTRIES` entries then go to the sparse network simplex
    (:mod:`smd_dist.sparse_simplex`); smaller ones, any the sparse path cannot settle, and
    all while torch runs float32 products at reduced precision (TF32 or bfloat16 passes,
    which the sparse path's cost bounds do not cover; a ``RuntimeWarning`` says so), to
    the dense float64 cost matrix: the assignment solver for equal widths without near
    ties, network simplex otherwise.

    Parameters
    ----------
    X, Y : numpy.ndarray, shapes (M, Nx) and (M, Ny), float64
        Prepared activations (stimuli in rows, neurons in columns), already validated.
    device : str or torch.device, optional
        Where the cross product is computed (see :func:`smd_dist.prepare.resolve_device`).
    method : str
        ``"auto"``, or one of ``"sparse-network-simplex"``, ``"assignment"``,
        ``"replicated-assignment"``, ``"network-simplex"`` to force it (no merging).
    D : numpy.ndarray, optional
        Precomputed squared distances (Nx, Ny) for the dense methods; computed when omitted.

    Returns
    -------
    Transport

    Raises
    ------
    SolverError
        When no method reaches and certifies optimality.
    """
    nx, ny = X.shape[1], Y.shape[1]
    known = sorted([*_METHODS, SPARSE_SOLVER])
    if method != "auto" and method not in known:
        raise ValueError(f"unknown method {method!r}; choose from {known} or 'auto'")
    if method == "assignment" and nx != ny:
        raise ValueError(f"method {method!r} needs equal widths, got {nx} and {ny}")
    if method == SPARSE_SOLVER and D is not None:
        raise ValueError(f"method {SPARSE_SOLVER!r} computes its own costs; omit D")
    norms = (
        derived(X, "squared-norms", _squared_norms),
        derived(Y, "squared-norms", _squared_norms),
    )
    tol = _tolerance(*norms)
    if method == SPARSE_SOLVER:
        *out, cert = _sparse(X, Y, norms, tol=tol, device=device, forced=True)
        return _transport(X, Y, out, cert, solver=SPARSE_SOLVER)
    if method != "auto" or D is not None:
        return _dense(X, Y, norms, tol=tol, device=device, D=D, method=method)
    kx, gx, cx = derived(X, "identical-columns", _unique_columns)
    ky, gy, cy = derived(Y, "identical-columns", _unique_columns)
    merged = kx.size < nx or ky.size < ny
    X0, Y0, norms0 = X, Y, norms
    if merged:
        X, Y = _merged_columns(X, kx), _merged_columns(Y, ky)
        norms = (norms[0][kx], norms[1][ky])
    counts = (cx, cy) if merged else None
    compact = None
    screened = kx.size * ky.size >= SPARSE_MIN_ENTRIES and _screenable(norms)
    dev = resolve_device(device) if screened else None  # resolved once: it may warn
    if screened and _bounds_trusted(dev):
        low = (
            _merged_low_precision(X0, norms0[0], kx, dev),
            _merged_low_precision(Y0, norms0[1], ky, dev),
        )
        try:
            *out, cert = _sparse(X, Y, norms, tol=tol, device=dev, counts=counts, low=low)
            compact = _transport(X, Y, out, cert, solver=SPARSE_SOLVER)
        except SolverError:
            compact = None
    if compact is None:
        compact = _dense(X, Y, norms, tol=tol, device=device, counts=counts)
    if not merged:
        return compact
    rows, cols, mass = _expand(compact.rows, compact.cols, compact.mass, gx, gy, cx, cy)
    return Transport(
        cost=compact.cost,
        rows=rows,
        cols=cols,
        mass=mass,
        u=compact.u[gx],
        v=compact.v[gy],
        shape=(nx, ny),
        solver=f"merged-{compact.solver}",
        certificate=compact.certificate,
    )


def _transport(X, Y, out, cert, *, solver) -> Transport:
    rows, cols, mass, u, v = out[:5]
    return Transport(
        cost=plan_cost(X, Y, rows, cols, mass),
        rows=rows,
        cols=cols,
        mass=mass,
        u=u,
        v=v,
        shape=(X.shape[1], Y.shape[1]),
        solver=solver,
        certificate=cert,
    )


def _dense(X, Y, norms, *, tol, device, D=None, method="auto", counts=None) -> Transport:
    """Certified plan on the dense float64 cost matrix (computed unless ``D`` is given)."""
    if D is None:
        D = squared_distances(X, Y, device=device, norms=norms)
        _check_finite(D, norms)
    else:
        _check_finite(D)
    if counts is not None:
        order = ["network-simplex"]
    elif method == "auto":
        order = [choose_method(D)]
        if order[0] != "network-simplex":
            order.append("network-simplex")
    else:
        order = [method]
    name, out, cert = _run(D, order, tol=tol, counts=counts)
    return _transport(X, Y, out, cert, solver=name)
