"""Metric properties, cross-checks and the registry contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

import smd_dist
from smd_dist.kernel.prepared import prepare
from smd_dist.kernel.transport import Certificate
from smd_dist.metrics import Metric, PairValue, available, get


def rep(rng, m=15, n=6, latent=None):
    if latent is not None:
        return latent @ rng.standard_normal((latent.shape[1], n)) + 0.3 * rng.standard_normal(
            (latent.shape[0], n)
        )
    return rng.standard_normal((m, n))


def test_hand_computed_equal_widths():
    # Tuning curves (columns) x1=(1,0), x2=(0,1); y1=(0,1), y2=(2,0). Costs: |x1-y1|²=2,
    # |x1-y2|²=1, |x2-y1|²=0, |x2-y2|²=5: the best matching x1→y2, x2→y1 costs (1+0)/2.
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    Y = np.array([[0.0, 2.0], [1.0, 0.0]])
    res = smd_dist.soft_matching(X, Y, center=False, return_plan=True)
    assert res.cost == pytest.approx(0.5, abs=1e-15)
    assert res.distance == pytest.approx(math.sqrt(0.5))
    np.testing.assert_allclose(res.plan.toarray(), [[0, 0.5], [0.5, 0]])
    assert smd_dist.permutation_distance(X, Y, center=False) == pytest.approx(1.0)


def test_hand_computed_unequal_widths():
    # One tuning curve at the origin against (1,0) and (0,2): half its mass to each.
    X = np.zeros((2, 1))
    Y = np.array([[1.0, 0.0], [0.0, 2.0]])
    res = smd_dist.soft_matching(X, Y, center=False, return_plan=True)
    assert res.cost == pytest.approx(0.5 * 1 + 0.5 * 4)
    np.testing.assert_allclose(res.plan.toarray(), [[0.5, 0.5]])


@pytest.mark.parametrize("seed", range(12))
def test_triangle_inequality_symmetry_identity(seed):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((20, 3))
    widths = rng.integers(1, 12, size=3)
    A, B, C = (rep(rng, n=int(n), latent=Z) for n in widths)
    d = smd_dist.soft_matching_distance
    ab, bc, ac = d(A, B), d(B, C), d(A, C)
    assert ac <= ab + bc + 1e-9
    assert ab <= ac + bc + 1e-9
    assert d(B, A) == pytest.approx(ab, rel=1e-12, abs=1e-12)
    assert d(A, A) == pytest.approx(0.0, abs=1e-7)
    assert ab >= 0


@pytest.mark.parametrize("seed", range(4))
def test_permutation_invariance(seed):
    rng = np.random.default_rng(seed)
    X, Y = rep(rng, n=9), rep(rng, n=13)
    d = smd_dist.soft_matching_distance(X, Y)
    assert smd_dist.soft_matching_distance(X[:, rng.permutation(9)], Y) == pytest.approx(d)
    assert smd_dist.soft_matching_distance(X, Y[:, rng.permutation(13)]) == pytest.approx(d)


def test_duplicating_every_neuron_gives_zero(rng):
    X = rep(rng, n=7)
    assert smd_dist.soft_matching_distance(X, np.hstack([X, X])) == pytest.approx(0, abs=1e-7)
    assert smd_dist.soft_matching_distance(X, np.repeat(X, 3, axis=1)) == pytest.approx(
        0, abs=1e-7
    )


def test_rotation_is_seen_by_soft_matching_not_procrustes(rng):
    X = rep(rng, m=30, n=8)
    Q = ortho_group.rvs(8, random_state=1)
    assert smd_dist.soft_matching_distance(X, X @ Q) > 0.1
    assert smd_dist.procrustes_distance(X, X @ Q) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_permutation_is_sqrt_n_times_soft_matching(seed):
    rng = np.random.default_rng(seed)
    X, Y = rep(rng, n=10), rep(rng, n=10)
    dt = smd_dist.soft_matching_distance(X, Y)
    assert smd_dist.permutation_distance(X, Y) == pytest.approx(math.sqrt(10) * dt, rel=1e-12)


def test_permutation_needs_equal_widths(rng):
    with pytest.raises(ValueError, match="equal widths: a has 4 neurons"):
        smd_dist.permutation_distance(rep(rng, n=4), rep(rng, n=5), names=("a", "b"))


@pytest.mark.parametrize("widths", [(6, 6), (5, 9)])
def test_score_is_one_minus_half_squared_distance(rng, widths):
    X, Y = rep(rng, n=widths[0]), rep(rng, n=widths[1])
    s = smd_dist.soft_matching_score(X, Y)
    d = smd_dist.soft_matching_distance(X, Y, normalize="unit")
    assert d**2 == pytest.approx(2 - 2 * s, rel=1e-12)
    assert -1 <= s <= 1
    assert smd_dist.soft_matching_score(X, X) == pytest.approx(1.0)
    res = smd_dist.soft_matching(X, Y, normalize="unit")
    assert res.score == pytest.approx(s)
    assert smd_dist.soft_matching(X, Y).score is None


def test_score_matches_correlation_matching(rng):
    X, Y = rep(rng, n=5), rep(rng, n=5)
    corr = np.corrcoef(X.T, Y.T)[:5, 5:]
    import itertools

    best = max(sum(corr[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert smd_dist.soft_matching_score(X, Y) == pytest.approx(best / 5, rel=1e-12)


def test_zscore_is_scaled_unit(rng):
    X, Y = rep(rng, m=16, n=5), rep(rng, m=16, n=7)
    dz = smd_dist.soft_matching_distance(X, Y, normalize="zscore")
    du = smd_dist.soft_matching_distance(X, Y, normalize="unit")
    assert dz == pytest.approx(math.sqrt(16) * du, rel=1e-12)


def test_result_fields_and_certificate(rng):
    X, Y = rep(rng, n=6), rep(rng, n=9)
    res = smd_dist.soft_matching(X, Y, return_plan=True)
    assert isinstance(res, smd_dist.SoftMatchingResult)
    assert res.distance == pytest.approx(math.sqrt(res.cost))
    assert isinstance(res.certificate, Certificate) and res.certificate.passed
    P = res.plan.toarray()
    assert P.shape == (6, 9)
    np.testing.assert_allclose(P.sum(1), 1 / 6)
    np.testing.assert_allclose(P.sum(0), 1 / 9)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    direct = sum(
        P[i, j] * np.sum((Xc[:, i] - Yc[:, j]) ** 2) for i, j in zip(*np.nonzero(P), strict=True)
    )
    assert res.cost == pytest.approx(direct, rel=1e-13)
    assert smd_dist.soft_matching(X, Y).plan is None
    with pytest.raises(AttributeError):
        res.distance = 0.0


def test_deterministic(rng):
    X, Y = rep(rng, m=40, n=50), rep(rng, m=40, n=50)
    a = smd_dist.soft_matching(X, Y, return_plan=True)
    b = smd_dist.soft_matching(X.copy(), Y.copy(), return_plan=True)
    assert a.distance == b.distance and a.cost == b.cost
    assert (a.plan != b.plan).nnz == 0


def test_accepts_torch_and_float32(rng):
    X, Y = rep(rng, n=5), rep(rng, n=6)
    d = smd_dist.soft_matching_distance(X, Y)
    assert smd_dist.soft_matching_distance(torch.from_numpy(X), Y, device="cpu") == d
    assert smd_dist.soft_matching_distance(X.astype(np.float32), Y) == pytest.approx(d, rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA fallback")
def test_cuda_request_falls_back(rng):
    X, Y = rep(rng, n=5), rep(rng, n=6)
    with pytest.warns(RuntimeWarning):
        d = smd_dist.soft_matching_distance(X, Y, device="cuda")
    assert d == smd_dist.soft_matching_distance(X, Y, device="cpu")


@pytest.mark.parametrize("shape", [(40, 5, 5), (40, 5, 8), (4, 12, 9)])
def test_procrustes_matches_explicit_rotation(rng, shape):
    m, nx, ny = shape
    X, Y = rng.standard_normal((m, nx)), rng.standard_normal((m, ny))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = max(nx, ny)
    Xp = np.hstack([Xc, np.zeros((m, n - nx))])
    Yp = np.hstack([Yc, np.zeros((m, n - ny))])
    R, _ = orthogonal_procrustes(Yp, Xp)
    expected = np.linalg.norm(Xp - Yp @ R)
    assert smd_dist.procrustes_distance(X, Y) == pytest.approx(expected, rel=1e-9)
    assert smd_dist.procrustes_distance(Y, X) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("shape", [(30, 4, 6), (5, 12, 9)])
def test_linear_cka(rng, shape):
    m, nx, ny = shape
    X, Y = rng.standard_normal((m, nx)), rng.standard_normal((m, ny))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Kx, Ky = Xc @ Xc.T, Yc @ Yc.T
    expected = np.sum(Kx * Ky) / np.sqrt(np.sum(Kx * Kx) * np.sum(Ky * Ky))
    assert smd_dist.linear_cka(X, Y) == pytest.approx(expected, rel=1e-12)
    assert smd_dist.linear_cka(X, X) == pytest.approx(1.0)
    Q = ortho_group.rvs(nx, random_state=0)
    assert smd_dist.linear_cka(3 * X @ Q, Y) == pytest.approx(expected, rel=1e-9)
    assert 0 <= expected <= 1


def test_cka_constant_representation_is_an_error(rng):
    with pytest.raises(ValueError, match="constant"):
        smd_dist.linear_cka(np.ones((5, 3)), rng.standard_normal((5, 2)))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shape", [(60, 20), (15, 40), (30, 30)])
def test_procrustes_of_a_rotated_copy_is_zero_to_rounding(seed, shape):
    # sqrt(|X|² + |Y|² - 2|XᵀY|_*) cancels here: 6e-8 of the norm; netrep gets 6e-14.
    rng = np.random.default_rng(seed)
    X = rng.standard_normal(shape)
    Y = X @ ortho_group.rvs(shape[1], random_state=seed)
    norm = np.linalg.norm(X - X.mean(0))
    assert smd_dist.procrustes_distance(X, Y) <= 1e-10 * norm
    assert smd_dist.procrustes_distance(Y, X) <= 1e-10 * norm


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(50, 6, 11), (12, 30, 17), (20, 20, 20)])
def test_procrustes_matches_scipy_to_rounding(seed, shape):
    m, nx, ny = shape
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, nx))
    Y = X[:, rng.integers(0, nx, ny)] + 0.01 * rng.standard_normal((m, ny))  # near zero
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = max(nx, ny)
    Xp, Yp = np.pad(Xc, ((0, 0), (0, n - nx))), np.pad(Yc, ((0, 0), (0, n - ny)))
    R, _ = orthogonal_procrustes(Yp, Xp)
    assert smd_dist.procrustes_distance(X, Y) == pytest.approx(
        np.linalg.norm(Xp - Yp @ R), rel=1e-11
    )


EXTREME = [1e-150, 1e-100, 1e-40, 1e-8, 1e8, 1e40, 1e100, 1e150]
BEYOND = [1e-300, 1e-170, 1e160, 1e300]


@pytest.mark.parametrize("scale", EXTREME + BEYOND)
def test_extreme_scales_give_the_right_number_or_a_value_error(rng, scale):
    X, Y = rng.standard_normal((40, 20)), rng.standard_normal((40, 30))
    # invariant metrics and homogeneous distances (degree one)
    cases = {
        smd_dist.soft_matching_score: 0,
        smd_dist.linear_cka: 0,
        smd_dist.soft_matching_distance: 1,
        smd_dist.procrustes_distance: 1,
    }
    for metric, degree in cases.items():
        want = metric(X, Y) * scale**degree
        if scale in BEYOND and metric is not smd_dist.soft_matching_score:
            with pytest.raises(ValueError, match="multiply the data by a constant"):
                metric(X * scale, Y * scale)
            continue
        assert metric(X * scale, Y * scale) == pytest.approx(want, rel=1e-12), metric.__name__


def test_score_does_not_depend_on_the_units(rng):
    X, Y = rng.standard_normal((40, 20)), rng.standard_normal((40, 30))
    want = smd_dist.soft_matching_score(X, Y)
    for exponent in range(-300, 301, 25):
        s = 10.0**exponent
        assert smd_dist.soft_matching_score(X * s, Y * s) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------- constant neurons


def test_score_drops_constant_neurons_when_asked(rng):
    X, Y = rng.standard_normal((30, 9)), rng.standard_normal((30, 12))
    X[:, [0, 4]] = 0.0  # dead ReLUs
    Y[:, 7] = 2.5  # constant, not zero
    with pytest.raises(ValueError, match=r"columns \[0, 4\].*constant_neurons='drop'"):
        smd_dist.soft_matching_score(X, Y)
    got = smd_dist.soft_matching_score(X, Y, constant_neurons="drop")
    live_x, live_y = np.delete(X, [0, 4], axis=1), np.delete(Y, 7, axis=1)
    assert got == smd_dist.soft_matching_score(live_x, live_y)
    result = smd_dist.soft_matching(
        X, Y, normalize="unit", constant_neurons="drop", return_plan=True
    )
    assert [d.tolist() for d in result.dropped] == [[0, 4], [7]]
    assert result.plan.shape == (7, 11) and result.score == got
    with pytest.raises(ValueError, match="constant_neurons must be one of"):
        smd_dist.soft_matching_score(X, Y, constant_neurons="ignore")


# ---------------------------------------------------------------------------- registry


def test_available_names():
    assert set(available()) >= {
        "soft_matching",
        "soft_matching_score",
        "permutation",
        "procrustes",
        "linear_cka",
    }
    assert available() == tuple(sorted(available()))


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean 'procrustes'"):
        get("procrustse")
    with pytest.raises(ValueError, match="unknown metric"):
        get("zzzzzz")


@pytest.mark.parametrize(
    "name", ["soft_matching", "soft_matching_score", "permutation", "procrustes", "linear_cka"]
)
def test_registry_compute_matches_public_functions(rng, name):
    X, Y = rep(rng, n=6), rep(rng, n=6)
    metric = get(name)
    assert isinstance(metric, Metric) and metric.name == name
    assert metric.kind in ("distance", "similarity")
    json.dumps({"description": metric.description, "eq": metric.equal_width_only})
    prep = metric.preprocessing(center=True, normalize="zscore")
    assert set(prep) == {"center", "normalize"}
    out = metric.compute(prepare(X, **prep), prepare(Y, **prep), device="cpu")
    assert isinstance(out, PairValue)
    json.dumps({"v": out.value, "s": out.solver, "c": out.certificate})
    public = {
        "soft_matching": lambda: smd_dist.soft_matching_distance(X, Y, normalize="zscore"),
        "soft_matching_score": lambda: smd_dist.soft_matching_score(X, Y),
        "permutation": lambda: smd_dist.permutation_distance(X, Y, normalize="zscore"),
        "procrustes": lambda: smd_dist.procrustes_distance(X, Y, normalize="zscore"),
        "linear_cka": lambda: smd_dist.linear_cka(X, Y),
    }[name]()
    assert out.value == pytest.approx(public, rel=1e-12)
    if name in ("soft_matching", "soft_matching_score", "permutation"):
        assert out.solver and set(out.certificate) == {"max_violation", "gap", "tolerance"}
    else:
        assert out.solver == "" and out.certificate == {}


def test_fixed_preprocessing():
    assert get("soft_matching_score").preprocessing(center=False, normalize=None) == {
        "center": True,
        "normalize": "unit",
    }
    assert get("linear_cka").preprocessing(normalize="zscore") == {
        "center": True,
        "normalize": None,
    }
    assert get("soft_matching").preprocessing(center=False) == {
        "center": False,
        "normalize": None,
    }
    assert get("permutation").equal_width_only and not get("soft_matching").equal_width_only
