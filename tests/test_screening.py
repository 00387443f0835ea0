"""The low-precision cost bounds and the sparse assignment they certify.

Every bound is checked against float64 costs computed independently, and every sparse
solve against ``ot.emd2`` with a high cap or brute force over permutations.
"""

from __future__ import annotations

import itertools

import numpy as np
import ot
import pytest
import torch
from test_solvers import make, reference

from smd_dist import screening, solvers
from smd_dist.prepare import preprocess, squared_distances
from smd_dist.screening import BoundViolation, CostBounds
from smd_dist.solvers import SolverError, solve

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(params=DTYPES, ids=["bfloat16", "float32"])
def product_dtype(request, monkeypatch):
    """Force the product precision whatever the probe would pick on this CPU."""
    monkeypatch.setitem(screening._PRODUCT_DTYPE, "cpu", request.param)
    return request.param


def _bounds(X, Y):
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    return CostBounds(X, Y, norms, device=torch.device("cpu")), norms


def _relu_sparse(rng, m, n):
    A = rng.standard_normal((m, n)) @ rng.standard_normal((n, n)) * 0.1
    return np.maximum(A - 1.0, 0.0)  # mostly zero, heavy tailed: like late ReLU layers


CASES = {
    "gaussian": lambda rng: (rng.standard_normal((300, 40)), rng.standard_normal((300, 50))),
    "huge": lambda rng: (
        1e12 * rng.standard_normal((50, 30)),
        1e12 * rng.standard_normal((50, 30)),
    ),
    "tiny": lambda rng: (
        1e-12 * rng.standard_normal((50, 30)),
        3e-13 * rng.standard_normal((50, 20)),
    ),
    "mixed_scales": lambda rng: (
        rng.standard_normal((80, 30)) * np.logspace(-6, 6, 30),
        rng.standard_normal((80, 25)) * np.logspace(6, -6, 25),
    ),
    "integers": lambda rng: (
        rng.integers(-3, 4, (200, 30)).astype(float),
        rng.integers(-3, 4, (200, 30)).astype(float),
    ),
    "relu": lambda rng: (_relu_sparse(rng, 400, 30), _relu_sparse(rng, 400, 30)),
    "near_copies": lambda rng: (
        (A := rng.standard_normal((500, 30))),
        A[:, ::-1] + 1e-9 * rng.standard_normal((500, 30)),
    ),
    "long_curves": lambda rng: (rng.standard_normal((6000, 12)), rng.standard_normal((6000, 9))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lower_bounds_hold_and_are_tight(case, product_dtype):
    X, Y = CASES[case](np.random.default_rng(len(case)))
    b, norms = _bounds(X, Y)
    D = squared_distances(X, Y)
    low = b.lower.double().numpy()
    scale = norms[0].max() + norms[1].max()
    assert np.all(low <= D), f"bound above the exact cost by {(low - D).max():.3g}"
    # Not vacuous: within the product's precision of the truth (so this test can fail). In
    # float32 the worst-case accumulation term 2·M·2⁻²⁴·|x||y| dominates.
    width = 0.05 if product_dtype == torch.bfloat16 else 4 * X.shape[0] * 2.0**-24 + 1e-5
    assert np.all(D - low <= width * scale)


def test_exact_costs_match_float64(product_dtype):
    X, Y = make("latent", 60, 30, 40, 1)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    keys = np.sort(np.random.default_rng(0).choice(30 * 40, 300, replace=False)).astype(np.int64)
    got = b.exact(keys)
    np.testing.assert_allclose(got, D.ravel()[keys], rtol=0, atol=1e-12 * D.max())


def test_exact_refuses_a_broken_bound():
    X, Y = make("latent", 60, 30, 30, 2)
    b, _ = _bounds(X, Y)
    b.lower[3, 4] += 1e3 * float(b.lower.abs().max())  # as if the product's error were larger
    with pytest.raises(BoundViolation, match="lower bound"):
        b.exact(np.array([3 * 30 + 4], dtype=np.int64))


def test_below_flags_every_entry_it_cannot_prove(product_dtype):
    rng = np.random.default_rng(5)
    X, Y = make("latent", 80, 50, 50, 3)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    for _ in range(5):
        u = D.min(axis=1) - rng.random(50) * D.std()
        v = (D - u[:, None]).min(axis=0) - rng.random(50) * D.std() * 0.01
        flagged = np.zeros(D.size, bool)
        flagged[b.below(u, v)] = True
        reduced = (D - u[:, None] - v[None, :]).ravel()
        assert np.all(reduced[~flagged] >= 0)
        assert flagged.sum() < D.size  # the bound proves something


def test_candidates_cover_every_row_and_column():
    X, Y = make("latent", 80, 64, 64, 4)
    b, _ = _bounds(X, Y)
    keys = b.candidates(4)
    assert np.all(np.diff(keys) > 0)
    assert set(np.unique(keys // 64)) == set(range(64))
    assert set(np.unique(keys % 64)) == set(range(64))
    assert keys.size < 64 * 64 / 4  # sparse


@pytest.mark.parametrize(
    ("kind", "n"),
    [(k, n) for k in ("random", "copy") for n in (2, 7, 40, 120, 256)]
    + [("latent", 7), ("latent", 40), ("copy", 400)],
)
def test_sparse_assignment_matches_network_simplex(kind, n, product_dtype):
    X, Y = make(kind, 60, n, n, seed=n + len(kind))
    tr = solve(X, Y, method="sparse-assignment")
    ref = reference(X, Y)
    scale = np.einsum("ij,ij->j", X, X).max() + np.einsum("ij,ij->j", Y, Y).max()
    assert tr.solver == "sparse-assignment"
    assert abs(tr.cost - ref) <= 1e-10 * scale
    cert = tr.certificate
    assert cert.passed and cert.max_violation <= cert.tolerance
    assert sorted(tr.cols.tolist()) == list(range(n))
    # The duals certify the whole dense matrix, not only the candidates.
    D = squared_distances(X, Y)
    assert (D - tr.u[:, None] - tr.v[None, :]).min() >= -cert.tolerance


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_sparse_assignment_brute_force(seed, n):
    X, Y = make("random", 5, n, n, seed)
    D = squared_distances(X, Y)
    best = min(sum(D[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))) / n
    assert solve(X, Y, method="sparse-assignment").cost == pytest.approx(
        best, rel=1e-12, abs=1e-12
    )


def wide_latent(n, seed, m=400):
    """Two prepared layers reading a 16-dimensional latent: wide, and free of near ties."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((m, 16))
    X = preprocess(Z @ rng.standard_normal((16, n)) + 0.3 * rng.standard_normal((m, n)))
    Y = preprocess(Z @ rng.standard_normal((16, n)) + 0.3 * rng.standard_normal((m, n)))
    return X, Y


def test_auto_takes_the_sparse_path_on_wide_layers():
    X, Y = wide_latent(800, 11)
    tr = solve(X, Y)
    assert tr.solver == "sparse-assignment"
    ref = ot.emd2([], [], squared_distances(X, Y), numItermax=10**9)
    assert tr.cost == pytest.approx(ref, rel=1e-12)
    again = solve(X.copy(), Y.copy())  # bit-identical on a re-run
    assert again.cost == tr.cost and np.array_equal(again.cols, tr.cols)


def test_sparse_failure_falls_back_to_dense(monkeypatch):
    X, Y = wide_latent(800, 6)

    def broken(bounds, *, tol):
        raise BoundViolation("simulated")

    monkeypatch.setattr(solvers, "_sparse_assignment", broken)
    tr = solve(X, Y)
    assert tr.solver in ("assignment", "network-simplex") and tr.certificate.passed
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    with pytest.raises(SolverError, match="simulated"):
        solve(X, Y, method="sparse-assignment")


def test_out_of_range_norms_skip_the_bounds():
    X, Y = wide_latent(800, 7)
    tr = solve(1e20 * X, 1e20 * Y)  # squared norms ~1e42: no float32 bound matrix
    assert tr.solver != "sparse-assignment" and tr.certificate.passed
    with pytest.raises(SolverError, match="float32"):
        solve(1e20 * X, 1e20 * Y, method="sparse-assignment")


@pytest.mark.parametrize("kind", ["redundant", "ties"])
def test_auto_keeps_near_ties_off_the_sparse_path(kind):
    X, Y = make(kind, 30, 800, 800, seed=9)
    with pytest.raises(SolverError, match="nearly tied"):
        solve(X, Y, method="sparse-assignment")
    tr = solve(X, Y)
    assert tr.solver != "sparse-assignment"
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12, abs=1e-12)


def test_sparse_needs_equal_widths_and_no_cost_matrix():
    X, Y = make("random", 10, 6, 7, 2)
    with pytest.raises(ValueError, match="equal widths"):
        solve(X, Y, method="sparse-assignment")
    with pytest.raises(ValueError, match="omit D"):
        solve(X, X, method="sparse-assignment", D=squared_distances(X, X))


def test_product_precision_follows_the_hardware(monkeypatch):
    assert screening.product_dtype(torch.device("cuda")) == torch.float32
    for amx, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(screening, "_PRODUCT_DTYPE", {})
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda amx=amx: {"amx_bf16": amx})
        assert screening.product_dtype(torch.device("cpu")) == expected


def test_a_product_that_breaks_the_bound_is_not_used(monkeypatch):
    """The self-test catches a library whose bfloat16 products are less accurate."""
    assert screening._bound_holds(torch.bfloat16, torch.device("cpu"))
    real = torch.Tensor.__matmul__

    def sloppy(a, b):  # as if partial sums were rounded to bfloat16 along the way
        out = real(a, b)
        return out * (1 - 2.0**-6) if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(torch.Tensor, "__matmul__", sloppy)
    assert not screening._bound_holds(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(screening, "_PRODUCT_DTYPE", {})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert screening.product_dtype(torch.device("cpu")) == torch.float32


def test_layout_does_not_change_results():
    X, Y = wide_latent(800, 8)
    a = solve(np.ascontiguousarray(X), np.ascontiguousarray(Y))
    b = solve(np.asfortranarray(X), np.asfortranarray(Y))
    assert a.cost == b.cost and np.array_equal(a.cols, b.cols)
