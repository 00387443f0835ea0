"""The certificate of optimality every transport solve must pass.

The problem solved for every pair is the discrete 2-Wasserstein transport with masses
:math:`a_i`, :math:`b_j` (uniform, ``1/Nx`` and ``1/Ny``, unless identical neurons were
merged),

.. math::

    \\min_{P \\ge 0} \\sum_{ij} P_{ij} D_{ij}, \\qquad P\\mathbf 1 = a, \\quad
    P^\\top \\mathbf 1 = b, \\qquad D_{ij} = \\lVert x_i - y_j \\rVert^2,

and its dual :math:`\\max \\sum_i a_i u_i + \\sum_j b_j v_j` subject to
:math:`D_{ij} - u_i - v_j \\ge 0`. A :class:`Certificate` holds the worst violation
``max(0, -min_ij (D_ij - u_i - v_j))`` and the gap ``primal - dual``. For any feasible plan
:math:`Q`, :math:`\\langle Q, D\\rangle \\ge \\text{dual} - \\text{violation}` (the masses
sum to one), so the plan is within ``gap + violation`` of the optimum; a solve is accepted
only when that is at most the tolerance, else :class:`SolverError` is raised.

References
----------
.. [1] Higham, N. J. (2002). Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1
   (inner products in floating point). SIAM.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BLOCK_ENTRIES",
    "RELATIVE_TOLERANCE",
    "Certificate",
    "SolverError",
    "block_rows",
    "certify",
    "cost_unit",
    "marginals",
    "min_reduced_cost",
    "squared_norms",
    "tolerance",
    "tolerance_from_norms",
]

#: Relative tolerance of the certificate, scaled by ``max ||x||² + max ||y||²``. Each float64
#: cost entry is off by at most a few ulps of that scale from the expansion
#: ``|x|² + |y|² - 2 xᵀy`` (rounding grows like sqrt(M)·eps ≈ 1e-14 even at M = 10⁴), so
#: 1e-11 is three orders above rounding yet far below any difference that matters: a plan
#: found in float32 was measured 2e-9 relatively suboptimal, which this rejects.
RELATIVE_TOLERANCE = 1e-11

#: Entries of a cost matrix handled at once in passes over it (256 KiB of float64: the
#: temporary stays in cache).
BLOCK_ENTRIES = 1 << 15


def block_rows(ny: int) -> int:
    """Rows of an (Nx, ``ny``) cost matrix per block of about :data:`BLOCK_ENTRIES`."""
    return max(1, BLOCK_ENTRIES // max(ny, 1))


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


def tolerance(X: np.ndarray, Y: np.ndarray) -> float:
    """Certificate tolerance ``RELATIVE_TOLERANCE · (max ||x_i||² + max ||y_j||²)``."""
    return tolerance_from_norms(squared_norms(X), squared_norms(Y))


def squared_norms(A: np.ndarray) -> np.ndarray:
    """``||a_i||²`` of every column of a (stimuli, neurons) array."""
    return np.einsum("mi,mi->i", A, A)


def tolerance_from_norms(sq_norms_x, sq_norms_y) -> float:
    """:func:`tolerance` from the squared column norms of both sides."""
    return float(RELATIVE_TOLERANCE * (sq_norms_x.max() + sq_norms_y.max()))


def cost_unit(tol: float) -> float:
    """The power of two ``c`` that brings the costs of a problem certified to ``tol`` to
    order one (``c · max D`` in [1/2, 2)).

    POT's network simplex compares reduced costs and flows with absolute thresholds (the
    float64 epsilon and 1e-14 in ``network_simplex_simple.h``), so on costs of order 1e-7
    its duals carry errors of about 1e-15 that exceed a tolerance relative to the data
    (1e-11 of it). It solves on ``c · D`` instead: a power of two changes no mantissa, so
    the plan is the one it finds at scale one and the duals divided by ``c`` are exact
    images of its duals; the certificate is then checked on the original costs.
    """
    scale = tol / RELATIVE_TOLERANCE
    if not (math.isfinite(scale) and scale > 0):
        return 1.0
    return math.ldexp(1.0, -math.frexp(scale)[1])


def min_reduced_cost(D: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """``min_ij (D_ij - u_i - v_j)``, ``-inf`` where NaN makes it unprovable."""
    out = math.inf
    step = block_rows(D.shape[1])
    for s in range(0, D.shape[0], step):
        # One cache-sized temporary, updated in place: a temporary per operation, of 1024
        # full rows, was faulted in afresh each time (1024²: 3.9 ms against 0.9).
        R = D[s : s + step] - u[s : s + step, None]
        R -= v
        low = float(R.min())
        if math.isnan(low):  # NaN costs or duals: nothing is proven
            return -math.inf
        out = min(out, low)
    return out


def marginals(shape, counts):
    """Row and column masses: uniform, or ``counts / counts.sum()`` for merged duplicates.

    Uniform masses are made once per width and shared, read-only.
    """
    if counts is None:
        return _uniform(shape[0]), _uniform(shape[1])
    cx, cy = counts
    return cx / cx.sum(), cy / cy.sum()


@functools.lru_cache(maxsize=1024)
def _uniform(n: int) -> np.ndarray:
    # Two array allocations per mass vector and solve were a tenth of a small pair's cost.
    a = np.full(n, 1.0 / n)
    a.flags.writeable = False
    return a


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
    a, b = marginals(D.shape, counts)
    if mass.size == 0 or mass.min() < 0:
        raise SolverError("transport plan has negative or no mass")
    # Both margins' relative errors in one array: half the NumPy calls of two.
    rel = np.concatenate((np.bincount(rows, mass, nx) / a, np.bincount(cols, mass, ny) / b))
    rel -= 1.0
    err = np.abs(rel, out=rel).max()
    if not err <= 1e-9:
        raise SolverError(f"transport plan marginals off by {err:.3g} (relative)")
    # fsum of a list: a third faster than of an array, whose items it boxes one by one.
    primal = math.fsum((mass * D[rows, cols]).tolist())
    dual = math.fsum((a * u).tolist()) + math.fsum((b * v).tolist())
    if min_reduced is None or math.isnan(min_reduced):
        min_reduced = min_reduced_cost(D, u, v)
    violation = max(0.0, -min_reduced)
    return Certificate(
        max_violation=violation, gap=primal - dual, tolerance=tol, primal=primal, dual=dual
    )
