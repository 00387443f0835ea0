"""Bad input: every case is a ValueError naming the problem and the shapes."""

from __future__ import annotations

import numpy as np
import pytest

import smd_dist
from smd_dist.kernel.validation import (
    check_array,
    check_normalizable,
    check_pair,
    constant_columns,
)


@pytest.fixture
def X(rng):
    return rng.standard_normal((20, 5))


def test_valid_input_becomes_float64(X):
    out = check_array(X.astype(np.float32))
    assert out.dtype == np.float64 and out.flags.c_contiguous
    assert check_array(np.arange(12).reshape(6, 2)).dtype == np.float64
    fortran = np.asfortranarray(X)
    assert check_array(fortran) is fortran  # no transpose copy of a prepared array
    assert check_array(X[::2, ::2]).flags.c_contiguous


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_rows_columns_and_shape(X, bad):
    X[3, 2] = bad
    X[7, 2] = bad
    with pytest.raises(ValueError, match=r"layer/a \(shape \(20, 5\)\)") as err:
        check_array(X, name="layer/a")
    msg = str(err.value)
    assert ("NaN" in msg) == np.isnan(bad)
    assert "rows [3, 7]" in msg and "columns [2]" in msg


def test_stimulus_mismatch_names_both(rng):
    with pytest.raises(ValueError, match="stimulus count mismatch") as err:
        check_pair(rng.random((10, 3)), rng.random((12, 3)), names=("a/l1", "b/l2"))
    msg = str(err.value)
    assert "a/l1 has 10 stimuli" in msg and "b/l2 has 12 stimuli" in msg
    assert "(10, 3)" in msg and "(12, 3)" in msg


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), ()])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"must be 2-D .* shape"):
        check_array(np.ones(shape))


def test_zero_neurons():
    with pytest.raises(ValueError, match=r"zero neurons \(shape \(10, 0\)\)"):
        check_array(np.ones((10, 0)))


@pytest.mark.parametrize("m", [0, 1])
def test_fewer_than_two_stimuli(m):
    with pytest.raises(ValueError, match="at least 2"):
        check_array(np.ones((m, 4)))


@pytest.mark.parametrize(
    "arr",
    [
        np.array([["a", "b"], ["c", "d"]]),
        np.array([[1, None], [2, 3]], dtype=object),
        np.ones((3, 2), dtype=bool),
        np.ones((3, 2), dtype=complex),
    ],
)
def test_non_numeric_dtype(arr):
    with pytest.raises(ValueError, match="non-numeric dtype"):
        check_array(arr)


@pytest.mark.parametrize("normalize", ["unit", "zscore"])
def test_constant_neurons_listed(X, normalize):
    X[:, 1] = 3.0
    X[:, 4] = -1.0
    with pytest.raises(ValueError, match=r"columns \[1, 4\]") as err:
        check_normalizable(X, normalize=normalize, name="m/l")
    assert "m/l" in str(err.value) and "divide by zero" in str(err.value)


def test_constant_neurons_fine_without_normalisation(X):
    X[:, 1] = 3.0
    check_normalizable(X, normalize=None)


def test_unit_without_centering_only_rejects_zero_columns(X):
    X[:, 0] = 2.0
    check_normalizable(X, center=False, normalize="unit")
    X[:, 0] = 0.0
    with pytest.raises(ValueError, match="all-zero"):
        check_normalizable(X, center=False, normalize="unit")


def test_unknown_normalize(X):
    with pytest.raises(ValueError, match="normalize must be"):
        check_normalizable(X, normalize="l2")


def _bad_pairs(rng):
    good = rng.standard_normal((10, 4))
    nan = good.copy()
    nan[0, 0] = np.nan
    const = good.copy()
    const[:, 2] = 1.0
    return {
        "nan": (nan, good, {}),
        "inf": (good * np.inf, good, {}),
        "mismatch": (good, rng.standard_normal((11, 4)), {}),
        "1d": (good[:, 0], good, {}),
        "3d": (good[None], good, {}),
        "zero-neurons": (good[:, :0], good, {}),
        "one-stimulus": (good[:1], good[:1], {}),
        "constant-unit": (const, good, {"normalize": "unit"}),
        "constant-zscore": (const, good, {"normalize": "zscore"}),
        "strings": (good.astype(str), good, {}),
    }


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "inf",
        "mismatch",
        "1d",
        "3d",
        "zero-neurons",
        "one-stimulus",
        "constant-unit",
        "constant-zscore",
        "strings",
    ],
)
def test_public_api_never_returns_a_number_for_bad_input(rng, case):
    A, B, kw = _bad_pairs(rng)[case]
    for f in (smd_dist.soft_matching_distance, smd_dist.procrustes_distance):
        with pytest.raises(ValueError):
            f(A, B, **kw)
    with pytest.raises(ValueError):
        smd_dist.soft_matching_distance(B, A, **kw)
    if not kw:
        with pytest.raises(ValueError):
            smd_dist.linear_cka(A, B)
        with pytest.raises(ValueError):
            smd_dist.soft_matching_score(A, B)


def test_score_rejects_constant_neurons(rng):
    A = rng.standard_normal((10, 4))
    A[:, 0] = 5.0
    with pytest.raises(ValueError, match="constant"):
        smd_dist.soft_matching_score(A, rng.standard_normal((10, 4)))


# --- inputs that look right but are not ------------------------------------------------


@pytest.mark.parametrize(
    "dims, flipped",
    [
        (("stimulus", "neuron"), False),
        (("neuron", "stimulus"), True),
        (("Presentation", "units"), False),
        (("units", "stimuli"), True),
        (("image", "unit"), False),  # one known name settles both axes
        (("neurons", "time"), True),
    ],
)
def test_labelled_arrays_are_read_by_their_dim_names(X, dims, flipped):
    xr = pytest.importorskip("xarray")
    labelled = xr.DataArray(X.T if flipped else X, dims=dims)
    np.testing.assert_array_equal(check_array(labelled), X)
    d = smd_dist.soft_matching_distance(labelled, X + 0.5)
    assert d == smd_dist.soft_matching_distance(X, X + 0.5)


@pytest.mark.parametrize(
    "dims", [("dim_0", "dim_1"), ("unit", "neuron"), ("stimulus", "presentation")]
)
def test_labelled_array_with_ambiguous_dims_is_refused(X, dims):
    xr = pytest.importorskip("xarray")
    with pytest.raises(ValueError, match="ambiguous") as err:
        check_array(xr.DataArray(X, dims=dims), name="m/l")
    assert "m/l" in str(err.value) and str(dims) in str(err.value)


def test_masked_entries_are_refused_and_an_empty_mask_is_its_data(X):
    masked = np.ma.masked_array(X, mask=np.zeros(X.shape, bool))
    np.testing.assert_array_equal(check_array(masked), X)
    masked[4, 1] = np.ma.masked
    masked[9, 3] = np.ma.masked
    with pytest.raises(ValueError, match=r"2 masked entries \(stimulus rows \[4, 9\]\)"):
        check_array(masked, name="m/l")
    with pytest.raises(ValueError, match="masked"):
        smd_dist.soft_matching_score(masked, X)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn"])
def test_low_precision_torch_tensors_are_upcast_exactly(X, dtype):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, dtype):
        pytest.skip(f"torch has no {dtype}")
    t = torch.tensor(X, dtype=torch.float32).to(getattr(torch, dtype))
    want = t.float().numpy().astype(np.float64)
    np.testing.assert_array_equal(check_array(t), want)
    assert smd_dist.soft_matching_distance(t, X) == smd_dist.soft_matching_distance(want, X)


def test_sums_that_overflow_are_refused(X):
    with pytest.raises(ValueError, match=r"overflow float64 in neuron columns \[0, 1, 2, 3, 4\]"):
        check_array(np.abs(X) * 1e307 + 1e307, name="m/l")


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1.0, 1e160, 1e300])
def test_constant_columns_at_any_scale(X, scale):
    X[:, 2] = 7.0
    X[:, 4] = 0.0
    assert constant_columns(X * scale).tolist() == [2, 4]


def test_dataframes_and_tensors_with_gradients_are_their_values(X):
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(check_array(pd.DataFrame(X)), X)
    np.testing.assert_array_equal(check_array(torch.tensor(X, requires_grad=True) * 1), X)
