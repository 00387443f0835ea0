"""The comparison metrics of the soft matching paper: permutation, Procrustes, linear CKA.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. Each function takes
``center`` (and the distances ``normalize``) like :func:`smd_dist.soft_matching_distance`.

References
----------
.. [1] Khosla, M., & Williams, A. H. (2024). Soft matching distance: a metric on neural
   representations that captures single-neuron tuning. Proceedings of UniReps, PMLR 243.
.. [2] Williams, A. H., Kunz, E., Kornblith, S., & Linderman, S. (2021). Generalized shape
   metrics on neural representations. NeurIPS 34.
.. [3] Kornblith, S., Norouzi, M., Lee, H., & Hinton, G. (2019). Similarity of neural network
   representations revisited. ICML, PMLR 97.
"""

from __future__ import annotations

import math

import numpy as np

from smd_dist.kernel.preparation import cross_product
from smd_dist.kernel.prepared import PreparedRep, prepare_pair
from smd_dist.kernel.transport import Transport, solve

__all__ = [
    "linear_cka",
    "linear_cka_prepared",
    "permutation_distance",
    "permutation_prepared",
    "procrustes_distance",
    "procrustes_prepared",
]


def permutation_prepared(
    x: PreparedRep, y: PreparedRep, *, device=None
) -> tuple[Transport, float]:
    """Permutation distance on prepared reps; returns the
    :class:`~smd_dist.kernel.transport.Transport` and the distance."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"permutation distance needs equal widths: {x.name} has {x.shape[1]} neurons "
            f"(shape {x.shape}), {y.name} has {y.shape[1]} (shape {y.shape}); "
            "use the soft matching distance for different widths"
        )
    tr = solve(x, y, device=device)
    return tr, math.sqrt(max(tr.cost, 0.0)) * math.sqrt(x.shape[1])


def permutation_distance(X, Y, *, center=True, normalize=None, device=None, names=("X", "Y")):
    """Distance after the best one-to-one matching of neurons.

    .. math:: d_P(X, Y) = \\min_{\\Pi} \\lVert X - Y \\Pi \\rVert_F = \\sqrt{N}\\, d_T(X, Y)

    over permutation matrices :math:`\\Pi`; equal widths only. Equals :math:`\\sqrt N` times
    the soft matching distance, whose optimum at equal widths is a permutation / N.

    Raises
    ------
    ValueError
        If the widths differ.
    """
    x, y = prepare_pair(X, Y, center=center, normalize=normalize, names=names)
    return permutation_prepared(x, y, device=device)[1]


def _unit(*arrays) -> float:
    """The power of two that brings the largest |value| of ``arrays`` into [1/2, 1)."""
    peak = max(float(np.abs(A).max()) for A in arrays)
    return 1.0 if peak == 0 else math.ldexp(1.0, -math.frexp(peak)[1])


def _row_space_core(A: np.ndarray) -> np.ndarray:
    """An (M, M) array with the same stimulus Gram matrix ``A Aᵀ`` as a (stimuli M,
    neurons N) array with N > M, which is all the Procrustes distance depends on; ``A``
    itself otherwise.

    ``Rᵀ`` from ``Aᵀ = Q R`` (QR without forming Q, O(M² N), backward stable): the rotation
    found afterwards is then M×M instead of N×N.
    """
    m, n = A.shape
    if n <= m:
        return A
    return np.linalg.qr(A.T, mode="r").T


#: When ``||A||² + ||B||² - 2||BᵀA||_*`` is below this fraction of ``||A||² + ||B||²``, the
#: subtraction has cancelled too many digits (a rotated copy: 6e-8 of the norm instead of
#: 0), and the distance is evaluated as the residual of the optimal rotation instead. Above
#: it the formula loses at most about 1e-13 of the distance, and is 3-30 times cheaper.
CANCELLATION = 1e-2


def procrustes_prepared(x: PreparedRep, y: PreparedRep, *, device=None) -> float:
    """Procrustes distance on prepared reps (see :func:`procrustes_distance`).

    Both sides are first scaled by one power of two (exact), so no product overflows or
    underflows. Where ``||A||² + ||B||² - 2||BᵀA||_*`` cancels (near zero), the residual of
    the optimal rotation is evaluated instead: with ``A`` the narrower side and
    ``BᵀA = U S Vᵀ`` (thin), ``Q = [U Vᵀ, U⊥]`` and

    .. math::

        d^2 = \\lVert A - B U V^\\top \\rVert_F^2 + \\lVert B - B U U^\\top \\rVert_F^2,

    the second term being the part of ``B`` the zero-padded columns of ``A`` meet.
    """
    A, B = _row_space_core(x.columns), _row_space_core(y.columns)
    if A.shape[1] > B.shape[1]:
        A, B = B, A  # the distance is symmetric
    unit = _unit(A, B)
    A, B = A * unit, B * unit
    C = cross_product(B, A, device=device)
    total = float(np.einsum("ij,ij->", A, A)) + float(np.einsum("ij,ij->", B, B))
    squared = total - 2.0 * float(np.linalg.svd(C, compute_uv=False).sum())
    if squared >= CANCELLATION * total:
        return math.sqrt(squared) / unit
    # Schönemann (1966): the optimal rotation from the SVD of BᵀA.
    U, _, Vt = np.linalg.svd(C, full_matrices=False)
    BU = B @ U
    R = A - BU @ Vt
    squared = float(np.einsum("ij,ij->", R, R))
    if B.shape[1] > A.shape[1]:
        R = B - BU @ U.T
        squared += float(np.einsum("ij,ij->", R, R))
    return math.sqrt(squared) / unit


def procrustes_distance(X, Y, *, center=True, normalize=None, device=None, names=("X", "Y")):
    """Rotation-invariant (orthogonal Procrustes) distance.

    .. math::

        d_{\\mathrm{Pro}}(X, Y) = \\min_{Q^\\top Q = I} \\lVert X - Y Q \\rVert_F
        = \\sqrt{\\lVert X\\rVert_F^2 + \\lVert Y\\rVert_F^2 - 2\\lVert X^\\top Y\\rVert_*}

    When the widths differ, the narrower array is padded with zero columns (neurons that
    never respond) so that Q is square; padding does not change the nuclear-norm formula.
    Near zero, where the right-hand formula cancels, it is evaluated as the residual
    :math:`\\lVert X - YQ^\\star \\rVert_F` of the optimal :math:`Q^\\star` (accurate to
    rounding: a rotated copy gives 1e-14 of the norm).
    Arrays are (stimuli, neurons). Unlike the soft matching distance it is blind to
    rotations of the neuron basis.

    References
    ----------
    .. [1] Schönemann, P. H. (1966). A generalized solution of the orthogonal Procrustes
       problem. Psychometrika, 31(1), 1–10.
    """
    x, y = prepare_pair(X, Y, center=center, normalize=normalize, names=names)
    return procrustes_prepared(x, y, device=device)


def linear_cka_prepared(x: PreparedRep, y: PreparedRep) -> float:
    """Linear CKA on centred prepared reps (see :func:`linear_cka`).

    Each side is first scaled by a power of two (exact; CKA is invariant to it) so that its
    largest value is of order one: the fourth powers in the denominator would overflow
    from values of about 1e40 and underflow below 1e-40.
    """
    Xp, Yp = x.columns * _unit(x.columns), y.columns * _unit(y.columns)
    m = Xp.shape[0]
    if m < max(Xp.shape[1], Yp.shape[1]):
        Kx, Ky = Xp @ Xp.T, Yp @ Yp.T  # M×M Gram matrices are the cheaper route
        num = float(np.einsum("ij,ij->", Kx, Ky))
        den = math.sqrt(float(np.einsum("ij,ij->", Kx, Kx)) * float(np.einsum("ij,ij->", Ky, Ky)))
    else:
        C = Xp.T @ Yp
        Sx, Sy = Xp.T @ Xp, Yp.T @ Yp
        num = float(np.einsum("ij,ij->", C, C))
        den = math.sqrt(float(np.einsum("ij,ij->", Sx, Sx)) * float(np.einsum("ij,ij->", Sy, Sy)))
    if den == 0.0:
        raise ValueError(
            f"linear CKA is undefined: {x.name} (shape {Xp.shape}) or {y.name} "
            f"(shape {Yp.shape}) is constant over stimuli"
        )
    return num / den


def linear_cka(X, Y, *, names=("X", "Y")) -> float:
    """Linear centred kernel alignment, a similarity in [0, 1].

    .. math::

        \\mathrm{CKA}(X, Y) = \\frac{\\lVert Y^\\top X \\rVert_F^2}
        {\\lVert X^\\top X \\rVert_F \\, \\lVert Y^\\top Y \\rVert_F}

    on column-centred arrays (stimuli, neurons). Invariant to rotations and isotropic
    scaling of either representation.
    """
    x, y = prepare_pair(X, Y, center=True, normalize=None, names=names)
    return linear_cka_prepared(x, y)
