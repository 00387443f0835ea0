"""Exact solvers on the dense float64 cost matrix, with certifying duals.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column; ``D`` is the
(Nx, Ny) matrix of squared distances :math:`D_{ij} = \\lVert x_i - y_j \\rVert^2`.
:func:`solve_dense` tries the named methods in turn and returns the first whose plan passes
its :class:`~smd_dist.kernel.certificate.Certificate`.

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
    Only on request: each neuron copied L/N times, L = lcm(Nx, Ny), and the L×L assignment
    solved (exact by Birkhoff; compact duals are the copies' mean duals). The copies are
    exact ties, and it was measured about twice as slow as network simplex at 1024×2048.

References
----------
.. [1] Jonker, R., & Volgenant, A. (1987). A shortest augmenting path algorithm for dense and
   sparse linear assignment problems. Computing, 38(4), 325–340.
.. [2] Crouse, D. F. (2016). On implementing 2D rectangular assignment algorithms. IEEE
   Transactions on Aerospace and Electronic Systems, 52(4), 1679–1696.
.. [3] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from ot.lp.emd_wrap import emd_c
from scipy.optimize import linear_sum_assignment

from smd_dist.kernel.certificate import SolverError, block_rows, certify, cost_unit, marginals

__all__ = [
    "AMBIGUITY_GAP",
    "AMBIGUITY_LIMIT",
    "ASSIGNMENT_MIN_ENTRIES",
    "METHODS",
    "NETWORK_SIMPLEX_MAX_ITER",
    "ambiguity",
    "check_finite",
    "choose_method",
    "solve_assignment",
    "solve_dense",
    "tied_fraction",
]

#: Network simplex iteration cap, dense as sparse: high enough never to bind (POT's default
#: binds from about 2,500 neurons and silently returns a plan 0.2–2 % too costly).
NETWORK_SIMPLEX_MAX_ITER = 10**13

#: POT's network simplex result codes (``ot.lp.emd_wrap.check_result``, which warns).
_OPTIMAL = 1
_RESULT = {0: "problem infeasible", 2: "problem unbounded", 3: "iteration cap reached"}

#: ``"replicated-assignment"`` refuses L = lcm(Nx, Ny) above this × max(Nx, Ny).
REPLICATION_FACTOR = 4


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
    a, b = _balanced_uniform(*D.shape) if counts is None else _balanced(*marginals(None, counts))
    c = cost_unit(tol)  # POT's thresholds are absolute: it sees costs of order one
    if potentials is not None:
        potentials = tuple(p * c for p in potentials)
    G, u, v = _emd(a, b, D if c == 1.0 else D * c, potentials)
    flat = G.ravel()
    # Flat indices: NumPy's nonzero of a 2-D array steps an iterator entry by entry, 5x
    # slower than flatnonzero (a fifth of the whole solve at 256², M = 100).
    keys = np.flatnonzero(flat > 0)
    rows, cols = np.divmod(keys, D.shape[1])
    return rows, cols, flat[keys], u / c, v / c


def _balanced(a, b):
    """The masses as :func:`ot.emd` passes them on: the columns' rescaled to the rows' total."""
    return a, b * a.sum() / b.sum()


@functools.lru_cache(maxsize=1024)
def _balanced_uniform(nx: int, ny: int):
    a, b = _balanced(*marginals((nx, ny), None))
    b.flags.writeable = False
    return a, b


def _emd(a, b, D, potentials=None):
    """POT's dense network simplex, called as :func:`ot.emd` calls it, without its wrapper.

    ``b`` is balanced to ``a`` (:func:`_balanced`), so the plan is :func:`ot.emd`'s for
    positive masses, bit for bit; its backend dispatch, input checks and warning capture
    cost 30-60 µs a call, more than the whole solve of a small pair.
    """
    init = () if potentials is None else potentials
    G, _, u, v, code = emd_c(
        a, b, np.ascontiguousarray(D, dtype=np.float64), NETWORK_SIMPLEX_MAX_ITER, 1, *init
    )
    if code != _OPTIMAL:
        why = _RESULT.get(code, "unknown result code")
        raise SolverError(f"network simplex did not reach optimality (code {code}): {why}")
    # Balanced as ot.emd balances them (center_ot_dual): the same plan and dual objective,
    # and a·u = b·v, so the certificate's dual sums no large opposite terms.
    shift = 0.5 * (b @ v - a @ u)  # both masses sum to one
    u += shift
    v -= shift
    return G, u, v


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
    step = block_rows(ny)
    for s in range(0, nx, step):
        R = D[s : s + step] - u[s : s + step, None]
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


METHODS = {
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
    return tied_fraction(D[::8], np.ascontiguousarray(D[:, ::8]))


def tied_fraction(rows: np.ndarray, cols: np.ndarray) -> float:
    """:func:`ambiguity` from sampled rows ``(r, Ny)`` and sampled columns ``(Nx, c)`` of a
    cost matrix (or of an approximation of it)."""
    if min(rows.shape[1], cols.shape[0]) < 2:
        return 0.0
    t = torch.topk(torch.from_numpy(rows), 2, dim=1, largest=False).values.numpy()
    tied_rows = (t[:, 1] - t[:, 0]) <= AMBIGUITY_GAP * (rows.mean(axis=1) - t[:, 0])
    c1, c2 = _two_smallest_per_column(cols)
    tied_cols = (c2 - c1) <= AMBIGUITY_GAP * (cols.mean(axis=0) - c1)
    return float(max(tied_rows.mean(), tied_cols.mean()))


#: Square pairs below this many entries go straight to the network simplex: with its duals
#: the assignment was measured slower there in every regime (M = 2000, one thread: 1.3-3.0x
#: at 8²-256² without ties, 1.0-1.1x at 512², 1.6-3.9x with them), and faster only from
#: 1024² without ties (0.93x shared latent, 0.79x permuted copy).
ASSIGNMENT_MIN_ENTRIES = 1024 * 1024


def choose_method(D: np.ndarray) -> str:
    """The exact method tried first on float64 costs ``D`` (deterministic in ``D``)."""
    nx, ny = D.shape
    if nx == ny and nx * ny >= ASSIGNMENT_MIN_ENTRIES and ambiguity(D) <= AMBIGUITY_LIMIT:
        return "assignment"
    return "network-simplex"


def solve_dense(D, order, *, tol, counts=None):
    """Try each method of ``order`` in turn on costs ``D``; return the first certified
    ``(name, (rows, cols, mass, u, v, ...), certificate)``.

    Raises
    ------
    SolverError
        When no method reaches and certifies optimality (every failure is quoted).
    """
    failures = []
    for name in order:
        try:
            fn = METHODS[name]
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


def _c_transform(D, out):
    """The plan with ``u`` replaced by the c-transform of ``v``: dual feasible exactly."""
    rows, cols, mass, u, v = out[:5]
    u_new = np.empty_like(u)
    step = block_rows(D.shape[1])
    for s in range(0, D.shape[0], step):
        u_new[s : s + step] = (D[s : s + step] - v[None, :]).min(axis=1)
    return (rows, cols, mass, u_new, v, *([None] if len(out) > 5 else []))


def check_finite(D, norms=None):
    """Refuse a cost matrix with NaN or Inf (:class:`SolverError`)."""
    # With finite squared norms below 1e150 every |x_i - y_j|² is finite: no pass over D.
    # (Squared norms are >= 0, and a NaN maximum fails the comparison.)
    if norms is not None and norms[0].max() < 1e150 and norms[1].max() < 1e150:
        return
    if not np.isfinite(D).all():
        # POT returns 0.0 for a NaN cost matrix; nothing downstream may see such a number.
        raise SolverError(f"the {D.shape[0]}x{D.shape[1]} cost matrix has non-finite entries")
