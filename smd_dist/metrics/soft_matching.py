"""Soft matching distance and score: exact optimal transport between tuning curves.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column.

.. math::

    d(X, Y) = \\Big(\\min_{P \\in \\mathcal T(N_x, N_y)} \\sum_{ij} P_{ij}
              \\lVert x_i - y_j \\rVert^2 \\Big)^{1/2},
    \\qquad \\mathcal T = \\{P \\ge 0 : P\\mathbf 1 = \\mathbf 1/N_x,\\;
              P^\\top\\mathbf 1 = \\mathbf 1/N_y\\}

References
----------
.. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.sparse as sp

from smd_dist.kernel.certificate import Certificate
from smd_dist.kernel.prepared import PreparedRep, prepare_pair
from smd_dist.kernel.transport import Transport, merging_can_pay, solve

__all__ = [
    "SoftMatchingResult",
    "soft_matching",
    "soft_matching_distance",
    "soft_matching_score",
    "transport",
]


@dataclass(frozen=True)
class SoftMatchingResult:
    """Outcome of one exact soft matching solve.

    Attributes
    ----------
    distance : float
        ``sqrt(cost)``.
    cost : float
        The squared distance ``Σ P_ij ||x_i - y_j||²``, evaluated in float64 over the plan.
    score : float or None
        ``1 - cost / 2``, the soft matching score, when the columns were centred and scaled
        to unit norm (``center=True, normalize="unit"``); ``None`` otherwise.
    plan : scipy.sparse.coo_array or None
        The optimal plan (Nx, Ny) when ``return_plan=True``.
    solver : str
        Which exact method produced the plan (see :mod:`smd_dist.kernel.transport`).
    certificate : Certificate
        Dual feasibility violation, primal–dual gap and tolerance (all passed).
    """

    distance: float
    cost: float
    score: float | None
    plan: sp.coo_array | None
    solver: str
    certificate: Certificate


def transport(x: PreparedRep, y: PreparedRep, *, device=None) -> Transport:
    """Certified optimal transport between prepared reps (no further preprocessing)."""
    return solve(x, y, device=device)


def soft_matching(
    X,
    Y,
    *,
    center: bool = True,
    normalize: str | None = None,
    device=None,
    return_plan: bool = False,
    names: tuple[str, str] = ("X", "Y"),
) -> SoftMatchingResult:
    """Exact soft matching between two representations, with a certificate of optimality.

    .. math::

        d(X, Y)^2 = \\min_{P \\ge 0,\\; P\\mathbf 1 = \\mathbf 1/N_x,\\;
        P^\\top \\mathbf 1 = \\mathbf 1/N_y} \\sum_{ij} P_{ij} \\lVert x_i - y_j \\rVert^2

    Parameters
    ----------
    X, Y : array_like, shapes (M, Nx) and (M, Ny)
        Stimuli in rows, neurons in columns (a neuron's tuning curve is a column).
    center : bool
        Subtract each neuron's mean over stimuli first.
    normalize : {None, "unit", "zscore"}
        Scale each column to unit norm (after centring), or z-score it (ddof=0).
    device : str or torch.device, optional
        Where the cross product runs; default CUDA when available, else CPU.
    return_plan : bool
        Also return the optimal plan as a sparse (Nx, Ny) array.
    names : tuple of str
        Labels used in error messages.

    Returns
    -------
    SoftMatchingResult

    Raises
    ------
    ValueError
        Bad input (NaN/Inf, shape, dtype, constant neurons under normalisation).
    smd_dist.kernel.SolverError
        If optimality could not be certified (never a silently approximate number).

    References
    ----------
    .. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
       representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
    """
    # Prepared for this pair only: heap memory, reused from call to call; copies looked
    # for only where the solve could merge them.
    x, y = prepare_pair(
        X, Y, center=center, normalize=normalize, names=names, kept=False, group=merging_can_pay
    )
    tr = transport(x, y, device=device)
    cost = max(tr.cost, 0.0)
    score = 1.0 - cost / 2.0 if (center and normalize == "unit") else None
    return SoftMatchingResult(
        distance=math.sqrt(cost),
        cost=cost,
        score=score,
        plan=tr.plan() if return_plan else None,
        solver=tr.solver,
        certificate=tr.certificate,
    )


def soft_matching_distance(
    X, Y, *, center: bool = True, normalize: str | None = None, device=None
) -> float:
    """Soft matching distance ``d(X, Y)`` (see :func:`soft_matching`), a float.

    Arrays are (stimuli, neurons); widths may differ.
    """
    return soft_matching(X, Y, center=center, normalize=normalize, device=device).distance


def soft_matching_score(X, Y, *, device=None) -> float:
    """Soft matching score: the best average correlation of matched tuning curves.

    .. math::

        s(X, Y) = \\max_{P \\in \\mathcal T} \\sum_{ij} P_{ij}\\,
        \\operatorname{corr}(x_i, y_j) = 1 - d(\\tilde X, \\tilde Y)^2 / 2

    where :math:`\\tilde X, \\tilde Y` have centred, unit-norm columns; ``s`` is in [-1, 1].
    Arrays are (stimuli, neurons). Constant neurons have no correlation and raise
    ``ValueError``.
    """
    return soft_matching(X, Y, center=True, normalize="unit", device=device).score
