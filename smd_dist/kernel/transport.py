"""Exact optimal transport between two clouds of tuning curves, certified: the kernel's entry.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. :func:`solve` takes
two prepared representations (:class:`~smd_dist.kernel.prepared.PreparedRep`, or plain
prepared arrays) and returns a :class:`Transport`: an optimal plan for

.. math::

    \\min_{P \\ge 0} \\sum_{ij} P_{ij} \\lVert x_i - y_j \\rVert^2, \\qquad
    P\\mathbf 1 = \\tfrac{1}{N_x}\\mathbf 1, \\quad P^\\top \\mathbf 1 = \\tfrac{1}{N_y}\\mathbf 1,

its dual potentials and the :class:`~smd_dist.kernel.certificate.Certificate` that proves
it optimal. Methods (``solver`` strings), chosen per pair from the data:

``"merged-…"``
    Identical columns (dead units, exact copies) are interchangeable: each group becomes one
    neuron carrying the group's mass, the smaller problem is solved by one of the methods
    below, and the plan is spread evenly back over the copies (same cost and duals, so the
    certificate holds for the original problem).
``"sparse-network-simplex"``
    Pairs from :data:`SPARSE_MIN_ENTRIES` entries, any widths. The full cost matrix is never
    formed in float64: :class:`smd_dist.kernel.bounds.CostBounds` gives a rigorous lower
    bound on every entry from one low-precision product, POT's network simplex solves the
    problem on a sparse candidate set with exact costs, and every entry the bounds cannot
    prove dual feasible is computed exactly and joins the candidates until none is violated
    (:mod:`smd_dist.kernel.sparse`). The certificate is then a proof over the whole matrix:
    exact on the candidates, by the bound elsewhere. Any failure falls back to the dense
    methods, which work on the float64 cost matrix. From
    :data:`~smd_dist.kernel.blocked.BLOCKED_MIN_ENTRIES` entries the bounds are built one
    block of the product at a time and kept in 16 bits
    (:class:`~smd_dist.kernel.blocked.BlockedBounds`): no N x N float matrix is formed.
``"assignment"``, ``"network-simplex"``, ``"replicated-assignment"``
    The dense methods (:mod:`smd_dist.kernel.dense`).

References
----------
.. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
.. [2] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from smd_dist.kernel.blocked import BLOCKED_MIN_ENTRIES, BlockedBounds
from smd_dist.kernel.bounds import (
    BoundViolation,
    CostBounds,
    ReducedPrecision,
    product_dtype,
    reduced_float32_matmul,
)
from smd_dist.kernel.certificate import (
    Certificate,
    SolverError,
    marginals,
    tolerance_from_norms,
)
from smd_dist.kernel.dense import (
    METHODS,
    check_finite,
    choose_method,
    solve_dense,
    tied_fraction,
)
from smd_dist.kernel.preparation import resolve_device, squared_distances
from smd_dist.kernel.prepared import PreparedRep, as_prepared
from smd_dist.kernel.sparse import MAX_EXACT_FRACTION, SparseUnsuitable, solve_sparse
from smd_dist.kernel.sparse import SOLVER as SPARSE_SOLVER

__all__ = [
    "MERGE_MIN_WORK",
    "SPARSE_MIN_ENTRIES",
    "Transport",
    "exact_costs",
    "memory_bytes",
    "merging_can_pay",
    "plan_cost",
    "solve",
]

#: Pairs with at least this many entries (``Nx·Ny``, after merging identical neurons) go
#: to the sparse path first; below it the dense float64 path. Measured against the naive
#: pair (one thread, CPU time, M = 100/500/2000, 2026-12-04): below 512² the sparse path's
#: fixed cost loses on easy pairs (a permuted copy: 0.37-0.73x the naive pair at 256²,
#: 0.51-0.94x at 384², where the dense path gives 0.86-0.90x) more than it gains on hard
#: ones; from 512² it wins or ties in every regime (1.2-4x on a shared latent).
SPARSE_MIN_ENTRIES = 512 * 512
#: A pair for the dense path is merged only when ``(entries saved) · (M + 400)`` reaches
#: this: the product saves about M, and the network simplex about 400, per entry merged
#: away, against a fixed 40-60 µs to spread the plan back over the copies (and, for a
#: pair prepared for one solve, to group the copies). Measured on dead units (10-50 %),
#: one thread, 2026-12-04: merging 32² at M = 100 was 1.3-1.5x slower than solving with
#: the exact ties (which the simplex handles as well), broke even from about 2,500
#: entries saved at M = 100 and 500 at M = 2000, and gained 15 % or more from twice that.
MERGE_MIN_WORK = 2_400_000
#: Below this many entries, pairs with more than :data:`SPARSE_TIED_LIMIT` nearly tied rows
#: or columns (near-duplicate neurons) go dense: the sparse path needs more rounds there
#: (measured at 512²: 67 ms dense against 84 ms sparse; even at 1024²). The test samples
#: the low-precision product before any bound is built.
SPARSE_TIED_MIN_ENTRIES = 1024 * 1024
SPARSE_TIED_LIMIT = 0.5


#: Bytes per cost entry on the dense path: float64 costs, plan and reduced costs and the
#: float32 product.
DENSE_BYTES_PER_ENTRY = 28
#: The blocked path (from :data:`~smd_dist.kernel.blocked.BLOCKED_MIN_ENTRIES` entries):
#: 16-bit codes per entry, scratch per neuron for the row blocks of the product and the
#: bound chunks, and a fixed part. Fitted with margin to the peak resident memory that
#: preparing and solving a pair added over the caller's inputs (one thread, 2026-12-04):
#: 49 MiB at 2048² (M = 100), 105 MiB (M = 2000), 115 MiB at 4096², 139 MiB at 6000²
#: (M = 100), 0.96 GiB at 16384² and 2.9 GiB at 32768² (M = 2000), which :func:`memory_bytes`
#: puts at 93, 182, 169, 255 MiB, 1.6 and 4.2 GiB.
BLOCKED_BYTES_PER_ENTRY = 2
BLOCKED_BYTES_PER_NEURON = 24 * 512
BLOCKED_FIXED_BYTES = 32 * 2**20


def memory_bytes(n_stimuli, nx, ny):
    """Peak bytes one pair needs on the path :func:`solve` takes first (elementwise).

    .. math::

        12\\,M\\,(N_x + N_y) + \\begin{cases}
            28\\,N_x N_y & N_x N_y < B \\\\
            2\\,N_x N_y + 12288\\,(N_x + N_y) + 32\\,\\mathrm{MiB} & \\text{otherwise}
        \\end{cases}

    the prepared float64 inputs and their float32 copies, plus the dense path below
    ``B =`` :data:`~smd_dist.kernel.blocked.BLOCKED_MIN_ENTRIES` entries (where a failed
    sparse attempt falls back to the dense matrix, so the dense path is what to plan for)
    and blocked bounds from there (no N x N float matrix). A wide pair whose sparse path
    fails falls back to the dense path, which needs :data:`DENSE_BYTES_PER_ENTRY` per
    entry; that fallback is not planned for.
    """
    nx, ny = np.asarray(nx, dtype=np.int64), np.asarray(ny, dtype=np.int64)
    entries = nx * ny
    blocked = (
        BLOCKED_BYTES_PER_ENTRY * entries
        + BLOCKED_BYTES_PER_NEURON * (nx + ny)
        + BLOCKED_FIXED_BYTES
    )
    per_pair = np.where(entries >= BLOCKED_MIN_ENTRIES, blocked, DENSE_BYTES_PER_ENTRY * entries)
    need = 12 * int(n_stimuli) * (nx + ny) + per_pair
    return int(need) if need.ndim == 0 else need


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


def plan_cost(X, Y, rows, cols, mass) -> float:
    """``Σ_k mass_k ||x_{rows_k} - y_{cols_k}||²`` in float64 without cancellation.

    Summed with :func:`math.fsum` (correctly rounded), so the value depends only on the plan,
    not on summation order or thread count.
    """
    terms = exact_costs(X, Y, rows, cols)
    return math.fsum((mass * terms).tolist())  # a list: a third faster than an array


def exact_costs(X, Y, rows, cols) -> np.ndarray:
    """``||x_{rows_k} - y_{cols_k}||²`` for each k, in float64 from the differences."""
    step = max(1, (1 << 15) // max(X.shape[0], 1))  # blocks that stay in cache
    XT, YT = X.T, Y.T  # rows are tuning curves: contiguous for neuron-major arrays
    out = np.empty(len(rows))
    # One entry per row in row order (a permutation plan, what square pairs get): the
    # rows are read in place, not gathered (a third less work).
    in_order = len(rows) == XT.shape[0] and np.array_equal(rows, np.arange(len(rows)))
    for s in range(0, len(rows), step):
        # The gathered copy is the difference's buffer: one temporary fewer (20 % faster
        # at 2048 neurons, M = 2000), and (y - x)² is (x - y)² bit for bit.
        diff = YT[cols[s : s + step]]
        diff -= XT[s : s + step] if in_order else XT[rows[s : s + step]]
        diff *= diff
        out[s : s + step] = diff.sum(axis=1)
    return out


def solve(X, Y, *, device=None, method: str = "auto", D=None) -> Transport:
    """Certified optimal transport between the columns of ``X`` and ``Y``.

    With ``method="auto"``, identical columns (dead units, copies) are first merged into one
    neuron carrying the group's mass (same cost, same duals, so the certificate carries
    over and the plan is spread evenly back over the copies). Pairs of at least
    :data:`SPARSE_MIN_ENTRIES` entries then go to the sparse network simplex
    (:mod:`smd_dist.kernel.sparse`); smaller ones, any the sparse path cannot settle, and
    all while torch runs float32 products at reduced precision (TF32 or bfloat16 passes,
    which the sparse path's cost bounds do not cover; a ``RuntimeWarning`` says so), to
    the dense float64 cost matrix: the assignment solver for equal widths without near
    ties, network simplex otherwise.

    Parameters
    ----------
    X, Y : PreparedRep or numpy.ndarray, shapes (M, Nx) and (M, Ny)
        Prepared representations (:func:`smd_dist.kernel.prepared.prepare`), or prepared
        float64 (stimuli, neurons) arrays, already validated.
    device : str or torch.device, optional
        Where the cross product is computed (see
        :func:`smd_dist.kernel.preparation.resolve_device`).
    method : str
        ``"auto"``, or one of ``"sparse-network-simplex"``, ``"assignment"``,
        ``"replicated-assignment"``, ``"network-simplex"`` to force it (no merging).
    D : numpy.ndarray, optional
        Precomputed squared distances (Nx, Ny), in the neuron order of the arrays given,
        for the dense methods; computed when omitted.

    Returns
    -------
    Transport
        Plan and duals in the neuron order of the arrays given.

    Raises
    ------
    SolverError
        When no method reaches and certifies optimality.
    """
    x, y = as_prepared(X, name="X"), as_prepared(Y, name="Y")
    nx, ny = x.shape[1], y.shape[1]
    if method != "auto" and method not in METHODS and method != SPARSE_SOLVER:
        known = sorted([*METHODS, SPARSE_SOLVER])
        raise ValueError(f"unknown method {method!r}; choose from {known} or 'auto'")
    if method == "assignment" and nx != ny:
        raise ValueError(f"method {method!r} needs equal widths, got {nx} and {ny}")
    if method == SPARSE_SOLVER and D is not None:
        raise ValueError(f"method {SPARSE_SOLVER!r} computes its own costs; omit D")
    norms = (x.sq_norms, y.sq_norms)
    tol = tolerance_from_norms(*norms)
    dev = resolve_device(device)  # once per pair: it may warn
    if method == SPARSE_SOLVER:
        if not _screenable(norms):
            raise SolverError("squared norms outside 1e-30..1e30: no float32 cost bounds")
        low = (_low(x, dev, whole=True), _low(y, dev, whole=True))
        *out, cert = _sparse(x.columns, y.columns, norms, low, tol=tol, device=dev, forced=True)
        tr = _transport(x.columns, y.columns, out, cert, solver=SPARSE_SOLVER)
        return _original_order(tr, x, y)
    if method != "auto" or D is not None:
        if D is not None and (x.neurons is not None or y.neurons is not None):
            D = D[np.ix_(_order(x), _order(y))]
        tr = _dense(x.columns, y.columns, norms, tol=tol, device=dev, D=D, method=method)
        return _original_order(tr, x, y)
    distinct = x.n_distinct * y.n_distinct
    screened = distinct >= SPARSE_MIN_ENTRIES and _screenable(norms)
    saved = x.shape[1] * y.shape[1] - distinct
    merged = saved > 0 and (screened or saved * (x.shape[0] + 400) >= MERGE_MIN_WORK)
    if merged:
        X, Y = x.distinct(), y.distinct()
        norms = (norms[0][: x.n_distinct], norms[1][: y.n_distinct])
    else:
        # Solved in the caller's neuron order, as if copies had never been looked for: the
        # same costs in the same order, so the same plan bit for bit as from a rep
        # prepared with group=False (ties let a reordered matrix pick another optimum).
        (X, nx2), (Y, ny2) = _callers_order(x), _callers_order(y)
        norms = (nx2, ny2)
    counts = (x.counts, y.counts) if merged else None
    compact = None
    if screened and _bounds_trusted(dev):
        low = (_low(x, dev), _low(y, dev))
        try:
            *out, cert = _sparse(X, Y, norms, low, tol=tol, device=dev, counts=counts)
            compact = _transport(X, Y, out, cert, solver=SPARSE_SOLVER)
        except SolverError:
            compact = None
    if compact is None:
        compact = _dense(X, Y, norms, tol=tol, device=dev, counts=counts)
    if not merged:
        return compact
    rows, cols, mass = _expand(
        compact.rows, compact.cols, compact.mass, x.group, y.group, x.counts, y.counts
    )
    whole = Transport(
        cost=compact.cost,
        rows=rows,
        cols=cols,
        mass=mass,
        u=compact.u[x.group],
        v=compact.v[y.group],
        shape=(nx, ny),
        solver=f"merged-{compact.solver}",
        certificate=compact.certificate,
    )
    return _original_order(whole, x, y)


def merging_can_pay(sq_norms_x, sq_norms_y, stimuli: int) -> bool:
    """Whether :func:`solve` could merge identical neurons of a pair with these squared
    column norms.

    It merges only pairs for the sparse path or where merging saves enough work
    (:data:`MERGE_MIN_WORK`). Copies share their squared norm, so the distinct norms
    bound the distinct neurons from below; where even that bound rules merging out,
    looking for copies is wasted (:func:`smd_dist.kernel.prepared.prepare_pair`).
    """
    nx, ny = _distinct(sq_norms_x), _distinct(sq_norms_y)
    if nx * ny >= SPARSE_MIN_ENTRIES:
        return True
    return (sq_norms_x.size * sq_norms_y.size - nx * ny) * (stimuli + 400) >= MERGE_MIN_WORK


def _distinct(values: np.ndarray) -> int:
    ranked = np.sort(values)
    return 1 + int(np.count_nonzero(ranked[1:] != ranked[:-1]))


def _low(rep: PreparedRep, device: torch.device, *, whole: bool = False):
    """The rep's low-precision copy in this device's product precision (its distinct
    columns unless ``whole``)."""
    dtype = product_dtype(device)
    return rep.low_precision(device, dtype) if whole else rep.distinct_low_precision(device, dtype)


def _callers_order(rep: PreparedRep):
    """``(columns, sq_norms)`` of ``rep`` in the order of the array it was made from."""
    if rep.neurons is None:
        return rep.columns, rep.sq_norms
    back = np.argsort(rep.neurons)
    return rep.columns.T[back].T, rep.sq_norms[back]  # whole tuning curves, neuron-major


def _order(rep: PreparedRep) -> np.ndarray:
    return rep.neurons if rep.neurons is not None else np.arange(rep.shape[1])


def _original_order(tr: Transport, x: PreparedRep, y: PreparedRep) -> Transport:
    """``tr`` with rows, columns and duals in the neuron order the reps were made from."""
    if x.neurons is None and y.neurons is None:
        return tr
    rows, cols = _order(x)[tr.rows], _order(y)[tr.cols]
    order = np.lexsort((cols, rows))
    u, v = np.empty_like(tr.u), np.empty_like(tr.v)
    u[_order(x)], v[_order(y)] = tr.u, tr.v
    return dataclasses.replace(
        tr, rows=rows[order], cols=cols[order], mass=tr.mass[order], u=u, v=v
    )


def _expand(rows, cols, mass, gx, gy, cx, cy):
    """Spread each merged plan entry evenly over all pairs of the merged neurons' copies."""
    mx = np.argsort(gx, kind="stable")
    my = np.argsort(gy, kind="stable")
    sx = np.concatenate(([0], np.cumsum(cx)))  # np.r_ costs 10 µs a call
    sy = np.concatenate(([0], np.cumsum(cy)))
    n = cx[rows] * cy[cols]
    k = np.repeat(np.arange(rows.size), n)
    off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    r = mx[sx[rows][k] + off // cy[cols][k]]
    c = my[sy[cols][k] + off % cy[cols][k]]
    order = np.lexsort((c, r))
    return r[order], c[order], np.repeat(mass / n, n)[order]


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


def _sparse(X, Y, norms, low, *, tol, device, counts=None, forced=False):
    """Certified plan from :func:`smd_dist.kernel.sparse.solve_sparse`, dense-path shaped.

    ``low`` holds the low-precision copies of ``X`` and ``Y`` (from their prepared reps);
    ``device`` is resolved. Returns ``(rows, cols, mass, u, v, certificate)``; raises
    :class:`SolverError` when the sparse path cannot settle or certify the pair (the dense
    path then solves it afresh). Unless ``forced``, it also gives up where the dense path
    would be faster.
    """
    if not forced and X.shape[1] * Y.shape[1] < SPARSE_TIED_MIN_ENTRIES:
        tied = _sampled_ambiguity(low, norms, device)
        if tied > SPARSE_TIED_LIMIT:
            raise SolverError(
                f"{tied:.0%} of rows or columns nearly tied: the dense path is faster"
            )
    try:
        wide = X.shape[1] * Y.shape[1] >= BLOCKED_MIN_ENTRIES
        bounds = (BlockedBounds if wide else CostBounds)(X, Y, norms, device=device, low=low)
        fraction = 1.0 if forced else MAX_EXACT_FRACTION
        sol = solve_sparse(bounds, tol=tol, counts=counts, max_exact_fraction=fraction)
    except (SparseUnsuitable, BoundViolation, ReducedPrecision) as err:
        raise SolverError(str(err)) from err
    a, b = marginals(bounds.shape, counts)
    primal = math.fsum((sol.mass * sol.costs).tolist())
    dual = math.fsum((a * sol.u).tolist()) + math.fsum((b * sol.v).tolist())
    cert = Certificate(
        max_violation=max(0.0, -sol.min_reduced),
        gap=primal - dual,
        tolerance=tol,
        primal=primal,
        dual=dual,
    )
    cert.raise_if_failed()
    return sol.rows, sol.cols, sol.mass, sol.u, sol.v, cert


def _sampled_ambiguity(low, norms, device) -> float:
    """:func:`smd_dist.kernel.dense.ambiguity` of the costs the low-precision copies give,
    on every 8th row and every 8th column only.

    Decided before the bound matrix is built: a pair that goes dense for its near ties
    no longer pays for the bounds first (measured 10-20 % of such a pair at 512²-1024²).
    The products carry the low precision's rounding, as the bounds did that this test
    was first made on; it only chooses the path, never a value.
    """
    (sx, Xl, _, _), (sy, Yl, _, _) = low
    back = 2.0 / (sx * sy)  # twice the product, in the original units
    nx, ny = norms
    Xl, Yl = Xl.to(device), Yl.to(device)
    rows = (Xl[::8] @ Yl.T).double().cpu().numpy()
    cols = (Xl @ Yl[::8].T).double().cpu().numpy()
    rows = nx[::8, None] + ny[None, :] - back * rows
    cols = nx[:, None] + ny[None, ::8] - back * cols
    return tied_fraction(rows, cols)


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
        check_finite(D, norms)
    else:
        check_finite(D)
    if counts is not None:
        order = ["network-simplex"]
    elif method == "auto":
        order = [choose_method(D)]
        if order[0] != "network-simplex":
            order.append("network-simplex")
    else:
        order = [method]
    name, out, cert = solve_dense(D, order, tol=tol, counts=counts)
    return _transport(X, Y, out, cert, solver=name)
