"""Exact transport on a sparse candidate set, proven optimal over the whole cost matrix.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. The transport
problem with masses :math:`a_i`, :math:`b_j` and costs
:math:`D_{ij} = \\lVert x_i - y_j\\rVert^2` has the optimality conditions

.. math::

    D_{ij} - u_i - v_j \\ge 0 \\;\\; \\forall i, j, \\qquad
    D_{ij} - u_i - v_j = 0 \\;\\; \\text{where } P_{ij} > 0 .

An optimal plan uses at most :math:`N_x + N_y - 1` entries, and the duals are tight on few
more, so the problem is solved by *column generation*: POT's network simplex runs on a
sparse set :math:`S` of candidate entries with exact float64 costs, and the entries outside
:math:`S` are priced with rigorous lower bounds :math:`L_{ij} \\le D_{ij}`
(:class:`smd_dist.kernel.bounds.CostBounds`, one low-precision product). An entry with
:math:`L_{ij} - u_i - v_j \\ge 0` is proven dual feasible without its exact cost; the
others are computed exactly and, when violated, join :math:`S` and the sparse problem is
solved again. When no exact entry is violated the duals
are feasible on the whole matrix: on :math:`S` by exact costs, elsewhere by the bounds,
so the sparse plan is optimal for the dense problem and the certificate
(:class:`smd_dist.kernel.certificate.Certificate`) covers every entry.

:math:`S` always contains the north-west corner plan of the two marginals, a feasible plan
in :math:`N_x + N_y - 1` entries, so every sparse problem has a solution.

Wide pairs (:class:`~smd_dist.kernel.blocked.BlockedBounds`) start from the smallest bounds
of every row and every column, cap each round at :data:`WIDE_ROUND_BUDGET` exact entries per
row, price only the rows and columns whose duals moved since the last pricing of the whole
matrix (:func:`_moved`), and start the network simplex afresh after a round that grew the
candidates by more than :data:`WARM_GROWTH`.

References
----------
.. [1] Ford, L. R., & Fulkerson, D. R. (1958). A suggested computation for maximal
   multi-commodity network flows. Management Science, 5(1), 97–101 (column generation).
.. [2] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

try:  # POT >= 0.9.7: network simplex on a sparse graph (what ot.emd runs for sparse costs)
    from ot.lp.emd_wrap import emd_c_sparse
except ImportError:  # pragma: no cover - older POT: the dense path serves every pair
    emd_c_sparse = None

from smd_dist.kernel.blocked import BlockedBounds
from smd_dist.kernel.bounds import CostBounds
from smd_dist.kernel.certificate import cost_unit
from smd_dist.kernel.dense import NETWORK_SIMPLEX_MAX_ITER as MAX_ITER

__all__ = [
    "SOLVER",
    "Round",
    "SparseSolution",
    "SparseUnsuitable",
    "north_west_corner",
    "solve_sparse",
]

SOLVER = "sparse-network-simplex"
#: Logs one DEBUG record per solve: rounds, exact entries, and per round the entries the
#: bounds flagged, how many were new, and the rows and columns priced (``extra``
#: attribute ``sparse_rounds``: a list of :class:`Round`).
log = logging.getLogger(__name__)
#: Candidates per row (on average, times ``Ny / Nx`` when columns outnumber rows) of the
#: first sparse solve.
CANDIDATES = 16
#: Rounds of "solve on the candidates, price every entry, add the violated ones".
MAX_ROUNDS = 40
#: A round computes every doubtful entry when they number at most this fraction of the
#: matrix, else the :data:`PER_ROUND` most doubtful of each row.
ROUND_BUDGET = 0.04
#: Most doubtful entries per row computed exactly in a round over budget.
PER_ROUND = 32
#: Entries whose bound proves a reduced cost below this fraction of the cost scale are
#: computed too, not only the doubtful ones: the next solve moves the duals by about that
#: much, and an entry it would make violated costs a whole further round (measured on the
#: engine benchmark: 9 % fewer rounds).
CUSHION = 1e-2
#: With :class:`~smd_dist.kernel.blocked.BlockedBounds` (wide pairs) a block of rows computes
#: every doubtful entry when they number at most this many per row (of the wider side) on
#: average, else the :data:`WIDE_PER_ROUND` most doubtful of each of its rows. A fixed share
#: of the matrix (:data:`ROUND_BUDGET`) grows with its area: at 16384² it let round one
#: compute 7.3 million entries. Measured at 8192² with redundant and dead neurons, one core:
#: 64 and 32 took 3.8 s; 32 and 16, 4.0 s (6 rounds); 16 and 8, 5.1 s (9 rounds); 128
#: and 32, 4.2 s (twice the exact entries).
WIDE_ROUND_BUDGET = 64
WIDE_PER_ROUND = 32
#: With blocked bounds a round starts from the previous duals only when it added at most
#: this fraction of entries: POT's warm start guides its first pivots by them, which after
#: a large growth costs more than a cold start (measured, shared latent: at 8192², 0.36 s
#: warm against 0.18 s cold after an 18 % growth; at 16384², 1.73 s warm against 0.77 s
#: cold after 23 %, and 0.14 s warm after 1.5 %, where a cold start takes 0.5 s).
WARM_GROWTH = 0.05
#: The sparse path gives up when the bounds leave more than this fraction of the matrix
#: undecided: the dense float64 product is cheaper then.
MAX_EXACT_FRACTION = 0.25

_OPTIMAL = 1
#: Below this many entries the exact-cost budget does not apply (tiny forced solves).
_SMALL = 4096


class SparseUnsuitable(ArithmeticError):
    """The sparse path cannot settle this pair; the dense path should solve it."""


@dataclass(frozen=True)
class SparseSolution:
    """An optimal plan on the candidate set and duals feasible on the whole matrix.

    Attributes
    ----------
    rows, cols, mass : numpy.ndarray
        The plan's support, sorted by (row, col).
    costs : numpy.ndarray
        Exact float64 costs ``D_ij`` (the expansion) of the plan's entries.
    u, v : numpy.ndarray
        Dual potentials.
    min_reduced : float
        Smallest exact reduced cost ``D_ij - u_i - v_j`` over the candidates; every other
        entry is proven non-negative by its bound.
    n_exact : int
        Entries whose exact cost was computed.
    rounds : int
        Sparse network simplex solves.
    """

    rows: np.ndarray
    cols: np.ndarray
    mass: np.ndarray
    costs: np.ndarray
    u: np.ndarray
    v: np.ndarray
    min_reduced: float
    n_exact: int
    rounds: int


@dataclass(frozen=True)
class Round:
    """One round of :func:`solve_sparse`, as logged.

    Attributes
    ----------
    candidates : int
        Entries with exact costs when the round's sparse problem was solved.
    flagged : int
        Entries the bounds could not prove (including the cushion) in the priced region.
    new : int
        Of those, entries not yet candidates (their exact costs were computed).
    violated : bool
        Whether a new entry violated the duals (another round follows).
    rows, cols : int
        Rows and columns priced.
    """

    candidates: int
    flagged: int
    new: int
    violated: bool
    rows: int
    cols: int


def north_west_corner(counts_x: np.ndarray, counts_y: np.ndarray) -> np.ndarray:
    """Sorted keys ``i*Ny + j`` of the north-west corner plan of two integer marginals.

    Row i carries mass ``counts_x[i] / Σ counts_x`` and column j ``counts_y[j] / Σ counts_y``;
    in units of ``1 / (Σ counts_x · Σ counts_y)`` both are integers, so the plan's support
    (the pairs whose cumulative mass intervals overlap) is found exactly.
    """
    cx = np.asarray(counts_x, dtype=np.int64)
    cy = np.asarray(counts_y, dtype=np.int64)
    edges_x = np.r_[0, np.cumsum(cx)] * cy.sum()
    edges_y = np.r_[0, np.cumsum(cy)] * cx.sum()
    starts = np.union1d(edges_x[:-1], edges_y[:-1])
    i = np.searchsorted(edges_x, starts, side="right") - 1
    j = np.searchsorted(edges_y, starts, side="right") - 1
    return i * np.int64(cy.size) + j


def _network_simplex(a, b, keys, costs, ny, warm=None, *, unit=1.0):
    """Optimal plan and duals on the candidate arcs ``keys`` (sorted ``i*Ny + j``).

    POT solves on ``costs · unit`` (a power of two, :func:`cost_unit`: its thresholds are
    absolute); the duals come back, and ``warm`` goes in, in the units of ``costs``.

    ``warm``: the previous round's duals. POT starts its pivots from them; the optimum is
    the same, reached in fewer pivots (measured: a re-solve after a round that added a few
    entries took 10 ms warm against 20 ms cold at 1024 x 2048; 7 % of the kernel's time
    on the engine benchmark).
    """
    if emd_c_sparse is None:
        raise SparseUnsuitable("this POT has no sparse network simplex (needs POT >= 0.9.7)")
    rows, cols = keys // ny, keys % ny
    warm = tuple(w * unit for w in warm) if warm is not None else ()
    # Called directly: ot.emd would take a sparse matrix apart into these arrays every round.
    flow_r, flow_c, flow, _, u, v, code = emd_c_sparse(
        a, b, rows.astype(np.uint64), cols.astype(np.uint64), costs * unit, MAX_ITER, *warm
    )
    if code != _OPTIMAL:
        raise SparseUnsuitable(f"sparse network simplex ended with code {code}, not optimal")
    keep = flow > 0
    r, c, m = flow_r[keep].astype(np.int64), flow_c[keep].astype(np.int64), flow[keep]
    order = np.lexsort((c, r))
    u, v = np.asarray(u, float) / unit, np.asarray(v, float) / unit
    return r[order], c[order], m[order], u, v


class _Candidates:
    """Sorted candidate keys with their exact costs, grown by :meth:`add`."""

    def __init__(self, bounds: CostBounds, keys: np.ndarray):
        self.bounds = bounds
        self.keys = keys
        self.costs = bounds.exact(keys)

    def add(self, keys: np.ndarray):
        """Join the ``keys`` not yet present; return the new keys and their exact costs."""
        new = _missing(keys, self.keys)
        if new.size == 0:
            return new, np.empty(0)
        costs = self.bounds.exact(new)
        merged = np.concatenate([self.keys, new])
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        self.costs = np.concatenate([self.costs, costs])[order]
        return new, costs


def solve_sparse(
    bounds: CostBounds,
    *,
    tol: float,
    counts: tuple[np.ndarray, np.ndarray] | None = None,
    max_exact_fraction: float = MAX_EXACT_FRACTION,
) -> SparseSolution:
    """Optimal transport on a growing candidate set, with duals proven feasible everywhere.

    Parameters
    ----------
    bounds : CostBounds
        Lower bounds and exact costs for the (Nx, Ny) problem.
    tol : float
        Certificate tolerance; a reduced cost above ``-tol / 8`` counts as satisfied.
    counts : tuple of numpy.ndarray of int, optional
        Integer multiplicities of the rows and columns (merged identical neurons); the
        masses are ``counts / counts.sum()``. Uniform when omitted.
    max_exact_fraction : float
        Give up when more than this fraction of the entries needs an exact cost (1 never
        gives up on that ground).

    Returns
    -------
    SparseSolution

    Raises
    ------
    SparseUnsuitable
        When the candidates would exceed ``max_exact_fraction`` of the matrix, the
        rounds do not settle, or the sparse network simplex does not report optimality.
    smd_dist.kernel.bounds.BoundViolation
        When an exact cost contradicts its bound.
    """
    nx, ny = bounds.shape
    cx, cy = counts if counts is not None else (np.ones(nx, np.int64), np.ones(ny, np.int64))
    a, b = cx / cx.sum(), cy / cy.sum()
    limit = max(max_exact_fraction * nx * ny, _SMALL)
    wide = isinstance(bounds, BlockedBounds)
    if wide:
        budget = max(WIDE_ROUND_BUDGET * max(nx, ny), _SMALL)
        per_row = WIDE_PER_ROUND * max(1, round(ny / nx))
    else:
        budget = max(ROUND_BUDGET * nx * ny, _SMALL)
        per_row = PER_ROUND
    k = CANDIDATES * max(1, round(ny / nx))
    cand = _Candidates(bounds, _union(bounds.candidates(k), north_west_corner(cx, cy)))
    slack = tol / 8
    unit = cost_unit(tol)
    cushion = CUSHION * bounds.scale
    rounds = 0
    warm = None
    reference = None
    history = []
    while True:
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise SparseUnsuitable(f"the candidate set did not settle in {MAX_ROUNDS} rounds")
        rows, cols, mass, u, v = _network_simplex(a, b, cand.keys, cand.costs, ny, warm, unit=unit)
        if wide:
            u, v = _centred(u, v)
        warm = (u, v)
        region = _moved(reference, u, v, cushion) if wide else {}
        # Far from optimal the bounds doubt most entries, and computing all of them would
        # cost more than the dense product: beyond the round's budget the most doubtful few
        # per row steer the next round, and only when none of them is violated is
        # everything doubtful computed (the proof).
        size = cand.keys.size
        flagged, complete = bounds.below(
            u, v, budget=budget, per_row=per_row, cushion=cushion, **region
        )
        violated = _violated(cand.add(flagged), u, v, ny, slack)
        if not (violated or complete):
            flagged, complete = bounds.below(u, v, budget=limit, cushion=cushion, **region)
            if not complete:
                raise SparseUnsuitable(
                    f"the bounds leave more than {limit:.0f} of {nx * ny} entries undecided"
                    + (" at that rate in some rows" if wide else "")
                )
            violated = _violated(cand.add(flagged), u, v, ny, slack)
        history.append(
            Round(
                candidates=size,
                flagged=int(flagged.size),
                new=int(cand.keys.size - size),
                violated=violated,
                rows=nx if region.get("rows") is None else int(region["rows"].size),
                cols=ny if region.get("cols") is None else int(region["cols"].size),
            )
        )
        if complete and region.get("rows") is None and region.get("cols") is None:
            reference = (u, v)
        if wide and cand.keys.size - size > WARM_GROWTH * size:
            warm = None
        if cand.keys.size > limit:
            raise SparseUnsuitable(f"{cand.keys.size} of {nx * ny} entries needed exactly")
        if not violated:
            break
    log.debug(
        "sparse solve %d x %d: %d rounds, %d exact entries",
        nx, ny, rounds, cand.keys.size, extra={"sparse_rounds": history},
    )
    if wide:
        v = _feasible_on(cand.keys, cand.costs, u, v, ny)
    reduced = cand.costs - u[cand.keys // ny] - v[cand.keys % ny]
    at = np.searchsorted(cand.keys, rows * np.int64(ny) + cols)
    return SparseSolution(
        rows=rows,
        cols=cols,
        mass=mass,
        costs=cand.costs[at],
        u=u,
        v=v,
        min_reduced=float(reduced.min()) if reduced.size else math.inf,
        n_exact=int(cand.keys.size),
        rounds=rounds,
    )


def _moved(reference, u, v, cushion: float) -> dict:
    """The sub-matrix to price at duals ``(u, v)``: ``{"rows": ..., "cols": ...}``, sorted
    indices or None for all.

    ``reference`` holds the duals of the last complete pricing of the whole matrix, after
    which every entry outside the candidates had ``L_ij - u'_i - v'_j >= cushion`` (and
    still has: candidates only grow). With :math:`a = u' - u` and :math:`b = v' - v`, such
    an entry now has :math:`L_{ij} - u_i - v_j \\ge \\text{cushion} + a_i + b_j`, proven
    feasible unless :math:`\\text{cushion} + a_i + b_j < 0`, which needs both
    :math:`\\text{cushion} + a_i + \\min b < 0` and :math:`\\text{cushion} + b_j +
    \\min a < 0`: only those rows and columns need pricing. Between rounds the duals move
    a lot along a few columns (or rows) and little elsewhere (measured at 4096², shared
    latent: the proof round's region was 3 % of the columns). Float64 rounding of the sum
    is covered by a few ulps of the duals' magnitude.
    """
    if reference is None:
        return {"rows": None, "cols": None}
    da, db = reference[0] - u, reference[1] - v
    ulps = 8 * np.finfo(float).eps * (
        np.abs(u).max() + np.abs(v).max() + np.abs(reference[0]).max()
        + np.abs(reference[1]).max()
    )
    rows = np.flatnonzero(cushion + da + db.min() < ulps)
    cols = np.flatnonzero(cushion + db + da.min() < ulps)
    return {
        "rows": None if rows.size > 0.9 * u.size else rows.astype(np.int64),
        "cols": None if cols.size > 0.9 * v.size else cols.astype(np.int64),
    }


def _centred(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same duals, ``u - c`` and ``v + c``, with ``c`` the middle of ``u``'s range.

    POT's network simplex returns potentials offset by about its artificial arc cost, the
    node count times the largest cost (1e10 at 16384 x 28672: measured 9.57e9), where a
    float64 sum ``u_i + v_j`` keeps only 2^-19 of absolute precision: that is 40 % of the
    certificate's tolerance there, and it inflates the float32 pricing margin
    (:meth:`~smd_dist.kernel.blocked.BlockedBounds.below`) past the cushion. The shift is
    exact where it matters (Sterbenz: ``u_i`` and ``c`` within a factor of two).
    """
    c = 0.5 * (float(u.max()) + float(u.min()))
    return u - c, v + c


def _feasible_on(keys, costs, u, v, ny) -> np.ndarray:
    """``v`` lowered where needed to make every candidate's reduced cost non-negative:
    ``v_j = min(v_j, min_i (D_ij - u_i))`` over the candidates of column ``j``.

    The network simplex stops at reduced costs above minus its rounding, which at large
    node counts (see :func:`_centred`) is of the order of the certificate's tolerance;
    lowering a dual keeps every bound-proven entry proven, and costs the dual objective
    only the lowered columns' share (a few columns by 2^-19 at 16384 x 28672).
    """
    cols = keys % ny
    slack = costs - u[keys // ny]
    lowest = np.full(v.size, np.inf)
    np.minimum.at(lowest, cols, slack)
    return np.minimum(v, lowest)


def _violated(added, u, v, ny, slack) -> bool:
    """Whether any newly computed entry violates the duals."""
    keys, costs = added
    return bool((costs - u[keys // ny] - v[keys % ny] < -slack).any())


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted key arrays (a sort beats NumPy 2's hash-based unique)."""
    keys = np.concatenate([a, b])
    keys.sort()
    return keys[np.r_[True, keys[1:] != keys[:-1]]]


def _missing(keys: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The sorted ``keys`` that are not in the sorted ``present``."""
    if present.size == 0:
        return keys
    at = np.minimum(np.searchsorted(present, keys), present.size - 1)
    return keys[present[at] != keys]
