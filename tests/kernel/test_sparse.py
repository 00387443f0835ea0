"""The sparse network simplex: every solve against ``ot.emd2`` with a high cap, brute force
over permutations, and its duals against the dense float64 cost matrix."""

from __future__ import annotations

import itertools

import numpy as np
import ot
import pytest
import torch
from test_transport import make, reference

from smd_dist.kernel import bounds as bounds_module
from smd_dist.kernel import sparse
from smd_dist.kernel import transport as solve_module
from smd_dist.kernel.bounds import BoundViolation, CostBounds
from smd_dist.kernel.certificate import SolverError, tolerance_from_norms
from smd_dist.kernel.preparation import preprocess, squared_distances
from smd_dist.kernel.sparse import SOLVER, SparseUnsuitable, north_west_corner, solve_sparse
from smd_dist.kernel.transport import solve


@pytest.fixture(autouse=True)
def sparse_from_256(monkeypatch):
    """These tests drive the sparse path on pairs small enough to be quick; ``solve`` sends
    pairs to it from 512² entries, so here it does from 256² (as it once did)."""
    monkeypatch.setattr(solve_module, "SPARSE_MIN_ENTRIES", 256 * 256)


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def product_dtype(request, monkeypatch):
    """Force the product precision whatever the probe would pick on this CPU."""
    monkeypatch.setitem(bounds_module._PRODUCT_DTYPE, "cpu", request.param)
    return request.param


def _scale(X, Y):
    return np.einsum("ij,ij->j", X, X).max() + np.einsum("ij,ij->j", Y, Y).max()


def _check_dense_duals(X, Y, tr):
    """The duals certify the whole dense matrix, not only the candidates."""
    D = squared_distances(X, Y)
    assert (D - tr.u[:, None] - tr.v[None, :]).min() >= -tr.certificate.tolerance


@pytest.mark.parametrize(
    ("cx", "cy"),
    [
        ([1] * 4, [1] * 6),
        ([1] * 7, [1] * 7),
        ([3, 1, 2], [1, 1, 1, 1]),
        ([5], [2, 2, 1]),
        ([1] * 40, [1] * 60),
    ],
)
def test_north_west_corner_is_a_feasible_plan(cx, cy):
    """Its support carries a plan with the right marginals: compared with the interval
    overlaps computed pair by pair in exact fractions."""
    from fractions import Fraction

    cx, cy = np.array(cx), np.array(cy)
    keys = north_west_corner(cx, cy)
    assert np.all(np.diff(keys) > 0)
    assert keys.size <= cx.size + cy.size - 1
    ex = np.r_[0, np.cumsum(cx)]
    ey = np.r_[0, np.cumsum(cy)]
    tx, ty = cx.sum(), cy.sum()
    expected = []
    mass = {}
    for i in range(cx.size):
        for j in range(cy.size):
            lo = max(Fraction(int(ex[i]), int(tx)), Fraction(int(ey[j]), int(ty)))
            hi = min(Fraction(int(ex[i + 1]), int(tx)), Fraction(int(ey[j + 1]), int(ty)))
            if hi > lo:
                expected.append(i * cy.size + j)
                mass[(i, j)] = hi - lo
    assert keys.tolist() == expected
    for i in range(cx.size):
        assert sum(m for (r, _), m in mass.items() if r == i) == Fraction(int(cx[i]), int(tx))
    for j in range(cy.size):
        assert sum(m for (_, c), m in mass.items() if c == j) == Fraction(int(cy[j]), int(ty))


SHAPES = [
    (2, 2),
    (7, 7),
    (40, 40),
    (120, 120),
    (256, 256),
    (7, 11),
    (40, 80),
    (97, 13),
    (300, 450),
    (64, 200),
]


@pytest.mark.parametrize("kind", ["random", "latent", "copy", "redundant", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_matches_network_simplex(kind, shape, product_dtype):
    nx, ny = shape
    X, Y = make(kind, 60, nx, ny, seed=nx + 3 * ny + len(kind))
    tr = solve(X, Y, method=SOLVER)
    assert tr.solver == SOLVER
    assert abs(tr.cost - reference(X, Y)) <= 1e-10 * _scale(X, Y)
    cert = tr.certificate
    assert cert.passed and cert.max_violation <= cert.tolerance
    P = tr.plan().toarray()
    np.testing.assert_allclose(P.sum(1), 1 / nx, rtol=1e-9)
    np.testing.assert_allclose(P.sum(0), 1 / ny, rtol=1e-9)
    _check_dense_duals(X, Y, tr)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_sparse_brute_force(seed, n):
    X, Y = make("random", 5, n, n, seed)
    D = squared_distances(X, Y)
    best = min(sum(D[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))) / n
    assert solve(X, Y, method=SOLVER).cost == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", [(30, 30), (24, 60), (50, 35)])
def test_sparse_with_merged_counts_matches_weighted_simplex(shape, product_dtype):
    """Non-uniform integer masses (merged copies) against ot.emd2 with the same weights."""
    nx, ny = shape
    X, Y = make("latent", 80, nx, ny, seed=nx * ny)
    rng = np.random.default_rng(nx)
    cx, cy = rng.integers(1, 5, nx), rng.integers(1, 5, ny)
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    tol = tolerance_from_norms(*norms)
    bounds = CostBounds(X, Y, norms, device=torch.device("cpu"))
    sol = solve_sparse(bounds, tol=tol, counts=(cx, cy))
    D = squared_distances(X, Y)
    ref = ot.emd2(cx / cx.sum(), cy / cy.sum(), D, numItermax=10**9)
    assert float(np.dot(sol.mass, sol.costs)) == pytest.approx(ref, rel=1e-12)
    assert (D - sol.u[:, None] - sol.v[None, :]).min() >= -tol
    np.testing.assert_allclose(np.bincount(sol.rows, sol.mass, nx), cx / cx.sum(), rtol=1e-9)


def wide_latent(n, seed, m=400, ny=None):
    """Two prepared layers reading a 16-dimensional latent: wide, and free of near ties."""
    rng = np.random.default_rng(seed)
    ny = ny or n
    Z = rng.standard_normal((m, 16))
    X = preprocess(Z @ rng.standard_normal((16, n)) + 0.3 * rng.standard_normal((m, n)))
    Y = preprocess(Z @ rng.standard_normal((16, ny)) + 0.3 * rng.standard_normal((m, ny)))
    return X, Y


@pytest.mark.parametrize("shape", [(800, 800), (300, 700)])
def test_auto_takes_the_sparse_path_on_wide_layers(shape):
    X, Y = wide_latent(shape[0], 11, ny=shape[1])
    tr = solve(X, Y)
    assert tr.solver == SOLVER
    ref = ot.emd2([], [], squared_distances(X, Y), numItermax=10**9)
    assert tr.cost == pytest.approx(ref, rel=1e-12)
    again = solve(X.copy(), Y.copy())  # bit-identical on a re-run
    assert again.cost == tr.cost and np.array_equal(again.cols, tr.cols)


def test_auto_merges_dead_units_before_the_sparse_path():
    X, Y = wide_latent(400, 3, ny=300)
    X[:, ::7] = 0.0  # dead units: exact ties, merged into one neuron per side
    Y[:, ::5] = 0.0
    tr = solve(X, Y)
    assert tr.solver == f"merged-{SOLVER}"
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    _check_dense_duals(X, Y, tr)


def test_near_duplicate_neurons_go_dense_below_the_tied_threshold():
    X, Y = make("redundant", 200, 400, 300, seed=3)  # near copies: most rows nearly tied
    tr = solve(X, Y)
    assert tr.solver == "merged-network-simplex"
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    forced = solve(X, Y, method=SOLVER)  # forced, the sparse path still solves it
    assert forced.cost == pytest.approx(tr.cost, rel=1e-12)


@pytest.mark.parametrize("error", [BoundViolation, SparseUnsuitable])
def test_sparse_failure_falls_back_to_dense(monkeypatch, error):
    X, Y = wide_latent(400, 6)

    def broken(bounds, **options):
        raise error("simulated")

    monkeypatch.setattr(solve_module, "solve_sparse", broken)
    tr = solve(X, Y)
    assert tr.solver in ("assignment", "network-simplex") and tr.certificate.passed
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    with pytest.raises(SolverError, match="simulated"):
        solve(X, Y, method=SOLVER)


def test_too_many_undecided_entries_refuse_the_sparse_path(monkeypatch):
    X, Y = wide_latent(300, 4)
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    bounds = CostBounds(X, Y, norms, device=torch.device("cpu"))
    with pytest.raises(SparseUnsuitable, match="entries"):
        solve_sparse(bounds, tol=tolerance_from_norms(*norms), max_exact_fraction=1e-3)
    monkeypatch.setattr(solve_module, "MAX_EXACT_FRACTION", 1e-3)
    tr = solve(X, Y)
    assert tr.solver != SOLVER and tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    assert solve(X, Y, method=SOLVER).solver == SOLVER  # forced: no budget


def test_rounds_are_capped(monkeypatch):
    X, Y = wide_latent(300, 5)
    monkeypatch.setattr(sparse, "MAX_ROUNDS", 0)
    with pytest.raises(SolverError, match="did not settle"):
        solve(X, Y, method=SOLVER)


def test_a_non_optimal_sparse_solve_is_refused(monkeypatch):
    X, Y = wide_latent(300, 9)
    real = sparse.emd_c_sparse

    def capped(*args):
        out = list(real(*args))
        out[-1] = 3  # MAX_ITER_REACHED
        return tuple(out)

    monkeypatch.setattr(sparse, "emd_c_sparse", capped)
    with pytest.raises(SolverError, match="not optimal"):
        solve(X, Y, method=SOLVER)


def test_out_of_range_norms_skip_the_bounds():
    X, Y = wide_latent(400, 7)
    tr = solve(1e20 * X, 1e20 * Y)  # squared norms ~1e42: no float32 bound matrix
    assert tr.solver != SOLVER and tr.certificate.passed
    with pytest.raises(SolverError, match="float32"):
        solve(1e20 * X, 1e20 * Y, method=SOLVER)


def test_sparse_refuses_a_cost_matrix():
    X, Y = make("random", 10, 6, 7, 2)
    with pytest.raises(ValueError, match="omit D"):
        solve(X, Y, method=SOLVER, D=squared_distances(X, Y))


def test_layout_does_not_change_results():
    X, Y = wide_latent(400, 8)
    a = solve(np.ascontiguousarray(X), np.ascontiguousarray(Y))
    b = solve(np.asfortranarray(X), np.asfortranarray(Y))
    assert a.cost == b.cost and np.array_equal(a.cols, b.cols)


def test_without_a_sparse_network_simplex_the_dense_path_serves(monkeypatch):
    X, Y = wide_latent(300, 12)
    monkeypatch.setattr(sparse, "emd_c_sparse", None)  # as with POT < 0.9.7
    tr = solve(X, Y)
    assert tr.solver != SOLVER and tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
    with pytest.raises(SolverError, match="POT >= 0.9.7"):
        solve(X, Y, method=SOLVER)


def test_later_rounds_start_from_the_previous_duals_and_reach_the_same_optimum(monkeypatch):
    X, Y = wide_latent(400, 3)
    real = sparse.emd_c_sparse
    calls = []

    def recording(a, b, rows, cols, costs, max_iter, *warm):
        out = real(a, b, rows, cols, costs, max_iter, *warm)
        calls.append(((a, b, rows, cols, costs), warm, out))
        return out

    monkeypatch.setattr(sparse, "emd_c_sparse", recording)
    tr = solve(X, Y, method=SOLVER)
    assert len(calls) >= 2, "this pair should need more than one round"
    assert calls[0][1] == ()
    for (_, warm, _), (_, _, before) in zip(calls[1:], calls[:-1], strict=True):
        np.testing.assert_array_equal(warm[0], before[4])
        np.testing.assert_array_equal(warm[1], before[5])
    problem, _, warm_out = calls[-1]
    cold = real(*problem, sparse.MAX_ITER)
    assert warm_out[-1] == cold[-1] == 1
    assert warm_out[3] == pytest.approx(cold[3], rel=1e-13)
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
