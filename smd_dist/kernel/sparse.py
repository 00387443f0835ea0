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

References
----------
.. [1] Ford, L. R., & Fulkerson, D. R. (1958). A suggested computation for maximal
   multi-commodity network flows. Management Science, 5(1), 97–101 (column generation).
.. [2] Bonneel, N., van de Panne, M., Paris, S., & Heidrich, W. (2011). Displacement
   interpolation using Lagrangian mass transport. ACM Transactions on Graphics, 30(6), 158.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

try:  # POT >= 0.9.7: network simplex on a sparse graph (what ot.emd runs for sparse costs)
    from ot.lp.emd_wrap import emd_c_sparse
except ImportError:  # pragma: no cover - older POT: the dense path serves every pair
    emd_c_sparse = None

from smd_dist.kernel.bounds import CostBounds
from smd_dist.kernel.certificate import cost_unit
from smd_dist.kernel.dense import NETWORK_SIMPLEX_MAX_ITER as MAX_ITER

__all__ = ["SOLVER", "SparseSolution", "SparseUnsuitable", "north_west_corner", "solve_sparse"]

SOLVER = "sparse-network-simplex"
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
    budget = max(ROUND_BUDGET * nx * ny, _SMALL)
    k = CANDIDATES * max(1, round(ny / nx))
    cand = _Candidates(bounds, _union(bounds.candidates(k), north_west_corner(cx, cy)))
    slack = tol / 8
    unit = cost_unit(tol)
    cushion = CUSHION * bounds.scale
    rounds = 0
    warm = None
    while True:
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise SparseUnsuitable(f"the candidate set did not settle in {MAX_ROUNDS} rounds")
        rows, cols, mass, u, v = _network_simplex(a, b, cand.keys, cand.costs, ny, warm, unit=unit)
        warm = (u, v)
        # Far from optimal the bounds doubt most entries, and computing all of them would
        # cost more than the dense product: beyond the round's budget the most doubtful few
        # per row steer the next round, and only when none of them is violated is
        # everything doubtful computed (the proof).
        flagged, complete = bounds.below(
            u, v, budget=budget, per_row=PER_ROUND, cushion=cushion
        )
        violated = _violated(cand.add(flagged), u, v, ny, slack)
        if not (violated or complete):
            doubtful, complete = bounds.below(u, v, budget=limit, cushion=cushion)
            if not complete:
                raise SparseUnsuitable(
                    f"the bounds leave more than {limit:.0f} of {nx * ny} entries undecided"
                )
            violated = _violated(cand.add(doubtful), u, v, ny, slack)
        if cand.keys.size > limit:
            raise SparseUnsuitable(f"{cand.keys.size} of {nx * ny} entries needed exactly")
        if not violated:
            break
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
