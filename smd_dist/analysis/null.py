"""Chance baseline for the soft matching score: randomly rotate one side's neuron basis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RotationNull:
    """Observed soft matching score of a pair against its random-rotation null.

    Attributes
    ----------
    observed : float
        Score of the pair as given.
    null : numpy.ndarray
        Scores with the second representation's neuron basis randomly rotated, in draw order
        (read-only).
    p_value : float
        :math:`(1 + \\#\\{s_k \\ge s_\\text{obs}\\}) / (1 + K)` for K draws (ties to
        within 1e-12 relative count as exceedances).
    z_score : float
        :math:`(s_\\text{obs} - \\bar s) / \\mathrm{sd}(s)` (sample sd, ddof 1).
    n_draws : int
    seed : int or tuple of int
        Base seed; draw ``k`` uses ``numpy.random.SeedSequence(seed).spawn(K)[k]``.
    labels : tuple of str
        Names of the two representations, if given.
    n_neurons : tuple of int
        Neurons of X and Y that were scored.
    dropped : tuple of int
        Constant neurons left out of X and Y (``drop_constant=True``).
    """

    observed: float
    null: np.ndarray
    p_value: float
    z_score: float
    n_draws: int
    seed: int | tuple[int, ...]
    labels: tuple[str, ...] = ()
    n_neurons: tuple[int, int] = (0, 0)
    dropped: tuple[int, int] = (0, 0)

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())

    @property
    def null_std(self) -> float:
        return float(self.null.std(ddof=1)) if self.null.size > 1 else float("nan")


def haar_orthogonal(n: int, rng: np.random.Generator, *, k: int | None = None) -> np.ndarray:
    """First ``k`` columns of a Haar-random ``n x n`` orthogonal matrix.

    QR of a standard Gaussian matrix :math:`G = QR`, with the columns of :math:`Q` multiplied
    by :math:`\\mathrm{sign}(R_{ii})` so that the factorisation is unique and :math:`Q` is
    exactly Haar distributed (without the sign fix, LAPACK's QR is biased).

    References
    ----------
    Mezzadri, F. (2007). How to generate random matrices from the classical compact groups.
    Notices of the AMS 54(5).
    """
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    G = rng.standard_normal((n, k))
    Q, R = np.linalg.qr(G)
    signs = np.sign(np.diag(R))
    return Q * np.where(signs == 0, 1.0, signs)


def rotation_null(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    n_draws: int = 200,
    seed: int | Sequence[int] = 0,
    draws_per_task: int = 8,
    client=None,
    device: str | None = None,
    labels: Sequence[str] = (),
    drop_constant: bool = False,
    score: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> RotationNull:
    """Soft matching score of ``(X, Y)`` against randomly rotating ``Y``'s neuron basis.

    Arrays are (stimuli M, neurons N); a neuron's tuning curve is a column. The null draws
    :math:`Q` Haar-random in :math:`O(N_y)` and scores

    .. math:: s_k = s(X, Y Q_k), \\qquad k = 1, \\dots, K,

    where :math:`s` is :func:`smd_dist.soft_matching_score`, whose preprocessing centres and
    unit-normalises the columns of :math:`YQ` afresh. A rotation keeps the stimulus Gram matrix
    :math:`(YQ)(YQ)^\\top = YY^\\top`, so everything a rotation-invariant measure sees
    (Procrustes, CKA, RSA) is unchanged; only the alignment of the neuron basis is destroyed.
    Centring commutes with the rotation; normalisation does not, which is why the raw ``Y`` is
    rotated and the score re-normalises (rotating already unit-norm columns would leave
    columns of unequal norm). A score far above the null means single-neuron tuning is shared
    above chance.

    Only :math:`YV` matters, with :math:`V` (:math:`N \\times r`, :math:`r = \\min(M, N)`) the
    right singular vectors of :math:`Y`: :math:`V^\\top Q` is a Haar-random
    :math:`r`-frame, so :math:`YQ \\overset{d}{=} (YV) W^\\top` with :math:`W` the first
    :math:`r` columns of a Haar matrix. That costs :math:`O(N r^2)` per draw instead of
    :math:`O(N^3)` when neurons outnumber stimuli.

    Parameters
    ----------
    X, Y : numpy.ndarray
        (stimuli, neurons) arrays with the same stimuli; ``Y`` is rotated (swap them to rotate
        ``X``).
    n_draws : int, default 200
    seed : int or sequence of int, default 0
        Base seed (entropy of a :class:`numpy.random.SeedSequence`). Draw ``k`` has its own
        child seed, so the result does not depend on ``draws_per_task``, the number of
        workers or the scheduling.
    draws_per_task : int, default 8
        Draws computed by one Dask task.
    client : distributed.Client, optional
        Run the tasks on this cluster; otherwise on Dask's default scheduler.
    device : str, optional
        Passed to the score (``"cuda"``/``"cpu"``).
    labels : sequence of str
        Names of the two representations, kept in the result.
    drop_constant : bool, default False
        Leave out neurons that are constant over the stimuli (e.g. dead ReLUs) before
        scoring and rotating; their correlation is undefined, and the score refuses them.
        Without it, constant neurons are a ValueError.
    score : callable, optional
        ``score(X, Y) -> float`` replacing the soft matching score (e.g. to show that a
        rotation-invariant measure has a flat null).

    Returns
    -------
    RotationNull

    References
    ----------
    Khosla, M. & Williams, A. H. (2024). Soft matching distance: a metric on neural
    representations that captures single-neuron tuning. UniReps workshop, PMLR 243.
    """
    import dask

    if n_draws < 1:
        raise ValueError(f"n_draws must be at least 1, got {n_draws}")
    if draws_per_task < 1:
        raise ValueError(f"draws_per_task must be at least 1, got {draws_per_task}")
    X, Y = _check_pair(X, Y)
    dropped = []
    arrays = []
    for name, A in (("X", X), ("Y", Y)):
        live = live_neurons(A)
        if not live.all() and not drop_constant:
            raise ValueError(
                f"{name} (shape {A.shape}) has {int((~live).sum())} constant neuron(s), e.g. "
                f"columns {np.flatnonzero(~live)[:5].tolist()}; the score's normalisation "
                "cannot handle them: pass drop_constant=True to leave them out"
            )
        if not live.any():
            raise ValueError(f"{name} (shape {A.shape}) has no neuron that varies")
        dropped.append(int((~live).sum()))
        arrays.append(A[:, live])
    X, Y = arrays
    observed = float(_score(score, X, Y, device))
    # Y = U S V^T; YQ has the law of (Y V) W^T with W a Haar r-frame.
    _, _, Vt = np.linalg.svd(Y, full_matrices=False)
    YV = Y @ Vt.T
    seeds = np.random.SeedSequence(seed).spawn(n_draws)
    x_task, yv_task = dask.delayed(X, pure=True), dask.delayed(YV, pure=True)
    tasks = [
        dask.delayed(_null_block, pure=True)(
            x_task, yv_task, Y.shape[1], seeds[i : i + draws_per_task], device, score
        )
        for i in range(0, n_draws, draws_per_task)
    ]
    if client is not None:
        blocks = client.gather(client.compute(tasks))
    else:
        blocks = dask.compute(*tasks)
    null = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])
    null.setflags(write=False)
    # Ties within rounding count as exceedances (conservative): a rotation-invariant score
    # gives the observed value on every draw up to the last bit, and must get p = 1.
    exceed = int((null >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    sd = float(null.std(ddof=1)) if n_draws > 1 else float("nan")
    if sd > 0:
        z = (observed - float(null.mean())) / sd
    else:
        z = float("nan") if observed == float(null.mean()) else np.copysign(np.inf, observed)
    return RotationNull(
        observed=observed,
        null=null,
        p_value=(1 + exceed) / (1 + n_draws),
        z_score=float(z),
        n_draws=n_draws,
        seed=seed if isinstance(seed, int) else tuple(int(s) for s in seed),
        labels=tuple(str(s) for s in labels),
        n_neurons=(X.shape[1], Y.shape[1]),
        dropped=(dropped[0], dropped[1]),
    )


def live_neurons(X: np.ndarray) -> np.ndarray:
    """Boolean mask of the (stimuli, neurons) array's columns that are not constant.

    The rule of :func:`smd_dist.kernel.validation.check_normalizable`: a centred column whose norm
    is at rounding level of its magnitude counts as constant.
    """
    X = np.asarray(X, dtype=np.float64)
    Z = X - X.mean(axis=0)
    scale = np.sqrt((Z * Z).sum(axis=0))
    tiny = 64 * np.finfo(np.float64).eps * np.sqrt(X.shape[0]) * np.abs(X).max(axis=0)
    return scale > tiny


def _null_block(X, YV, n_neurons, seeds, device, score) -> np.ndarray:
    out = np.empty(len(seeds))
    for k, s in enumerate(seeds):
        W = haar_orthogonal(n_neurons, np.random.default_rng(s), k=YV.shape[1])
        out[k] = _score(score, X, YV @ W.T, device)
    return out


def _score(score, X, Y, device) -> float:
    if score is not None:
        return float(score(X, Y))
    from smd_dist import metrics

    return float(metrics.soft_matching_score(X, Y, device=device))


def _check_pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    for name, A in (("X", X), ("Y", Y)):
        if A.ndim != 2:
            raise ValueError(f"{name} must be (stimuli, neurons), got shape {A.shape}")
        if not np.isfinite(A).all():
            raise ValueError(f"{name} holds {int((~np.isfinite(A)).sum())} NaN/inf values")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"stimulus count mismatch: X has {X.shape[0]} stimuli, Y has {Y.shape[0]}"
        )
    return X, Y
