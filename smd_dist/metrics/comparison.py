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
    return tr, math.sqrt(max(tr.cost, 0.0) * x.shape[1])


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


def _nuclear_norm_cross(Xp, Yp, *, device=None):
    """``||Xᵀ Y||_*`` through the smaller of the (M×M) and (Nx×Ny) problems."""
    m = Xp.shape[0]
    if m < min(Xp.shape[1], Yp.shape[1]):
        # Singular values of XᵀY equal those of (XXᵀ)^½ (YYᵀ)^½, an M×M matrix.
        def sqrt_psd(A):
            w, V = np.linalg.eigh(A)
            return (V * np.sqrt(np.clip(w, 0, None))) @ V.T

        A = sqrt_psd(Xp @ Xp.T)
        B = sqrt_psd(Yp @ Yp.T)
        return float(np.linalg.svd(A @ B, compute_uv=False).sum())
    return float(np.linalg.svd(cross_product(Xp, Yp, device=device), compute_uv=False).sum())


def procrustes_prepared(x: PreparedRep, y: PreparedRep, *, device=None) -> float:
    """Procrustes distance on prepared reps (see :func:`procrustes_distance`)."""
    Xp, Yp = x.columns, y.columns
    sq = (
        float(np.einsum("ij,ij->", Xp, Xp))
        + float(np.einsum("ij,ij->", Yp, Yp))
        - 2.0 * _nuclear_norm_cross(Xp, Yp, device=device)
    )
    return math.sqrt(max(sq, 0.0))


def procrustes_distance(X, Y, *, center=True, normalize=None, device=None, names=("X", "Y")):
    """Rotation-invariant (orthogonal Procrustes) distance.

    .. math::

        d_{\\mathrm{Pro}}(X, Y) = \\min_{Q^\\top Q = I} \\lVert X - Y Q \\rVert_F
        = \\sqrt{\\lVert X\\rVert_F^2 + \\lVert Y\\rVert_F^2 - 2\\lVert X^\\top Y\\rVert_*}

    When the widths differ, the narrower array is padded with zero columns (neurons that
    never respond) so that Q is square; padding does not change the nuclear-norm formula.
    Arrays are (stimuli, neurons). Unlike the soft matching distance it is blind to
    rotations of the neuron basis.
    """
    x, y = prepare_pair(X, Y, center=center, normalize=normalize, names=names)
    return procrustes_prepared(x, y, device=device)


def linear_cka_prepared(x: PreparedRep, y: PreparedRep) -> float:
    """Linear CKA on centred prepared reps (see :func:`linear_cka`)."""
    Xp, Yp = x.columns, y.columns
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
