"""Preprocessing: device choice, centring and normalising, the cross-product cost block (torch).

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. Everything returned
is float64 NumPy on the host; the heavy matrix product runs in torch on ``device``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from smd_dist.kernel.allocator import small_page_empty
from smd_dist.kernel.validation import check_normalizable, checked_columns

__all__ = [
    "cross_product",
    "neuron_major",
    "preprocess",
    "resolve_device",
    "squared_distances",
    "tensor_view",
]


def resolve_device(device=None) -> torch.device:
    """The torch device to compute on.

    ``None`` means CUDA when available, else CPU. An explicit CUDA request on a machine
    without CUDA falls back to CPU with a ``RuntimeWarning`` (the result is identical, only
    slower), so one run configuration works on laptops and GPU nodes alike.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device {str(device)!r} requested but CUDA is not available; using cpu",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.device("cpu")
    return dev


def preprocess(X, *, center: bool = True, normalize: str | None = None, name: str = "X"):
    """Centre and normalise the tuning curves (columns) of one representation.

    Parameters
    ----------
    X : array_like, shape (M, N)
        Stimuli in rows, neurons in columns.
    center : bool
        Subtract each neuron's mean over stimuli.
    normalize : {None, "unit", "zscore"}
        ``"unit"``: each column to unit L2 norm (after centring when ``center``);
        ``"zscore"``: centre, then divide by the column's standard deviation (ddof=0),
        whatever ``center`` says.
    name : str
        Label for error messages.

    Returns
    -------
    numpy.ndarray, shape (M, N), float64, Fortran order (each tuning curve contiguous)

    Raises
    ------
    ValueError
        Bad input (see :mod:`smd_dist.kernel.validation`) or a constant neuron under normalisation.
    """
    X, sums = checked_columns(X, name=name)
    # Column-wise float64 arithmetic is memory-bound: NumPy on the host is as fast as torch
    # here and exactly reproducible; the device only pays off for the cross product.
    # Neuron-major (Fortran) order: every later step reads whole tuning curves (norms,
    # exact costs of single pairs, gathers of matched columns), and a transpose costs more
    # than the centring it rides on. The float64 conversion of a float32 input rides on
    # the same copy.
    out = neuron_major(X)
    check_normalizable(out, center=center, normalize=normalize, name=name)
    if center or normalize == "zscore":
        out -= sums / X.shape[0]  # bit-identical to X.mean(axis=0), without another pass
    if normalize == "unit":
        out /= np.sqrt(np.einsum("mi,mi->i", out, out))
    elif normalize == "zscore":
        out /= np.sqrt(np.einsum("mi,mi->i", out, out) / out.shape[0])
    return out


def neuron_major(X: np.ndarray, *, block: int = 64) -> np.ndarray:
    """A Fortran-ordered (each tuning curve contiguous) float64 copy of ``X``.

    A row-major input is copied ``block`` stimuli at a time: NumPy's strided copy of a
    narrow slab keeps both sides in cache, measured 2-3x faster here than one
    whole-array transposing ufunc (3 ms against 8 ms for 2000 x 512). The copy is a
    prepared rep, kept for many pairs: it lives on small pages
    (:func:`smd_dist.kernel.allocator.small_page_empty`).

    Parameters
    ----------
    X : numpy.ndarray, shape (M, N), any real dtype
    block : int
        Stimuli per slab.

    Returns
    -------
    numpy.ndarray, shape (M, N), float64, Fortran order, never a view of ``X``
    """
    out_t = small_page_empty(X.shape[::-1])
    if X.flags.f_contiguous or not X.flags.c_contiguous:
        out_t.T[...] = X
        return out_t.T
    # Written once in order before the transposing copy: the copy touches every page of
    # the array at each slab, and fresh pages fault in faster in order (measured on the
    # engine benchmark's reps: 0.55-0.60 s against 0.58-0.65 s for all 16).
    out_t.fill(0.0)
    for start in range(0, X.shape[0], block):
        out_t[:, start : start + block] = X[start : start + block].T
    return out_t.T


def tensor_view(A: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(A)``, also for a read-only ``A`` (the engine's prepared arrays).

    torch warns that it cannot protect read-only memory; every caller here only reads.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(A)


def cross_product(X: np.ndarray, Y: np.ndarray, *, device=None, dtype=np.float64) -> np.ndarray:
    """``Xᵀ Y``: one torch matrix product on an accelerator, NumPy's BLAS on the host.

    Parameters
    ----------
    X, Y : numpy.ndarray, shapes (M, Nx) and (M, Ny)
        Stimuli in rows, neurons in columns.
    dtype : numpy dtype
        float64 (exact to rounding) or float32 (twice as fast; each entry then lies within
        ``(M + 2) 2⁻²⁴ ||x_i|| ||y_j||`` of the exact product, any summation order).

    Returns
    -------
    numpy.ndarray, shape (Nx, Ny), of ``dtype``
    """
    dev = resolve_device(device)
    # Any memory order: BLAS and torch take transposed operands as they are, while making
    # a neuron-major array row-major would be a full transpose.
    X = np.asarray(X, dtype=dtype)
    Y = np.asarray(Y, dtype=dtype)
    if dev.type != "cpu":
        try:
            return (tensor_view(X).to(dev).T @ tensor_view(Y).to(dev)).cpu().numpy()
        except RuntimeError as err:  # out of device memory, driver trouble: the CPU is exact too
            warnings.warn(f"{dev} product failed ({err}); using cpu", RuntimeWarning, stacklevel=2)
    # On the host NumPy's BLAS was measured as fast as torch's or faster (1.7x at 512 neurons,
    # equal at 4096), so torch is used where it pays: on an accelerator.
    return X.T @ Y


def squared_distances(X: np.ndarray, Y: np.ndarray, *, device=None, norms=None) -> np.ndarray:
    """All pairwise squared distances between tuning curves, float64.

    .. math:: D_{ij} = \\lVert x_i \\rVert^2 + \\lVert y_j \\rVert^2 - 2\\, x_i^\\top y_j

    The expansion loses at most a few ulps of ``max ||x||² + max ||y||²`` per entry; the
    solvers certify against a tolerance far above that and report distances evaluated
    without cancellation.

    ``norms``, when given, are the precomputed squared column norms ``(|x_i|², |y_j|²)``.

    Returns
    -------
    numpy.ndarray, shape (Nx, Ny), float64
    """
    G = cross_product(X, Y, device=device)
    if norms is None:
        norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    nx, ny = norms
    G *= -2.0
    G += nx[:, None]
    G += ny[None, :]
    return G
