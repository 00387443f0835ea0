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

Methods (``solver`` strings):

``"assignment"``
    Equal widths: the optimum is a permutation matrix divided by N (Birkhoff–von Neumann),
    found with SciPy's Jonker–Volgenant shortest augmenting path solver
    (:func:`scipy.optimize.linear_sum_assignment`).
``"replicated-assignment"``
    Widths whose least common multiple L is at most ``4 max(Nx, Ny)``: each neuron is copied
    L/N times and the L×L assignment problem is solved (exact, again by Birkhoff). The
    compact duals are the copies' mean duals: feasible, because every copy pair has the same
    cost, and with the same objective.
``"network-simplex"``
    Everything else, and the fallback when a fast path cannot certify: POT's network simplex
    with an iteration cap that cannot bind and its status checked.

Dual potentials for an assignment are shortest-path distances in the residual graph
(column j reachable from the column matched to row i at cost ``D_ij - D_i,σ(i)``), computed by
Bellman–Ford on a sparse candidate edge set that grows by pricing every entry until no
reduced cost is negative.

References
----------
.. [1] Jonker, R., & Volgenant, A. (1987). A shortest augmenting path algorithm for dense and
   sparse linear assignment problems. Computing, 38(4), 325–340.
.. [2] Crouse, D. F. (2016). On implementing 2D rectangular assignment algorithms. IEEE
   Transactions on Aerospace and Electronic Systems, 52(4), 1679–1696.
.. [3] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
.. [4] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
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

from smd_dist.prepare import squared_distances

__all__ = [
    "Certificate",
    "SolverError",
    "Transport",
    "certify",
    "plan_cost",
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

#: Network simplex iteration cap: high enough never to bind (POT's default binds from about
#: 2,500 neurons and silently returns a plan 0.2–2 % too costly).
NETWORK_SIMPLEX_MAX_ITER = 10**13

#: Replicate into an L×L assignment only while L = lcm(Nx, Ny) <= this × max(Nx, Ny).
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
    nx = np.einsum("mi,mi->i", X, X).max()
    ny = np.einsum("mj,mj->j", Y, Y).max()
    return float(RELATIVE_TOLERANCE * (nx + ny))


def _min_reduced_cost(D: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    out = math.inf
    for s in range(0, D.shape[0], _ROW_CHUNK):
        R = D[s : s + _ROW_CHUNK] - u[s : s + _ROW_CHUNK, None] - v[None, :]
        low = float(R.min())
        if math.isnan(low):  # NaN costs or duals: nothing is proven
            return -math.inf
        out = min(out, low)
    return out


def certify(D, rows, cols, mass, u, v, *, tol: float) -> Certificate:
    """Certificate of a plan ``(rows, cols, mass)`` with duals ``(u, v)`` on costs ``D``.

    Also checks the plan is feasible (non-negative, marginals uniform to 1e-9 relative);
    an infeasible plan raises :class:`SolverError` since no gap could vouch for it.
    """
    nx, ny = D.shape
    if mass.size == 0 or mass.min() < 0:
        raise SolverError("transport plan has negative or no mass")
    rs = np.bincount(rows, weights=mass, minlength=nx)
    cs = np.bincount(cols, weights=mass, minlength=ny)
    err = max(np.abs(rs * nx - 1).max(), np.abs(cs * ny - 1).max())
    if not err <= 1e-9:
        raise SolverError(f"transport plan marginals off by {err:.3g} (relative)")
    primal = math.fsum(mass * D[rows, cols])
    dual = math.fsum(u) / nx + math.fsum(v) / ny
    violation = max(0.0, -_min_reduced_cost(D, u, v))
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


def _bellman_ford(n, src, dst, w, *, slack):
    """Shortest distances from a virtual source joined to every node by a zero edge.

    Vectorised over edges; a node is updated only when it improves by more than ``slack``,
    so rounding-level cycles cannot stall it (the certificate absorbs ``slack``).
    """
    order = np.lexsort((src, dst))
    src, dst, w = src[order], dst[order], w[order]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
    d = np.zeros(n)
    for _ in range(n + 1):
        nd = np.minimum.reduceat(d[src] + w, starts)
        better = nd < d - slack
        if not better.any():
            return d
        d = np.where(better, nd, d)
    raise SolverError("negative cycle in the residual graph: the assignment is not optimal")


def _assignment_duals(D, sigma, *, tol, k=8, max_rounds=50):
    """Dual potentials (u, v) certifying the permutation ``sigma`` (row i -> column sigma[i]).

    Column potentials are shortest-path distances on a sparse set of candidate edges (the
    matched edges plus the k cheapest per row and per column); every entry is then priced,
    and the most violated ones per row and column join the set until none is violated.
    """
    n = D.shape[0]
    ar = np.arange(n)
    matched = D[ar, sigma]
    keys = np.unique(np.concatenate([ar * np.int64(n) + sigma, _candidates(D, k)]))
    slack = tol / 8
    for _ in range(max_rounds):
        I, J = keys // n, keys % n
        v = _bellman_ford(n, sigma[I], J, D[I, J] - matched[I], slack=slack)
        u = matched - v[sigma]
        new = _violations(D, u, v, thr=tol / 16, k=k)
        if new.size == 0:
            return u, v
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
    u, v = _assignment_duals(D, sigma, tol=tol)
    return sigma, u, v


def _assignment(D, *, tol):
    n = D.shape[0]
    sigma, u, v = solve_assignment(D, tol=tol)
    rows = np.arange(n)
    return rows, sigma, np.full(n, 1.0 / n), u, v


def _replicated(D, *, tol):
    nx, ny = D.shape
    L = math.lcm(nx, ny)
    rx, ry = L // nx, L // ny
    DL = np.repeat(np.repeat(D, rx, axis=0), ry, axis=1)
    sigma, uL, vL = solve_assignment(DL, tol=tol)
    # Averaging the copies' duals keeps feasibility (each compact reduced cost is a mean of
    # the copies' non-negative ones) and the dual objective (same weights 1/L per copy).
    u = uL.reshape(nx, rx).mean(axis=1)
    v = vL.reshape(ny, ry).mean(axis=1)
    keys, counts = np.unique((np.arange(L) // rx) * np.int64(ny) + sigma // ry, return_counts=True)
    return keys // ny, keys % ny, counts / L, u, v


def _network_simplex(D, *, tol, potentials=None):
    nx, ny = D.shape
    a, b = np.full(nx, 1.0 / nx), np.full(ny, 1.0 / ny)
    G, u, v = _emd(a, b, D, potentials)
    rows, cols = np.nonzero(G > 0)
    return rows, cols, G[rows, cols], u, v


def exact_costs(X, Y, rows, cols) -> np.ndarray:
    """``||x_{rows_k} - y_{cols_k}||²`` for each k, in float64 from the differences."""
    step = max(1, (1 << 22) // max(X.shape[0], 1))
    out = np.empty(len(rows))
    for s in range(0, len(rows), step):
        diff = np.take(X, rows[s : s + step], axis=1) - np.take(Y, cols[s : s + step], axis=1)
        diff *= diff
        out[s : s + step] = diff.sum(axis=0)
    return out


def _northwest_corner(nx, ny):
    """Support of the north-west corner plan: a feasible plan for uniform marginals."""
    cut = np.unique(np.concatenate([np.arange(1, nx) * ny, np.arange(1, ny) * nx]))
    # Breakpoints in units of 1/(nx*ny): row i ends at (i+1)*ny, column j at (j+1)*nx.
    starts = np.r_[0, cut]
    return (starts // ny) * np.int64(ny) + starts // nx


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
    """Keys of the k most violated entries (reduced cost below ``-thr``) of every row.

    Rows suffice: every violated entry lies in a violated row.
    """
    nx, ny = D.shape
    kk = min(k, ny)
    new = []
    for s in range(0, nx, _ROW_CHUNK):
        R = D[s : s + _ROW_CHUNK] - u[s : s + _ROW_CHUNK, None]
        R -= v[None, :]
        bad = np.flatnonzero(R.min(axis=1) < -thr)
        if bad.size:
            Rb = R[bad]
            idx = np.argpartition(Rb, kk - 1, axis=1)[:, :kk] if kk < ny else np.tile(
                np.arange(ny), (bad.size, 1)
            )
            keep = np.take_along_axis(Rb, idx, axis=1) < -thr
            new.append(((bad + s)[:, None] * np.int64(ny) + idx)[keep])
    return np.concatenate(new) if new else np.empty(0, np.int64)


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


def _restricted_simplex(D, I, J, warm):
    """Network simplex on the candidate edges only (POT's sparse solver), warm-started."""
    nx, ny = D.shape
    a, b = np.full(nx, 1.0 / nx), np.full(ny, 1.0 / ny)
    G, u, v = _emd(a, b, sp.coo_matrix((D[I, J], (I, J)), shape=D.shape), warm.get("duals"))
    G = sp.coo_array(G)
    keep = G.data > 0
    key = G.row[keep].astype(np.int64) * ny + G.col[keep]
    order = np.argsort(key, kind="stable")
    warm["duals"] = (u, v)
    return G.row[keep][order], G.col[keep][order], G.data[keep][order], u, v


def _column_generation(D, *, tol, restricted, k=8, k_add=8, max_rounds=6, max_fill=0.25):
    """Solve on a sparse candidate set, price every entry, grow the set until none violates.

    Returns the plan and duals of the last restricted solve, which are then certified on the
    full matrix. Raises :class:`_NotConverged` (carrying the last duals) when the set grows
    past ``max_fill`` of all entries or ``max_rounds`` pass.
    """
    nx, ny = D.shape
    keys = np.unique(np.concatenate([_candidates(D, k), _northwest_corner(nx, ny)]))
    warm = {"tol": tol}
    for _ in range(max_rounds):
        out = restricted(D, keys // ny, keys % ny, warm)
        new = _violations(D, out[3], out[4], thr=tol / 16, k=k_add)
        if new.size == 0:
            return out
        keys = np.union1d(keys, new)
        if keys.size > max_fill * nx * ny:
            break
    raise _NotConverged(out[3], out[4])


class _NotConverged(SolverError):
    def __init__(self, u, v):
        super().__init__("candidate pricing did not converge")
        self.duals = (u, v)


def _sparse_simplex(D, *, tol):
    try:
        return _column_generation(D, tol=tol, restricted=_restricted_simplex)
    except _NotConverged as stop:
        return _network_simplex(D, tol=tol, potentials=stop.duals)


_METHODS = {
    "sparse-network-simplex": _sparse_simplex,
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

    A cheap structural probe (a few vectorised passes over ``D``) that detects redundant
    and dead neurons.
    """
    if min(D.shape) < 2:
        return 0.0
    t = torch.topk(torch.from_numpy(D), 2, dim=1, largest=False).values.numpy()
    rows = (t[:, 1] - t[:, 0]) <= AMBIGUITY_GAP * (D.mean(axis=1) - t[:, 0])
    c1, c2 = _two_smallest_per_column(D)
    cols = (c2 - c1) <= AMBIGUITY_GAP * (D.mean(axis=0) - c1)
    return float(max(rows.mean(), cols.mean()))


def choose_method(D: np.ndarray) -> str:
    """The exact method tried first for the cost matrix ``D`` (deterministic in ``D``)."""
    nx, ny = D.shape
    if min(nx, ny) < 2 or ambiguity(D) > AMBIGUITY_LIMIT:
        return "network-simplex"
    if nx == ny:
        return "assignment"
    return "sparse-network-simplex"


def solve(X, Y, *, device=None, method: str = "auto", D=None) -> Transport:
    """Certified optimal transport between the columns of ``X`` and ``Y``.

    Parameters
    ----------
    X, Y : numpy.ndarray, shapes (M, Nx) and (M, Ny), float64
        Prepared activations (stimuli in rows, neurons in columns), already validated.
    device : str or torch.device, optional
        Where the cross product is computed (see :func:`smd_dist.prepare.resolve_device`).
    method : str
        ``"auto"`` (choose by widths, fall back to network simplex), or one of
        ``"assignment"``, ``"replicated-assignment"``, ``"network-simplex"`` to force it.
    D : numpy.ndarray, optional
        Precomputed squared distances (Nx, Ny); computed when omitted.

    Returns
    -------
    Transport

    Raises
    ------
    SolverError
        When no method reaches and certifies optimality.
    """
    nx, ny = X.shape[1], Y.shape[1]
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    tol = float(RELATIVE_TOLERANCE * (norms[0].max() + norms[1].max()))
    if D is None:
        D = squared_distances(X, Y, device=device, norms=norms)
    if not np.isfinite(D).all():
        # POT returns 0.0 for a NaN cost matrix; nothing downstream may see such a number.
        raise SolverError(f"the {nx}x{ny} cost matrix has non-finite entries")
    if method == "auto":
        order = [choose_method(D)]
        if order[0] != "network-simplex":
            order.append("network-simplex")
    elif method in _METHODS:
        if method == "assignment" and nx != ny:
            raise ValueError(f"method 'assignment' needs equal widths, got {nx} and {ny}")
        order = [method]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(_METHODS)} or 'auto'")
    failures = []
    for name in order:
        try:
            rows, cols, mass, u, v = _METHODS[name](D, tol=tol)
            cert = certify(D, rows, cols, mass, u, v, tol=tol)
            if not cert.passed:
                raise SolverError(
                    f"certificate failed: gap {cert.gap:.3g}, max violation "
                    f"{cert.max_violation:.3g}, tolerance {cert.tolerance:.3g}"
                )
        except SolverError as err:
            failures.append(f"{name}: {err}")
            continue
        return Transport(
            cost=plan_cost(X, Y, rows, cols, mass),
            rows=rows,
            cols=cols,
            mass=mass,
            u=u,
            v=v,
            shape=(nx, ny),
            solver=name,
            certificate=cert,
        )
    raise SolverError(
        f"no exact solver certified the {nx}x{ny} transport problem: " + " | ".join(failures)
    )
