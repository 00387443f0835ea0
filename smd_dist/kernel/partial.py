"""Exact partial optimal transport between tuning curves, certified on the partial problem.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. Only a fraction
``m`` of the mass moves, so neurons without a counterpart can stay unmatched:

.. math::

    \\min_{T \\ge 0} \\sum_{ij} T_{ij} D_{ij}, \\qquad T\\mathbf 1 \\le a = \\tfrac{1}{N_x}
    \\mathbf 1, \\quad T^\\top \\mathbf 1 \\le b = \\tfrac{1}{N_y}\\mathbf 1, \\quad
    \\mathbf 1^\\top T \\mathbf 1 = m \\in (0, 1], \\qquad D_{ij} = \\lVert x_i - y_j \\rVert^2.

It is solved as a balanced problem with one dummy row and one dummy column [1]_: the dummy
row carries ``1 - m`` and costs nothing to any real column, the dummy column likewise, and
the dummy-to-dummy entry costs :math:`A > \\max(0, -\\min D)`. Each real column then takes
``1 - m - t`` from the dummy row, ``t`` being the dummy-to-dummy mass, so the real block
carries ``m + t``; any plan with ``t > 0`` is strictly improved by moving mass off the
corner (saving ``A + D_ij > 0``), so the optimum has ``t = 0`` and its real block is an
optimal partial plan of the same cost. POT's network simplex solves the balanced problem
with an iteration cap that cannot bind.

The certificate is on the partial problem itself, not on the reformulation. Its dual is

.. math::

    \\max_{u \\le 0,\\; v \\le 0,\\; w} \\; a^\\top u + b^\\top v + m w
    \\quad \\text{s.t.} \\quad D_{ij} - u_i - v_j - w \\ge 0,

and the balanced problem's potentials ``(U, V)`` map onto it as ``u_i = U_i + V_d``,
``v_j = V_j + U_d``, ``w = -(U_d + V_d)`` (``d`` the dummies): the balanced constraints on
the dummy column and row are exactly ``u ≤ 0`` and ``v ≤ 0``, and the objectives agree.
For every feasible ``T``, :math:`\\langle T, D\\rangle \\ge a^\\top u + b^\\top v + m w - m
\\delta` with :math:`\\delta` the worst violation of the reduced costs, so the plan is
within ``gap + violation`` of the optimum.

References
----------
.. [1] Chapel, L., Alaya, M. Z., & Gasso, G. (2020). Partial optimal transport with
   applications on positive-unlabeled learning. NeurIPS 33.
.. [2] Caffarelli, L. A., & McCann, R. J. (2010). Free boundaries in optimal transport and
   Monge–Ampère obstacle problems. Annals of Mathematics, 171(2), 673–730.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from smd_dist.kernel.certificate import (
    Certificate,
    SolverError,
    block_rows,
    min_reduced_cost,
    tolerance_from_norms,
)
from smd_dist.kernel.dense import _emd, check_finite
from smd_dist.kernel.preparation import squared_distances
from smd_dist.kernel.prepared import as_prepared
from smd_dist.kernel.transport import plan_cost

__all__ = ["SOLVER", "PartialTransport", "certify_partial", "check_mass", "solve_partial"]

#: The ``solver`` string of every partial plan.
SOLVER = "partial-network-simplex"

#: Slack on the plan's marginals (relative, as :func:`certify`'s) and on its total mass
#: (absolute, the problem's whole mass being 1).
FEASIBILITY = 1e-9


@dataclass(frozen=True)
class PartialTransport:
    """An optimal, certified partial transport plan between two clouds of tuning curves.

    Attributes
    ----------
    cost : float
        ``Σ T_ij ||x_i - y_j||²`` evaluated in float64 from the columns' differences.
    transported : float
        The mass ``m`` the plan moves.
    rows, cols, mass : numpy.ndarray
        The plan's support, ``T[rows[k], cols[k]] = mass[k]``, sorted by (row, col), in the
        neuron order of the arrays given.
    u, v : numpy.ndarray
        Dual potentials of the row and column capacities, shapes (Nx,) and (Ny,), ``≤ 0``.
    w : float
        Dual potential of the total mass constraint.
    shape : tuple of int
        ``(Nx, Ny)``.
    solver : str
    certificate : Certificate
        Of the partial problem (see the module docstring).
    """

    cost: float
    transported: float
    rows: np.ndarray
    cols: np.ndarray
    mass: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: float
    shape: tuple
    solver: str
    certificate: Certificate

    def plan(self) -> sp.coo_array:
        """The plan as a SciPy sparse (COO) array of shape (Nx, Ny)."""
        return sp.coo_array((self.mass, (self.rows, self.cols)), shape=self.shape)


def check_mass(mass) -> float:
    """``mass`` as a float in (0, 1], else ``ValueError`` naming it."""
    if isinstance(mass, bool) or not isinstance(mass, numbers.Real):
        raise ValueError(f"mass must be a number in (0, 1], got {mass!r}")
    m = float(mass)
    if not 0.0 < m <= 1.0:  # also refuses NaN
        raise ValueError(f"mass must be in (0, 1] (the fraction of mass transported), got {m!r}")
    return m


def solve_partial(X, Y, *, mass: float, device=None) -> PartialTransport:
    """Certified optimal partial transport of mass ``mass`` between the columns of X and Y.

    Parameters
    ----------
    X, Y : PreparedRep or numpy.ndarray, shapes (M, Nx) and (M, Ny)
        Prepared representations, or prepared float64 (stimuli, neurons) arrays, already
        validated (see :func:`smd_dist.kernel.prepared.prepare`).
    mass : float
        The fraction ``m`` of the mass to transport, in (0, 1]; ``1`` is the balanced
        problem :func:`smd_dist.kernel.transport.solve` solves.
    device : str or torch.device, optional
        Where the cross product is computed.

    Returns
    -------
    PartialTransport
        Plan and duals in the neuron order of the arrays given.

    Raises
    ------
    ValueError
        ``mass`` outside (0, 1].
    SolverError
        When the network simplex does not reach optimality or the certificate fails.
    """
    m = check_mass(mass)
    x, y = as_prepared(X, name="X"), as_prepared(Y, name="Y")
    norms = (x.sq_norms, y.sq_norms)
    D = squared_distances(x.columns, y.columns, device=device, norms=norms)
    check_finite(D, norms)
    rows, cols, flow, u, v, w = _solve_extended(D, m)
    tol = tolerance_from_norms(*norms)
    u, v, w, cert = certify_partial(D, rows, cols, flow, u, v, w, m=m, tol=tol)
    cert.raise_if_failed()
    ox = x.neurons if x.neurons is not None else np.arange(D.shape[0])
    oy = y.neurons if y.neurons is not None else np.arange(D.shape[1])
    r, c = ox[rows], oy[cols]
    order = np.lexsort((c, r))
    u_out, v_out = np.empty_like(u), np.empty_like(v)
    u_out[ox], v_out[oy] = u, v
    return PartialTransport(
        cost=plan_cost(x.columns, y.columns, rows, cols, flow),
        transported=m,
        rows=r[order],
        cols=c[order],
        mass=flow[order],
        u=u_out,
        v=v_out,
        w=w,
        shape=D.shape,
        solver=SOLVER,
        certificate=cert,
    )


def _solve_extended(D: np.ndarray, m: float):
    """The balanced problem with a dummy row and column; its real block and mapped duals."""
    nx, ny = D.shape
    E = np.zeros((nx + 1, ny + 1))
    E[:nx, :ny] = D
    # Any corner cost above max(0, -min D) keeps the corner empty at the optimum (module
    # docstring); a margin of the costs' own scale keeps it clear of rounding too.
    E[nx, ny] = 2.0 * max(float(D.max()), 0.0) + 1.0
    a = np.r_[np.full(nx, 1.0 / nx), 1.0 - m]
    b = np.r_[np.full(ny, 1.0 / ny), 1.0 - m]
    G, U, V = _emd(a, b, E)
    rows, cols = np.nonzero(G[:nx, :ny] > 0)
    u = U[:nx] + V[ny]
    v = V[:ny] + U[nx]
    return rows, cols, G[rows, cols], u, v, -float(U[nx] + V[ny])


def certify_partial(D, rows, cols, flow, u, v, w, *, m: float, tol: float):
    """Certificate of a partial plan ``(rows, cols, flow)`` with duals ``(u, v, w)``.

    The duals are first made sign-feasible (``u, v ≤ 0``): by shifting into ``w``, which
    costs ``(1 - m) max(u)`` of dual objective, or by clipping, which costs
    ``Σ a_i max(u_i, 0)`` and only raises reduced costs; whichever loses less. When the
    reduced costs are then violated beyond the tolerance, ``u`` is replaced by its
    sign-constrained c-transform ``min(0, min_j (D_ij - v_j - w))``, feasible by
    construction.

    Returns
    -------
    u, v, w
        The duals the certificate was computed with.
    Certificate
        Not yet checked: call :meth:`Certificate.raise_if_failed`.

    Raises
    ------
    SolverError
        An infeasible plan: negative mass, a row or column over its capacity (beyond a
        relative 1e-9), or a total other than ``m`` (beyond 1e-9).
    """
    nx, ny = D.shape
    a, b = np.full(nx, 1.0 / nx), np.full(ny, 1.0 / ny)
    if flow.size == 0 or flow.min() < 0:
        raise SolverError("partial transport plan has negative or no mass")
    over = max(
        (np.bincount(rows, weights=flow, minlength=nx) / a - 1).max(),
        (np.bincount(cols, weights=flow, minlength=ny) / b - 1).max(),
    )
    total = math.fsum(flow)
    if not (over <= FEASIBILITY and abs(total - m) <= FEASIBILITY):
        raise SolverError(
            f"partial transport plan infeasible: moves {total!r} instead of {m!r}, "
            f"capacities exceeded by {over:.3g} (relative)"
        )
    u, w = _sign_feasible(u, w, a, m)
    v, w = _sign_feasible(v, w, b, m)
    cert = _certificate(D, rows, cols, flow, u, v, w, a, b, m, tol)
    if not cert.passed and cert.max_violation > 0:
        u = np.empty(nx)
        step = block_rows(D.shape[1])
        for s in range(0, nx, step):
            R = D[s : s + step] - v[None, :]
            u[s : s + step] = np.minimum(R.min(axis=1) - w, 0.0)
        cert = _certificate(D, rows, cols, flow, u, v, w, a, b, m, tol)
    return u, v, w, cert


def _sign_feasible(p, w, weights, m):
    """Potentials ``p ≤ 0`` (and the new ``w``), by the cheaper of shifting and clipping."""
    top = float(p.max())
    if top <= 0:
        return p, w
    clip_loss = math.fsum(weights * np.maximum(p, 0.0))
    if (1.0 - m) * top <= clip_loss:
        return p - top, w + top
    return np.minimum(p, 0.0), w


def _certificate(D, rows, cols, flow, u, v, w, a, b, m, tol) -> Certificate:
    primal = math.fsum(flow * D[rows, cols])
    dual = math.fsum(a * u) + math.fsum(b * v) + m * w
    low = min_reduced_cost(D, u + w, v)
    # The bound on any feasible plan loses m·δ, at most δ: Certificate's bound holds as is.
    return Certificate(
        max_violation=max(0.0, -low), gap=primal - dual, tolerance=tol, primal=primal, dual=dual
    )
