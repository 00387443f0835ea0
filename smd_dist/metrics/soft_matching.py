"""Soft matching distance and score: exact optimal transport between tuning curves.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column.

.. math::

    d(X, Y) = \\Big(\\min_{P \\in \\mathcal T(N_x, N_y)} \\sum_{ij} P_{ij}
              \\lVert x_i - y_j \\rVert^2 \\Big)^{1/2},
    \\qquad \\mathcal T = \\{P \\ge 0 : P\\mathbf 1 = \\mathbf 1/N_x,\\;
              P^\\top\\mathbf 1 = \\mathbf 1/N_y\\}

``method="sinkhorn"`` computes a certified interval :math:`[d_-, d_+] \\ni d(X, Y)` with
entropic transport instead (:mod:`smd_dist.kernel.sinkhorn`), and solves exactly when the
interval is wider than ``rtol`` times :math:`d_+`.

References
----------
.. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from smd_dist.kernel.certificate import Certificate
from smd_dist.kernel.prepared import PreparedRep, prepare_pair
from smd_dist.kernel.sinkhorn import DEFAULT_RTOL, check_rtol, sinkhorn_interval
from smd_dist.kernel.transport import Transport, merging_can_pay, solve
from smd_dist.metrics.cross_validation import soft_matching_cv

__all__ = [
    "METHODS",
    "SoftMatchingResult",
    "Solved",
    "solve_pair",
    "soft_matching",
    "soft_matching_distance",
    "soft_matching_score",
    "transport",
]

#: ``method`` values of :func:`soft_matching`.
METHODS = ("exact", "sinkhorn")
#: ``solver`` of a pair settled by the certified Sinkhorn interval.
SINKHORN_SOLVER = "sinkhorn-certified"


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
        The optimal plan (Nx, Ny) when ``return_plan=True``; with neurons dropped, over
        the kept neurons in their order.
    solver : str
        Which exact method produced the plan (see :mod:`smd_dist.kernel.transport`);
        ``"sinkhorn-certified"`` for a certified interval, ``"sinkhorn-fallback-<exact
        method>"`` when ``method="sinkhorn"`` had to solve exactly.
    certificate : Certificate
        Dual feasibility violation, primal–dual gap and tolerance (all passed). For an
        interval: ``primal`` and ``dual`` are the bounds on the cost, ``gap`` their
        difference, ``tolerance`` the gap ``rtol`` allows.
    lower, upper : float or None
        For a certified interval, ``lower <= d_exact <= upper`` with ``upper - lower <=
        rtol * upper``, and ``distance == upper`` (``cost == upper²``); None for an
        exact solve.
    dropped : tuple of numpy.ndarray
        Columns of X and of Y left out as constant over the stimuli
        (``constant_neurons="drop"``); empty otherwise.
    """

    distance: float
    cost: float
    score: float | None
    plan: sp.coo_array | None
    solver: str
    certificate: Certificate
    lower: float | None = None
    upper: float | None = None
    dropped: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.empty(0, np.int64), np.empty(0, np.int64))
    )


@dataclass(frozen=True)
class Solved:
    """One pair's squared distance, exact or certified by an interval.

    Attributes
    ----------
    cost : float
        The exact optimum, or for an interval its upper end (the cost of a feasible plan).
    lower, upper : float or None
        The interval on the cost (None for an exact solve).
    solver : str
    certificate : Certificate
    transport : Transport or None
        The exact solve's plan and duals (None for an interval).
    """

    cost: float
    lower: float | None
    upper: float | None
    solver: str
    certificate: Certificate
    transport: Transport | None = None

    def distances(self) -> tuple[float, float | None, float | None]:
        """``(distance, lower, upper)`` on the distance (square roots of the costs)."""
        return _root(self.cost), _root(self.lower), _root(self.upper)


def _root(cost: float | None) -> float | None:
    return None if cost is None else math.sqrt(max(cost, 0.0))


def check_method(method: str, rtol) -> float:
    """``rtol`` as a float after checking ``method`` and ``rtol`` (``ValueError``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return check_rtol(rtol)


def solve_pair(
    x: PreparedRep, y: PreparedRep, *, method: str = "exact", rtol=DEFAULT_RTOL, device=None
) -> Solved:
    """The squared soft matching distance of two prepared reps, by ``method``.

    ``"sinkhorn"``: the certified interval of :func:`smd_dist.kernel.sinkhorn.sinkhorn_interval`
    when its distances satisfy ``upper - lower <= rtol * upper``, else the exact solve
    (``solver`` then starts with ``"sinkhorn-fallback-"``).
    """
    rtol = check_method(method, rtol)
    if method == "sinkhorn":
        interval = sinkhorn_interval(x, y, rtol=rtol, device=device)
        if interval.within(rtol):
            allowed = interval.upper * rtol * (2.0 - rtol)  # (1 - (1 - rtol)²) · upper
            cert = Certificate(
                max_violation=0.0,
                gap=interval.upper - interval.lower,
                tolerance=allowed,
                primal=interval.upper,
                dual=interval.lower,
            )
            return Solved(interval.upper, interval.lower, interval.upper, SINKHORN_SOLVER, cert)
    tr = solve(x, y, device=device)
    solver = tr.solver if method == "exact" else f"sinkhorn-fallback-{tr.solver}"
    return Solved(max(tr.cost, 0.0), None, None, solver, tr.certificate, tr)


def transport(x: PreparedRep, y: PreparedRep, *, device=None) -> Transport:
    """Certified optimal transport between prepared reps (no further preprocessing)."""
    return solve(x, y, device=device)


def soft_matching(
    X,
    Y,
    *,
    center: bool = True,
    normalize: str | None = None,
    constant_neurons: str = "refuse",
    device=None,
    return_plan: bool = False,
    names: tuple[str, str] = ("X", "Y"),
    method: str = "exact",
    rtol: float = DEFAULT_RTOL,
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
    constant_neurons : {"refuse", "drop"}
        Neurons constant over the stimuli (dead units): ``"refuse"`` raises where
        normalising would divide by zero; ``"drop"`` leaves them out of both arrays first.
    device : str or torch.device, optional
        Where the cross product runs; default CUDA when available, else CPU.
    return_plan : bool
        Also return the optimal plan as a sparse (Nx, Ny) array.
    names : tuple of str
        Labels used in error messages.
    method : {"exact", "sinkhorn"}
        ``"sinkhorn"``: entropic transport (torch, on ``device``) turned into a certified
        interval ``lower <= d <= upper`` (:mod:`smd_dist.kernel.sinkhorn`); the pair is
        solved exactly instead when ``upper - lower > rtol * upper``.
    rtol : float
        Relative width of the interval ``method="sinkhorn"`` accepts, in (0, 1).

    Returns
    -------
    SoftMatchingResult

    Raises
    ------
    ValueError
        Bad input (NaN/Inf, shape, dtype, constant neurons under normalisation with
        ``constant_neurons="refuse"``, values beyond float64's reach once squared), an
        unknown ``method``, ``rtol`` outside (0, 1), or ``return_plan`` with ``"sinkhorn"``.
    smd_dist.kernel.SolverError
        If optimality could not be certified (never a silently approximate number).

    References
    ----------
    .. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
       representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
    """
    rtol = check_method(method, rtol)
    if return_plan and method != "exact":
        raise ValueError(
            f"return_plan=True needs method='exact'; method={method!r} keeps no plan "
            "(its upper bound is the cost of a dense rounded plan)"
        )
    # Prepared for this pair only: heap memory, reused from call to call; copies looked
    # for only where the solve could merge them.
    x, y = prepare_pair(
        X,
        Y,
        center=center,
        normalize=normalize,
        constant_neurons=constant_neurons,
        names=names,
        kept=False,
        group=merging_can_pay,
    )
    solved = solve_pair(x, y, method=method, rtol=rtol, device=device)
    distance, lower, upper = solved.distances()
    score = 1.0 - solved.cost / 2.0 if (center and normalize == "unit") else None
    return SoftMatchingResult(
        distance=distance,
        cost=solved.cost,
        score=score,
        plan=solved.transport.plan() if return_plan else None,
        solver=solved.solver,
        certificate=solved.certificate,
        lower=lower,
        upper=upper,
        dropped=(x.dropped, y.dropped),
    )


def soft_matching_distance(
    X,
    Y,
    *,
    center: bool = True,
    normalize: str | None = None,
    constant_neurons: str = "refuse",
    device=None,
) -> float:
    """Soft matching distance ``d(X, Y)`` (see :func:`soft_matching`), a float.

    Arrays are (stimuli, neurons); widths may differ.
    """
    return soft_matching(
        X, Y, center=center, normalize=normalize, constant_neurons=constant_neurons,
        device=device,
    ).distance


def soft_matching_score(
    X,
    Y,
    *,
    constant_neurons: str = "refuse",
    device=None,
    cv: int | None = None,
    seed: int | None = 0,
) -> float:
    """Soft matching score: the best average correlation of matched tuning curves.

    .. math::

        s(X, Y) = \\max_{P \\in \\mathcal T} \\sum_{ij} P_{ij}\\,
        \\operatorname{corr}(x_i, y_j) = 1 - d(\\tilde X, \\tilde Y)^2 / 2

    where :math:`\\tilde X, \\tilde Y` have centred, unit-norm columns; ``s`` is in [-1, 1]
    and does not depend on the data's units. Arrays are (stimuli, neurons).

    With ``cv=k`` the plan is fitted on the training stimuli of each of ``k`` folds
    (``sklearn.model_selection.KFold(k, shuffle=True, random_state=seed)``) and scored on
    its held-out stimuli, each part centred and normalised on its own; the mean over folds
    is returned (:func:`smd_dist.soft_matching_cv` gives the folds and more options).

    Parameters
    ----------
    constant_neurons : {"refuse", "drop"}
        Neurons constant over the stimuli (dead ReLUs) have no correlation: ``"refuse"``
        (default) raises ``ValueError`` naming them; ``"drop"`` scores the others (with
        ``cv``, those constant on any fold's part).
    device : str or torch.device, optional
    cv : int, optional
        Folds of the cross-validated score; ``None`` scores in sample.
    seed : int
        Seed of the folds' shuffle.
    """
    if cv is not None:
        return soft_matching_cv(
            X, Y, cv=cv, seed=seed, constant_neurons=constant_neurons, device=device
        ).score
    return soft_matching(
        X, Y, center=True, normalize="unit", constant_neurons=constant_neurons, device=device
    ).score
