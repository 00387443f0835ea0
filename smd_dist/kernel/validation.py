"""Input checks, one place: every array that reaches a metric passes through here first.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. Each check raises
``ValueError`` naming the problem, the array's label (for example ``"resnet18/layer3"``)
and its shape, so a failure on a worker still says which pair was bad.

Inputs that look right but are not are settled here too: a labelled array (an
``xarray.DataArray``, recognised by its ``dims``) is read by its dimension names, not its
axis order; a masked array with masked entries is refused; torch dtypes NumPy lacks
(bfloat16, float8) are upcast to float32 exactly. ``docs/inputs.md`` has the table.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "check_array",
    "check_normalizable",
    "check_pair",
    "check_same_stimuli",
    "checked_columns",
    "checked_with_sums",
    "constant_columns",
    "describe_indices",
]

#: Dimension names (any case) that mark the stimulus axis and the neuron axis of a
#: labelled array.
STIMULUS_DIMS = frozenset({"stimulus", "stimuli", "presentation", "presentations"})
NEURON_DIMS = frozenset({"neuron", "neurons", "unit", "units"})


def describe_indices(idx, *, limit: int = 8) -> str:
    """Short list of indices for an error message: ``[0, 3, 7]`` or ``[0, 1, ... (+12 more)]``."""
    idx = [int(i) for i in np.asarray(idx).ravel()]
    head = ", ".join(str(i) for i in idx[:limit])
    more = f", ... (+{len(idx) - limit} more)" if len(idx) > limit else ""
    return f"[{head}{more}]"


def check_array(X, *, name: str = "X") -> np.ndarray:
    """Validate one (stimuli, neurons) activation matrix and return it as float64.

    Contiguous input keeps its memory order (C or Fortran: a transpose would cost more than
    the check); anything else comes back C-ordered.

    Parameters
    ----------
    X : array_like, shape (M, N)
        Stimuli in rows, neurons in columns. NumPy arrays, torch tensors (any device and
        floating dtype), nested sequences, and labelled arrays whose ``dims`` name the
        stimulus and neuron axes (``xarray.DataArray``, transposed as needed) are accepted.
    name : str
        Label used in error messages (``"model/layer"``).

    Returns
    -------
    numpy.ndarray, shape (M, N), float64

    Raises
    ------
    ValueError
        Non-numeric dtype (strings, objects, booleans, complex), not 2-D, zero neurons,
        fewer than 2 stimuli, any NaN/Inf (the offending rows and columns are listed),
        column sums that overflow float64, masked entries, or a labelled array whose
        dimension names do not say which axis holds the stimuli.
    """
    return checked_with_sums(X, name=name)[0]


def checked_with_sums(X, *, name: str = "X") -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_array`, also returning the column sums its finiteness check computed.

    The sums are ``arr.sum(axis=0)`` exactly, so ``sums / M`` is bit-identical to
    ``arr.mean(axis=0)``: preprocessing centres with them instead of a second pass.
    """
    arr, sums = checked_columns(X, name=name)
    return np.asarray(arr, dtype=np.float64), sums


def checked_columns(X, *, name: str = "X") -> tuple[np.ndarray, np.ndarray]:
    """The checks of :func:`check_array` without its float64 copy.

    Returns ``X`` as a contiguous array of its own real dtype (no copy when it already is
    one) and its float64 column sums, bit-identical to those of the float64 copy: a float32
    store read is converted once, by whoever makes the array it keeps.
    """
    arr = _as_numpy(X, name=name)
    shape = tuple(arr.shape)
    if arr.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} has non-numeric dtype {arr.dtype} (shape {shape}); expected a real "
            "integer or floating point array of shape (stimuli, neurons)"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (stimuli, neurons), got {arr.ndim}-D array of shape {shape}"
        )
    m, n = shape
    if n == 0:
        raise ValueError(f"{name} has zero neurons (shape {shape})")
    if m < 2:
        raise ValueError(f"{name} has {m} stimulus/stimuli (shape {shape}); at least 2 are needed")
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    # Any NaN or ±Inf makes its column's sum non-finite: one cheap pass, details only on failure.
    with np.errstate(invalid="ignore", over="ignore"):
        sums = arr.sum(axis=0, dtype=np.float64)
        sums_finite = math.isfinite(np.add.reduce(sums))  # any NaN or Inf sum spoils it
    if not sums_finite and not (finite := np.isfinite(arr)).all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        bad_cols = np.flatnonzero(~finite.all(axis=0))
        kinds = []
        if np.isnan(arr).any():
            kinds.append("NaN")
        if np.isinf(arr).any():
            kinds.append("Inf")
        raise ValueError(
            f"{name} (shape {shape}) contains {'/'.join(kinds)} in stimulus rows "
            f"{describe_indices(bad_rows)}, neuron columns {describe_indices(bad_cols)}"
        )
    if not sums_finite:  # finite values whose sum overflows: the mean would be wrong
        bad_cols = np.flatnonzero(~np.isfinite(sums))
        raise ValueError(
            f"{name} (shape {shape}) has values up to {float(np.abs(arr).max()):.3g} whose "
            f"sums over the stimuli overflow float64 in neuron columns "
            f"{describe_indices(bad_cols)}; divide the data by a constant first"
        )
    return arr, sums


def _as_numpy(X, *, name: str) -> np.ndarray:
    """NumPy view (or copy) of the accepted input kinds, stimuli in rows."""
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # torch tensor on any device
        if X.is_floating_point() and X.element_size() < 4 and str(X.dtype) != "torch.float16":
            X = X.float()  # bfloat16, float8: NumPy has no such dtype; float32 holds them exactly
        return X.numpy(force=True)
    if isinstance(X, np.ma.MaskedArray):
        masked = np.ma.getmaskarray(X)
        if masked.any():
            rows = np.flatnonzero(masked.any(axis=tuple(range(1, masked.ndim))))
            raise ValueError(
                f"{name} (shape {X.shape}) is a masked array with {int(masked.sum())} masked "
                f"entries (stimulus rows {describe_indices(rows)}); every entry takes part "
                "in the metrics, so fill them (X.filled(value)) or leave those stimuli out"
            )
        return np.asarray(X.data)
    dims = getattr(X, "dims", None)
    if isinstance(dims, tuple) and len(dims) == 2:
        return _stimuli_first(np.asarray(X), dims, name=name)
    return np.asarray(X)


def _stimuli_first(arr: np.ndarray, dims: tuple, *, name: str) -> np.ndarray:
    """A labelled 2-D array's values with the stimulus axis first, read off its dim names.

    One recognised name settles both axes; none, or two of the same kind, is ambiguous.
    """
    kinds = []
    for dim in dims:
        label = str(dim).lower()
        kinds.append(
            "stimulus" if label in STIMULUS_DIMS else "neuron" if label in NEURON_DIMS else None
        )
    first, second = kinds
    if first != second:
        if first in ("stimulus", None) and second in ("neuron", None):
            return arr
        if first in ("neuron", None) and second in ("stimulus", None):
            return arr.T
    raise ValueError(
        f"{name} is a labelled array with dims {dims} (shape {arr.shape}): which axis holds "
        f"the stimuli is ambiguous. Name one of them from {sorted(STIMULUS_DIMS)} or "
        f"{sorted(NEURON_DIMS)} (e.g. X.rename({{{dims[0]!r}: 'stimulus', {dims[1]!r}: "
        "'neuron'})), or pass a plain (stimuli, neurons) array"
    )


def check_pair(X, Y, *, names: tuple[str, str] = ("X", "Y")) -> tuple[np.ndarray, np.ndarray]:
    """Validate two activation matrices that are to be compared.

    Both must pass :func:`check_array` and have the same number of stimuli (rows).

    Parameters
    ----------
    X, Y : array_like, shapes (M, Nx) and (M, Ny)
        Stimuli in rows, neurons in columns.
    names : tuple of str
        Labels for messages, e.g. ``("resnet18/layer3", "vit/block4")``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Both as float64 (see :func:`check_array` for the memory order).
    """
    name_x, name_y = names
    X = check_array(X, name=name_x)
    Y = check_array(Y, name=name_y)
    check_same_stimuli(X, Y, names=names)
    return X, Y


def check_same_stimuli(X, Y, *, names: tuple[str, str] = ("X", "Y")) -> None:
    """Refuse two (stimuli, neurons) arrays with different numbers of rows (stimuli)."""
    name_x, name_y = names
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"stimulus count mismatch: {name_x} has {X.shape[0]} stimuli (shape {X.shape}), "
            f"{name_y} has {Y.shape[0]} stimuli (shape {Y.shape})"
        )


def check_normalizable(
    X: np.ndarray, *, center: bool = True, normalize: str | None = None, name: str = "X"
) -> None:
    """Refuse neurons whose normalisation would divide by zero.

    Parameters
    ----------
    X : numpy.ndarray, shape (M, N)
        Stimuli in rows, neurons in columns (already passed :func:`check_array`).
    center : bool
        Whether the columns will be centred first (``"unit"`` then divides by the centred
        norm; ``"zscore"`` always centres).
    normalize : {None, "unit", "zscore"}
        The normalisation that will be applied.
    name : str
        Label used in error messages.

    Raises
    ------
    ValueError
        For an unknown ``normalize`` or constant neurons, listing the offending columns.
    """
    if normalize not in (None, "unit", "zscore"):
        raise ValueError(f"normalize must be None, 'unit' or 'zscore', got {normalize!r}")
    if normalize is None:
        return
    if normalize == "unit" and not center:
        bad, what = np.flatnonzero(~X.any(axis=0)), "all-zero"
    else:
        bad, what = constant_columns(X), "constant"
    if bad.size:
        raise ValueError(
            f"{name} (shape {X.shape}) has {bad.size} {what} neuron(s) at columns "
            f"{describe_indices(bad)}; normalize={normalize!r} would divide by zero "
            "(constant_neurons='drop' leaves them out)"
        )


def constant_columns(X: np.ndarray) -> np.ndarray:
    """Indices of the columns of a (stimuli, neurons) array that are constant over the
    stimuli (dead units).

    A column counts as constant when its spread is at rounding level of its magnitude,

    .. math:: \\lVert x - \\bar x \\rVert \\le 64\\, \\varepsilon \\sqrt{M} \\max_m |x_m|,

    evaluated on the column scaled by a power of two (exact) to a largest value in
    [1/2, 1), so that no square overflows or underflows whatever the data's units.
    """
    peak = np.abs(X).max(axis=0)
    unit = np.ldexp(1.0, -np.frexp(peak)[1])  # 1 for an all-zero column
    Z = X * unit
    Z -= Z.mean(axis=0)
    spread = np.sqrt(np.einsum("mi,mi->i", Z, Z))
    tiny = 64 * np.finfo(np.float64).eps * np.sqrt(X.shape[0]) * (peak * unit)
    return np.flatnonzero(spread <= tiny)
