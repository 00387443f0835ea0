"""Cross-validated soft matching score: the plan is fitted on some stimuli, scored on others.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. The in-sample
score picks the plan that maximises the correlations it then reports, so it is biased
upwards, the more so the more neurons (freedom) and the fewer stimuli. Cross-validation
separates the two: the stimuli are split into ``k`` folds with scikit-learn's
``KFold(n_splits=k, shuffle=True, random_state=seed)``, and for each fold

.. math::

    P^{(f)} = \\arg\\max_{P \\in \\mathcal T} \\sum_{ij} P_{ij}
    \\operatorname{corr}_{\\text{train}(f)}(x_i, y_j), \\qquad
    s^{(f)} = \\sum_{ij} P^{(f)}_{ij} \\operatorname{corr}_{\\text{test}(f)}(x_i, y_j),

each correlation computed on that part of the stimuli alone (its columns centred and
scaled to unit norm on their own). The score is the mean of the ``s^{(f)}``.

References
----------
.. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from smd_dist.kernel.certificate import Certificate
from smd_dist.kernel.preparation import CONSTANT_NEURONS, preprocess
from smd_dist.kernel.prepared import prepare_pair
from smd_dist.kernel.transport import solve
from smd_dist.kernel.validation import (
    check_array,
    check_same_stimuli,
    constant_columns,
    describe_indices,
)

__all__ = ["CrossValidatedScore", "check_cv", "soft_matching_cv"]

@dataclass(frozen=True)
class CrossValidatedScore:
    """A cross-validated soft matching score and its folds.

    Attributes
    ----------
    score : float
        Mean of ``fold_scores``.
    fold_scores : tuple of float
        Each fold's held-out score ``Σ P_ij corr_test(x_i, y_j)``, in ``KFold`` order.
    train_scores : tuple of float
        Each fold's in-sample score on its training stimuli (the plan's own objective).
    n_splits : int
    seed : int or None
        ``KFold``'s ``random_state``: ``KFold(n_splits, shuffle=True, random_state=seed)``
        reproduces the folds.
    dropped : tuple of numpy.ndarray
        Columns of X and of Y left out as constant on some fold's stimuli
        (``constant_neurons="drop"``; empty otherwise).
    solvers : tuple of str
        The exact method of each fold's solve.
    certificates : tuple of Certificate
        Each fold's certificate of optimality (all passed).
    """

    score: float
    fold_scores: tuple[float, ...]
    train_scores: tuple[float, ...]
    n_splits: int
    seed: int | None
    dropped: tuple[np.ndarray, np.ndarray]
    solvers: tuple[str, ...]
    certificates: tuple[Certificate, ...]


def check_cv(cv, n_stimuli: int) -> int:
    """``cv`` as a number of folds, each leaving at least 2 stimuli out, else ``ValueError``."""
    top = n_stimuli // 2
    if isinstance(cv, bool) or not isinstance(cv, numbers.Integral) or not 2 <= cv <= top:
        raise ValueError(
            f"cv must be a whole number of folds from 2 to {top} for {n_stimuli} stimuli "
            f"(each held-out fold needs at least 2 stimuli for a correlation), got {cv!r}"
        )
    return int(cv)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None (KFold's random_state), got {seed!r}")
    return None if seed is None else int(seed)


def soft_matching_cv(
    X,
    Y,
    *,
    cv: int = 5,
    seed: int | None = 0,
    constant_neurons: str = "refuse",
    device=None,
    names: tuple[str, str] = ("X", "Y"),
) -> CrossValidatedScore:
    """Cross-validated soft matching score: fit the plan on training stimuli, score held out.

    .. math::

        s_{cv}(X, Y) = \\frac{1}{k} \\sum_{f=1}^{k} \\sum_{ij} P^{(f)}_{ij}\\,
        \\operatorname{corr}_{\\text{test}(f)}(x_i, y_j)

    with :math:`P^{(f)}` the exact soft matching plan on fold ``f``'s training stimuli.

    Parameters
    ----------
    X, Y : array_like, shapes (M, Nx) and (M, Ny)
        Stimuli in rows, neurons in columns (a neuron's tuning curve is a column); the
        same stimuli in the same order.
    cv : int
        Number of folds ``k``, from 2 to ``M // 2`` (every held-out part keeps at least
        2 stimuli).
    seed : int or None
        ``random_state`` of ``sklearn.model_selection.KFold(k, shuffle=True)``; None draws
        fresh folds each call.
    constant_neurons : {"refuse", "drop"}
        A neuron constant on some fold's training or held-out stimuli has no correlation
        there (sparse units often are). ``"refuse"`` raises ``ValueError`` naming the fold,
        the part and the neurons; ``"drop"`` leaves every such neuron out of every fold,
        so all folds compare the same neurons (their columns are on the result).
    device : str or torch.device, optional
        Where the cross products run; default CUDA when available, else CPU.
    names : tuple of str
        Labels used in error messages.

    Returns
    -------
    CrossValidatedScore

    Raises
    ------
    ValueError
        Bad input, ``cv`` or ``seed``, or constant neurons under ``"refuse"``: before any
        transport is solved.
    smd_dist.kernel.SolverError
        If a fold's optimality could not be certified.

    References
    ----------
    .. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
       representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
    """
    from sklearn.model_selection import KFold

    if constant_neurons not in CONSTANT_NEURONS:
        raise ValueError(
            f"constant_neurons must be one of {CONSTANT_NEURONS}, got {constant_neurons!r}"
        )
    X, Y = check_array(X, name=names[0]), check_array(Y, name=names[1])
    check_same_stimuli(X, Y, names=names)
    k, seed = check_cv(cv, X.shape[0]), _check_seed(seed)
    folds = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(X))
    keep_x = _varying(X, folds, names[0], constant_neurons, k, seed)
    keep_y = _varying(Y, folds, names[1], constant_neurons, k, seed)
    dropped = (np.flatnonzero(~keep_x), np.flatnonzero(~keep_y))
    X, Y = X[:, keep_x], Y[:, keep_y]

    fold_scores, train_scores, solvers, certificates = [], [], [], []
    for f, (train, test) in enumerate(folds):
        labels = tuple(f"{n} (training stimuli of fold {f + 1}/{k})" for n in names)
        x, y = prepare_pair(X[train], Y[train], center=True, normalize="unit", names=labels)
        tr = solve(x, y, device=device)
        Xt = preprocess(X[test], center=True, normalize="unit", name=names[0])
        Yt = preprocess(Y[test], center=True, normalize="unit", name=names[1])
        corr = np.einsum("mk,mk->k", Xt[:, tr.rows], Yt[:, tr.cols])
        fold_scores.append(math.fsum(tr.mass * corr))
        train_scores.append(1.0 - max(tr.cost, 0.0) / 2.0)
        solvers.append(tr.solver)
        certificates.append(tr.certificate)
    return CrossValidatedScore(
        score=math.fsum(fold_scores) / k,
        fold_scores=tuple(fold_scores),
        train_scores=tuple(train_scores),
        n_splits=k,
        seed=seed,
        dropped=dropped,
        solvers=tuple(solvers),
        certificates=tuple(certificates),
    )


def _varying(X, folds, name, constant_neurons, k, seed) -> np.ndarray:
    """Mask of the neurons that vary on every fold's training and held-out stimuli."""
    keep = np.ones(X.shape[1], dtype=bool)
    for f, split in enumerate(folds):
        for part, idx in zip(("training", "held-out"), split, strict=True):
            cols = constant_columns(X[idx])
            if cols.size and constant_neurons == "refuse":
                raise ValueError(
                    f"{name} (shape {X.shape}) has {cols.size} neuron(s) constant on the "
                    f"{part} stimuli of fold {f + 1}/{k} (cv={k}, seed={seed}) at columns "
                    f"{describe_indices(cols)}: their correlation is undefined there. Pass "
                    "constant_neurons='drop' (smd_dist.soft_matching_cv) to leave out "
                    "neurons constant on any fold"
                )
            keep[cols] = False
    if not keep.any():
        raise ValueError(
            f"{name} (shape {X.shape}): every neuron is constant on some fold's stimuli "
            f"(cv={k}, seed={seed}); nothing is left to compare"
        )
    return keep
