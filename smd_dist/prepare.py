"""Preprocessing: device choice, centring and normalising, the cross-product cost block (torch).

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. Everything returned
is float64 NumPy on the host; the heavy matrix product runs in torch on ``device``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from smd_dist.validation import check_array, check_normalizable

__all__ = ["resolve_device", "preprocess", "cross_product", "squared_distances"]


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
        Bad input (see :mod:`smd_dist.validation`) or a constant neuron under normalisation.
    """
    if not (isinstance(X, np.ndarray) and X.dtype == np.float64 and X.ndim == 2):
        X = check_array(X, name=name)
    elif not np.isfinite(X).all() or min(X.shape) < 1 or X.shape[0] < 2:
        X = check_array(X, name=name)  # raises with the full message
    check_normalizable(X, center=center, normalize=normalize, name=name)
    # Column-wise float64 arithmetic is memory-bound: NumPy on the host is as fast as torch
    # here and exactly reproducible; the device only pays off for the cross product.
    # Neuron-major (Fortran) order: every later step reads whole tuning curves (norms,
    # exact costs of single pairs, gathers of matched columns), and a transpose costs more
    # than the centring it rides on.
    out = np.empty(X.shape, order="F")
    if center or normalize == "zscore":
        np.subtract(X, X.mean(axis=0), out=out)
    else:
        out[...] = X
    if normalize == "unit":
        out /= np.sqrt(np.einsum("mi,mi->i", out, out))
    elif normalize == "zscore":
        out /= np.sqrt(np.einsum("mi,mi->i", out, out) / out.shape[0])
    return out


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
            return (torch.from_numpy(X).to(dev).T @ torch.from_numpy(Y).to(dev)).cpu().numpy()
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
