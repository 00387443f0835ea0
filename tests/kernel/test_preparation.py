"""Preprocessing, device choice and the cost block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from smd_dist.kernel.preparation import (
    column_norms,
    cross_product,
    neuron_major,
    preprocess,
    preprocess_columns,
    resolve_device,
    squared_distances,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA fallback")


def test_resolve_device_default_and_explicit():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"


@no_cuda
def test_cuda_request_falls_back_with_warning():
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        assert resolve_device("cuda").type == "cpu"


def test_center(rng):
    X = rng.standard_normal((30, 6)) + 5
    out = preprocess(X)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(preprocess(X, center=False), X)


@pytest.mark.parametrize("order", ["C", "F", "strided"])
@pytest.mark.parametrize("m", [1, 63, 64, 130])
def test_neuron_major_copies_exactly_in_fortran_order(rng, order, m):
    base = rng.standard_normal((m, 14))
    X = base[:, ::2] if order == "strided" else np.asarray(base[:, :7], order=order)
    out = neuron_major(X)
    assert out.flags.f_contiguous and not np.shares_memory(out, X)
    np.testing.assert_array_equal(out, X)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_centring_in_the_layout_copy_is_bit_identical(rng, dtype):
    """One ufunc converts, transposes and centres: the same bits as copy-then-subtract."""
    X = (rng.standard_normal((300, 40)) * 1e2 + 3).astype(dtype)
    mean = X.sum(axis=0, dtype=np.float64) / X.shape[0]
    out = neuron_major(X, minus=mean)
    assert out.flags.f_contiguous and out.dtype == np.float64
    assert out.tobytes(order="F") == np.asfortranarray(X.astype(np.float64) - mean).tobytes(
        order="F"
    )


def test_a_rep_for_one_pair_takes_heap_memory_a_kept_one_its_own_pages(rng):
    """Kept reps (the engine's) live on small pages of their own; a rep made for a single
    pair takes ordinary memory, which the allocator hands back from call to call."""
    import mmap

    X = rng.standard_normal((1100, 512))  # 4.3 MiB: NumPy would advise huge pages

    def mapped(a):
        while a is not None and not isinstance(a, mmap.mmap):
            a = a.base if isinstance(a, np.ndarray) else getattr(a, "obj", None)
        return a is not None

    kept, once = preprocess(X), preprocess(X, kept=False)
    assert mapped(kept) and not mapped(once)
    assert np.array_equal(kept, once) and once.flags.f_contiguous


def test_centring_is_bit_identical_to_subtracting_the_mean(rng):
    X = rng.standard_normal((200, 9)) * 1e3 + 7
    out = preprocess(X)
    assert out.flags.f_contiguous
    assert out.tobytes(order="F") == np.asfortranarray(X - X.mean(axis=0)).tobytes(order="F")


def test_unit(rng):
    X = rng.standard_normal((30, 6)) + 5
    out = preprocess(X, normalize="unit")
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), 1, rtol=1e-12)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    raw = preprocess(X, center=False, normalize="unit")
    np.testing.assert_allclose(raw, X / np.linalg.norm(X, axis=0))


@pytest.mark.parametrize("center", [True, False])
def test_zscore_always_centres_ddof0(rng, center):
    X = rng.standard_normal((30, 6)) * 3 + 5
    out = preprocess(X, center=center, normalize="zscore")
    np.testing.assert_allclose(out, (X - X.mean(0)) / X.std(0, ddof=0), rtol=1e-12)


def test_cross_product_and_squared_distances(rng):
    X, Y = rng.standard_normal((40, 7)), rng.standard_normal((40, 9))
    np.testing.assert_allclose(cross_product(X, Y, device="cpu"), X.T @ Y, rtol=1e-12)
    D = squared_distances(X, Y, device="cpu")
    np.testing.assert_allclose(D, cdist(X.T, Y.T, "sqeuclidean"), rtol=1e-10, atol=1e-10)


@no_cuda
def test_cross_product_cuda_falls_back(rng):
    X, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 4))
    with pytest.warns(RuntimeWarning):
        out = cross_product(X, Y, device="cuda")
    np.testing.assert_allclose(out, X.T @ Y, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):  # pragma: no cover - runs on GPU machines only
    X, Y = rng.standard_normal((100, 30)), rng.standard_normal((100, 40))
    np.testing.assert_allclose(
        cross_product(X, Y, device="cuda"), cross_product(X, Y, device="cpu"), rtol=1e-12
    )


# --- any scale; constant neurons -------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1e-10, 1.0, 1e10, 1e170, 1e300])
def test_normalised_columns_do_not_depend_on_the_units(rng, scale):
    X = rng.standard_normal((30, 6))
    for normalize in ("unit", "zscore"):
        want = preprocess(X, normalize=normalize)
        np.testing.assert_allclose(preprocess(X * scale, normalize=normalize), want, rtol=1e-13)
    np.testing.assert_allclose(
        column_norms(X * scale) / scale, np.linalg.norm(X, axis=0), rtol=1e-14
    )


def test_drop_leaves_constant_neurons_out_before_centring(rng):
    X = rng.standard_normal((25, 7))
    X[:, [1, 5]] = 4.0
    X[:, 6] = 0.0
    kept = np.array([0, 2, 3, 4])
    for normalize in (None, "unit", "zscore"):
        out, dropped = preprocess_columns(X, normalize=normalize, constant_neurons="drop")
        assert dropped.tolist() == [1, 5, 6] and out.flags.f_contiguous
        want = preprocess(X[:, kept], normalize=normalize)
        np.testing.assert_allclose(out, want, rtol=1e-14, atol=1e-15)
    # without normalising, refuse keeps them (they are fine there)
    assert preprocess(X).shape == (25, 7)
    with pytest.raises(ValueError, match=r"constant_neurons='drop' leaves them out"):
        preprocess(X, normalize="unit")


def test_drop_needs_a_varying_neuron_and_a_known_option(rng):
    with pytest.raises(ValueError, match="no neuron that varies"):
        preprocess(np.ones((5, 3)), constant_neurons="drop", name="m/l")
    with pytest.raises(ValueError, match="constant_neurons must be one of"):
        preprocess(rng.standard_normal((5, 3)), constant_neurons="keep")
