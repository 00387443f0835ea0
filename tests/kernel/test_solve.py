"""Every exact method against an independent network simplex, brute force and the certificate."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest

from smd_dist import solvers
from smd_dist.prepare import squared_distances
from smd_dist.solvers import SolverError, certify, solve


def make(kind, m, nx, ny, seed):
    """Small (stimuli, neurons) pairs covering the structures that trouble solvers."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        X, Y = rng.standard_normal((m, nx)), rng.standard_normal((m, ny))
    elif kind == "latent":
        Z = rng.standard_normal((m, 4))
        X = Z @ rng.standard_normal((4, nx)) + 0.3 * rng.standard_normal((m, nx))
        Y = Z @ rng.standard_normal((4, ny)) + 0.3 * rng.standard_normal((m, ny))
    elif kind == "copy":
        X = rng.standard_normal((m, nx))
        idx = rng.permutation(nx) if nx == ny else rng.integers(0, nx, ny)
        Y = X[:, idx] + 0.05 * rng.standard_normal((m, ny))
    elif kind == "redundant":  # near-duplicate columns and dead units: near and exact ties
        base = rng.standard_normal((m, max(2, max(nx, ny) // 4)))
        X = base[:, rng.integers(0, base.shape[1], nx)] + 1e-3 * rng.standard_normal((m, nx))
        Y = base[:, rng.integers(0, base.shape[1], ny)] + 1e-3 * rng.standard_normal((m, ny))
        X[:, rng.random(nx) < 0.2] = 0.0
        Y[:, rng.random(ny) < 0.2] = 0.0
    elif kind == "ties":  # integer data, exact duplicates: massive exact ties
        X = rng.integers(0, 2, (m, nx)).astype(float)
        Y = rng.integers(0, 2, (m, ny)).astype(float)
    else:
        raise ValueError(kind)
    return X - X.mean(0), Y - Y.mean(0)


def reference(X, Y):
    D = squared_distances(X, Y)
    return ot.emd2(
        np.full(X.shape[1], 1 / X.shape[1]),
        np.full(Y.shape[1], 1 / Y.shape[1]),
        D,
        numItermax=10**9,
    )


KINDS = ["random", "latent", "copy", "redundant", "ties"]
EQUAL = [(1, 1), (2, 2), (7, 7), (40, 40), (120, 120)]
MULTIPLE = [(1, 5), (10, 30), (40, 80), (64, 32)]
LCM = [(6, 9), (20, 30), (45, 30)]
GENERAL = [(7, 11), (31, 50), (97, 13)]


def _check_against_reference(X, Y, method):
    tr = solve(X, Y, method=method)
    ref = reference(X, Y)
    scale = np.einsum("ij,ij->j", X, X).max() + np.einsum("ij,ij->j", Y, Y).max()
    assert abs(tr.cost - ref) <= 1e-10 * scale
    cert = tr.certificate
    assert cert.passed and cert.max_violation <= cert.tolerance and abs(cert.gap) <= cert.tolerance
    P = tr.plan().toarray()
    np.testing.assert_allclose(P.sum(1), 1 / X.shape[1], rtol=1e-9)
    np.testing.assert_allclose(P.sum(0), 1 / Y.shape[1], rtol=1e-9)
    return tr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EQUAL + MULTIPLE + LCM + GENERAL)
def test_auto_matches_network_simplex(kind, shape):
    X, Y = make(kind, 12, *shape, seed=hash((kind, shape)) % 1000)
    _check_against_reference(X, Y, "auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EQUAL)
@pytest.mark.parametrize("method", ["assignment"])
def test_assignment_paths(kind, shape, method):
    X, Y = make(kind, 10, *shape, seed=3)
    tr = _check_against_reference(X, Y, method)
    assert tr.solver == method
    assert np.all(tr.mass == 1 / shape[0]) and len(set(tr.cols.tolist())) == shape[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EQUAL[1:] + MULTIPLE + LCM)
def test_replicated_assignment(kind, shape):
    X, Y = make(kind, 10, *shape, seed=4)
    assert _check_against_reference(X, Y, "replicated-assignment").solver == (
        "replicated-assignment"
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EQUAL[1:] + MULTIPLE + LCM + GENERAL)
@pytest.mark.parametrize("method", ["network-simplex"])
def test_simplex_paths(kind, shape, method):
    X, Y = make(kind, 10, *shape, seed=5)
    _check_against_reference(X, Y, method)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_brute_force_over_permutations(seed, n):
    X, Y = make("random" if seed % 2 else "ties", 4, n, n, seed)
    D = squared_distances(X, Y)
    best = min(sum(D[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))) / n
    for method in ("auto", "assignment", "replicated-assignment", "network-simplex"):
        assert solve(X, Y, method=method).cost == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_choice_is_structural():
    X, Y = make("latent", 50, 60, 60, 0)
    assert solvers.choose_method(squared_distances(X, Y)) == "assignment"
    X, Y = make("redundant", 50, 60, 60, 0)
    assert solvers.choose_method(squared_distances(X, Y)) == "network-simplex"
    X, Y = make("latent", 50, 30, 45, 0)
    assert solvers.choose_method(squared_distances(X, Y)) == "network-simplex"


def test_deterministic_bit_identical():
    for kind in ("latent", "redundant", "ties"):
        for shape in ((50, 50), (30, 45)):
            X, Y = make(kind, 20, *shape, seed=1)
            a, b = solve(X, Y), solve(X.copy(), Y.copy())
            assert a.cost == b.cost and a.solver == b.solver
            for f in ("rows", "cols", "mass", "u", "v"):
                assert np.array_equal(getattr(a, f), getattr(b, f))


def test_certificate_fields_and_dict():
    X, Y = make("latent", 20, 30, 45, 2)
    cert = solve(X, Y).certificate
    d = cert.as_dict()
    assert set(d) == {"max_violation", "gap", "tolerance"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in d.values())
    assert cert.passed and cert.tolerance > 0 and cert.bound <= cert.tolerance


def test_wrong_duals_fail_the_certificate():
    X, Y = make("latent", 20, 25, 25, 2)
    tr = solve(X, Y)
    D = squared_distances(X, Y)
    args = (D, tr.rows, tr.cols, tr.mass)
    tol = tr.certificate.tolerance
    assert certify(*args, tr.u, tr.v, tol=tol).passed
    u = tr.u.copy()
    u[3] += 1e3 * tol  # infeasible: some reduced costs go negative
    bad = certify(*args, u, tr.v, tol=tol)
    assert not bad.passed and bad.max_violation > tol
    low = certify(*args, tr.u - 1e3 * tol, tr.v, tol=tol)  # feasible but not tight: a gap
    assert not low.passed and low.gap > tol


def test_wrong_plan_fails_the_certificate():
    X, Y = make("latent", 20, 25, 25, 2)
    tr = solve(X, Y)
    D = squared_distances(X, Y)
    cols = tr.cols.copy()
    cols[[0, 1]] = cols[[1, 0]]  # swap two matches: still a permutation, not optimal
    cert = certify(D, tr.rows, cols, tr.mass, tr.u, tr.v, tol=tr.certificate.tolerance)
    assert not cert.passed and cert.gap > cert.tolerance
    with pytest.raises(SolverError, match="marginals"):
        certify(D, tr.rows, cols, tr.mass * 2, tr.u, tr.v, tol=1.0)


def test_suboptimal_permutation_has_no_duals():
    X, Y = make("latent", 20, 25, 25, 2)
    D = squared_distances(X, Y)
    sigma = solvers.solve_assignment(D, tol=1e-12)[0].copy()
    sigma[[0, 1]] = sigma[[1, 0]]
    if D[0, sigma[0]] + D[1, sigma[1]] > D[0, sigma[1]] + D[1, sigma[0]] + 1e-6:
        with pytest.raises(SolverError):
            solvers._assignment_duals(D, sigma, tol=1e-12)


def test_iteration_cap_is_an_error(monkeypatch):
    X, Y = make("latent", 20, 40, 40, 2)
    monkeypatch.setattr(solvers, "NETWORK_SIMPLEX_MAX_ITER", 3)
    with pytest.raises(SolverError, match="network simplex did not reach optimality"):
        solve(X, Y, method="network-simplex")


def test_nan_costs_never_pass():
    X, Y = make("random", 10, 6, 6, 2)
    D = squared_distances(X, Y)
    D[2, 3] = np.nan
    for method in ("auto", "network-simplex"):
        with pytest.raises((SolverError, ValueError)):
            solve(X, Y, D=D, method=method)


def test_unknown_or_inapplicable_method():
    X, Y = make("random", 10, 6, 7, 2)
    with pytest.raises(ValueError, match="unknown method"):
        solve(X, Y, method="hungarian")
    with pytest.raises(ValueError, match="equal widths"):
        solve(X, Y, method="assignment")


def test_fast_path_failure_falls_back(monkeypatch):
    X, Y = make("latent", 20, 30, 30, 2)

    def broken(D, *, tol):
        raise SolverError("simulated")

    monkeypatch.setitem(solvers._METHODS, "assignment", broken)
    tr = solve(X, Y)
    assert tr.solver == "network-simplex" and tr.certificate.passed


def test_all_zero_inputs():
    X = np.zeros((5, 4))
    tr = solve(X, np.zeros((5, 6)))
    assert tr.cost == 0.0 and tr.certificate.passed


def test_identical_columns_are_merged_exactly():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((15, 12))
    X[:, [2, 5, 9]] = 0.0  # dead units
    X[:, 7] = X[:, 1]  # an exact copy
    Y = rng.standard_normal((15, 18))
    Y[:, [0, 4]] = 0.0
    Y[:, 10] = Y[:, 3]
    tr = solve(X, Y)
    assert tr.solver.startswith("merged-")
    assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12, abs=1e-12)
    P = tr.plan().toarray()
    np.testing.assert_allclose(P.sum(1), 1 / 12, rtol=1e-12)
    np.testing.assert_allclose(P.sum(0), 1 / 18, rtol=1e-12)
    assert tr.cost == pytest.approx(solvers.plan_cost(X, Y, tr.rows, tr.cols, tr.mass), rel=1e-13)
    D = squared_distances(X, Y)
    full = certify(D, tr.rows, tr.cols, tr.mass, tr.u, tr.v, tol=tr.certificate.tolerance)
    assert full.passed  # the merged duals certify the original problem too
    # copies of one neuron share their mass evenly
    np.testing.assert_allclose(P[2], P[5])
    np.testing.assert_allclose(P[1], P[7])


def test_dead_units_merged_after_centring():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((30, 40))
    X[:, ::5] = 3.0  # constant neurons become dead (all-zero) after centring
    X -= X.mean(0)
    reps, group, counts = solvers._unique_columns(X)
    assert counts.max() == 8 and reps.size == 33
    assert np.array_equal(X[:, reps][:, group], X)


def test_unique_columns_groups_by_first_occurrence():
    X = np.array([[1.0, 0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 3.0, 1.0, 0.0]])
    reps, group, counts = solvers._unique_columns(X)
    assert reps.tolist() == [0, 1, 3]
    assert group.tolist() == [0, 1, 0, 2, 1]
    assert counts.tolist() == [2, 2, 1]


def test_representatives_first_puts_one_of_each_group_first_in_place():
    rng = np.random.default_rng(11)
    X = np.asfortranarray(rng.standard_normal((20, 12)))
    X[:, [2, 9]] = X[:, [7]]  # a group of three
    X[:, [0, 4, 10]] = 0.0  # dead units
    before = sorted(map(bytes, np.ascontiguousarray(X.T)))
    original = X.copy()
    out = solvers.representatives_first(X)
    assert out is X
    assert sorted(map(bytes, np.ascontiguousarray(X.T))) == before  # same neurons
    keep, group, counts = solvers._unique_columns(X)
    assert keep.tolist() == list(range(8))  # the merged problem is a prefix
    assert sorted(counts.tolist()) == [1] * 6 + [3, 3]
    # representatives keep their relative order
    firsts = solvers._unique_columns(original)[0]
    assert np.array_equal(X[:, :8], original[:, firsts])


def test_representatives_first_without_copies_changes_nothing():
    X = np.asfortranarray(np.random.default_rng(12).standard_normal((15, 6)))
    same = X.copy()
    assert solvers.representatives_first(X) is X
    assert np.array_equal(X, same)


def test_merged_problem_of_a_reordered_rep_is_a_view_with_the_same_optimum():
    X, Y = make("redundant", 60, 48, 40, 13)
    X = np.asfortranarray(X)
    X[:, 1::7] = 0.0
    reference = ot.emd2(
        np.full(48, 1 / 48), np.full(40, 1 / 40), squared_distances(X, Y), numItermax=10**9
    )
    Xr = solvers.representatives_first(X.copy(order="F"))
    Xr.flags.writeable = False
    keep = solvers._unique_columns(Xr)[0]
    merged = solvers._merged_columns(Xr, keep)
    assert merged.shape[1] == keep.size < 48 and np.shares_memory(merged, Xr)
    assert solvers._merged_columns(Xr, keep) is merged  # kept with the rep
    low = solvers._merged_low_precision(Xr, (Xr * Xr).sum(0), keep, solvers.resolve_device("cpu"))
    assert low.low.shape[0] == keep.size
    tr = solve(Xr, Y, device="cpu")
    assert tr.solver.startswith("merged-")
    assert math.isclose(tr.cost, reference, rel_tol=1e-12)


def test_replication_refuses_huge_lcm():
    X, Y = make("random", 10, 7, 11, 1)
    with pytest.raises(SolverError, match="too large"):
        solve(X, Y, method="replicated-assignment")


def test_nan_duals_never_certify():
    X, Y = make("latent", 20, 25, 25, 2)
    tr = solve(X, Y)
    D = squared_distances(X, Y)
    u = tr.u.copy()
    u[4] = np.nan
    cert = certify(D, tr.rows, tr.cols, tr.mass, u, tr.v, math.nan, tol=1.0)
    assert not cert.passed
    new, low = solvers._violations(D, u, tr.v, thr=1e-9, k=4)
    assert math.isnan(low)


def test_drifted_duals_are_repaired_by_the_c_transform():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((30, 9)), rng.standard_normal((30, 13))
    D = squared_distances(X, Y)
    tol = solvers.tolerance(X, Y)
    rows, cols, mass, u, v = solvers._network_simplex(D, tol=tol)
    drifted = u.copy()
    drifted[:3] += 50 * tol  # what pivots' rounding does, exaggerated
    assert not certify(D, rows, cols, mass, drifted, v, tol=tol).passed
    repaired = solvers._c_transform(D, (rows, cols, mass, drifted, v))
    cert = certify(D, *repaired, tol=tol)
    assert cert.passed and cert.max_violation <= 1e-12
    exact = ot.emd2(np.full(9, 1 / 9), np.full(13, 1 / 13), D, numItermax=10**9)
    assert cert.dual <= exact + 1e-12 <= cert.primal + 2e-12


def test_c_transform_cannot_rescue_a_suboptimal_plan():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    D = squared_distances(X, Y)
    tol = solvers.tolerance(X, Y)
    rows, cols, mass, u, v = solvers._network_simplex(D, tol=tol)
    worst = np.argsort(-D, axis=1)[:, 0]
    if len(set(worst)) < 8:
        worst = np.roll(cols, 1)
    bad = (np.arange(8), worst, np.full(8, 1 / 8), u, v)
    assert not certify(D, *solvers._c_transform(D, bad), tol=tol).passed


@pytest.mark.parametrize("order", ["C", "F"])
def test_exact_costs_are_squared_differences_and_leave_inputs_alone(order):
    rng = np.random.default_rng(11)
    X = np.asarray(rng.standard_normal((3000, 9)), order=order)  # blocks of 10 entries
    Y = np.asarray(rng.standard_normal((3000, 12)) + 1e3, order=order)
    X.flags.writeable = Y.flags.writeable = False
    before = X.copy(), Y.copy()
    rows = np.repeat(np.arange(9), 40)  # 360 entries, repeated pairs among them
    cols = rng.integers(0, 12, rows.size)
    got = solvers.exact_costs(X, Y, rows, cols)
    want = [math.fsum((X[:, i] - Y[:, j]) ** 2) for i, j in zip(rows, cols, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    assert np.array_equal(X, before[0]) and np.array_equal(Y, before[1])
