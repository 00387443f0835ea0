"""Partial soft matching: only a fraction of the neurons' mass has to find a counterpart.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. With columns
centred and scaled to unit norm, so that :math:`C_{ij} = 1 - \\operatorname{corr}(x_i, y_j)
= \\lVert \\tilde x_i - \\tilde y_j \\rVert^2 / 2`,

.. math::

    s_m(X, Y) = 1 - \\min_{T \\in \\mathcal T_m} \\sum_{ij} T_{ij} C_{ij}, \\qquad
    \\mathcal T_m = \\{T \\ge 0 : T\\mathbf 1 \\le \\mathbf 1/N_x,\\;
    T^\\top\\mathbf 1 \\le \\mathbf 1/N_y,\\; \\mathbf 1^\\top T \\mathbf 1 = m\\}.

Neurons whose best counterparts are poor keep their mass: the ``1 - m`` left untransported
counts as cost 0, so ``s_m = (1 - m) + Σ T_ij corr(x_i, y_j)``, and ``s_1`` is the soft
matching score. The mean correlation of the transported mass, ``1 - Σ T C / m``, is on
the full result.

References
----------
.. [1] Kapoor, C., Williams, A. H., & Khosla, M. (2026). Partial soft-matching distance for
   neural representational comparison with partial unit correspondence. ICLR.
.. [2] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.sparse as sp

from smd_dist.kernel.certificate import Certificate
from smd_dist.kernel.partial import PartialTransport, check_mass, solve_partial
from smd_dist.kernel.prepared import PreparedRep, prepare_pair

__all__ = [
    "DEFAULT_MASS",
    "PartialSoftMatchingResult",
    "partial_soft_matching",
    "partial_soft_matching_score",
    "partial_transport",
]

#: The fraction of mass transported unless asked otherwise (the registered metric's).
DEFAULT_MASS = 0.9


@dataclass(frozen=True)
class PartialSoftMatchingResult:
    """Outcome of one exact partial soft matching solve.

    Attributes
    ----------
    score : float
        ``1 - Σ T_ij C_ij`` with ``C_ij = 1 - corr(x_i, y_j)``.
    matched_correlation : float
        ``Σ T_ij corr(x_i, y_j) / m``: the mean correlation of the transported mass.
    cost : float
        ``Σ T_ij ||x̃_i - ỹ_j||²`` on the centred unit-norm columns (``= 2 Σ T C``).
    mass : float
        ``m``, the fraction of mass transported.
    plan : scipy.sparse.coo_array or None
        The optimal plan (Nx, Ny) when ``return_plan=True``; its rows sum to at most
        ``1/Nx``, its columns to at most ``1/Ny``, all of it to ``m``.
    solver : str
    certificate : Certificate
        Of the partial problem (:mod:`smd_dist.kernel.partial`).
    """

    score: float
    matched_correlation: float
    cost: float
    mass: float
    plan: sp.coo_array | None
    solver: str
    certificate: Certificate


def partial_transport(
    x: PreparedRep, y: PreparedRep, *, mass: float = DEFAULT_MASS, device=None
) -> PartialTransport:
    """Certified optimal partial transport between prepared reps (centred, unit norm)."""
    return solve_partial(x, y, mass=mass, device=device)


def partial_soft_matching(
    X,
    Y,
    *,
    mass: float = DEFAULT_MASS,
    device=None,
    return_plan: bool = False,
    names: tuple[str, str] = ("X", "Y"),
) -> PartialSoftMatchingResult:
    """Exact partial soft matching: the best transport of a fraction ``mass`` of the neurons.

    .. math::

        s_m(X, Y) = 1 - \\min_{T \\ge 0,\\; T\\mathbf 1 \\le \\mathbf 1/N_x,\\;
        T^\\top\\mathbf 1 \\le \\mathbf 1/N_y,\\; \\mathbf 1^\\top T\\mathbf 1 = m}
        \\sum_{ij} T_{ij} \\big(1 - \\operatorname{corr}(x_i, y_j)\\big)

    Parameters
    ----------
    X, Y : array_like, shapes (M, Nx) and (M, Ny)
        Stimuli in rows, neurons in columns (a neuron's tuning curve is a column).
    mass : float
        ``m`` in (0, 1]: the fraction of mass transported (``1`` gives the soft matching
        score).
    device : str or torch.device, optional
        Where the cross product runs; default CUDA when available, else CPU.
    return_plan : bool
        Also return the optimal plan as a sparse (Nx, Ny) array.
    names : tuple of str
        Labels used in error messages.

    Returns
    -------
    PartialSoftMatchingResult

    Raises
    ------
    ValueError
        ``mass`` outside (0, 1] (before anything is computed), or bad input (NaN/Inf,
        shape, dtype, constant neurons).
    smd_dist.kernel.SolverError
        If optimality could not be certified.

    References
    ----------
    .. [1] Kapoor, C., Williams, A. H., & Khosla, M. (2026). Partial soft-matching distance
       for neural representational comparison with partial unit correspondence. ICLR.
    """
    m = check_mass(mass)
    x, y = prepare_pair(X, Y, center=True, normalize="unit", names=names)
    tr = partial_transport(x, y, mass=m, device=device)
    half = max(tr.cost, 0.0) / 2.0
    return PartialSoftMatchingResult(
        score=1.0 - half,
        matched_correlation=1.0 - half / m,
        cost=max(tr.cost, 0.0),
        mass=m,
        plan=tr.plan() if return_plan else None,
        solver=tr.solver,
        certificate=tr.certificate,
    )


def partial_soft_matching_score(X, Y, *, mass: float = DEFAULT_MASS, device=None) -> float:
    """Partial soft matching score ``s_m(X, Y)`` (see :func:`partial_soft_matching`), a float.

    Arrays are (stimuli, neurons); widths may differ. ``mass`` in (0, 1] is the fraction of
    mass transported; the rest, ``1 - m``, counts as perfectly matched.
    """
    return partial_soft_matching(X, Y, mass=mass, device=device).score
