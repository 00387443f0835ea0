"""The dense solvers: method choice, assignment duals, the iteration cap, dual repair."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
from test_transport import make

from smd_dist.kernel import dense
from smd_dist.kernel.certificate import SolverError, certify, tolerance
from smd_dist.kernel.preparation import squared_distances
from smd_dist.kernel.transport import solve


def test_choice_is_structural(monkeypatch):
    monkeypatch.setattr(dense, "ASSIGNMENT_MIN_ENTRIES", 0)
    X, Y = make("latent", 50, 60, 60, 0)
    assert dense.choose_method(squared_distances(X, Y)) == "assignment"
    X, Y = make("redundant", 50, 60, 60, 0)
    assert dense.choose_method(squared_distances(X, Y)) == "network-simplex"
    X, Y = make("latent", 50, 30, 45, 0)
    assert dense.choose_method(squared_distances(X, Y)) == "network-simplex"


def test_small_square_pairs_go_straight_to_the_network_simplex():
    """Below ASSIGNMENT_MIN_ENTRIES the assignment's duals cost more than the simplex."""
    X, Y = make("latent", 50, 60, 60, 0)
    D = squared_distances(X, Y)
    assert D.size < dense.ASSIGNMENT_MIN_ENTRIES
    assert dense.choose_method(D) == "network-simplex"
    tr = solve(X, Y)
    assert tr.solver == "network-simplex" and tr.certificate.passed
    assert math.isclose(tr.cost, solve(X, Y, method="assignment").cost, rel_tol=1e-12)


def test_suboptimal_permutation_has_no_duals():
    X, Y = make("latent", 20, 25, 25, 2)
    D = squared_distances(X, Y)
    sigma = dense.solve_assignment(D, tol=1e-12)[0].copy()
    sigma[[0, 1]] = sigma[[1, 0]]
    if D[0, sigma[0]] + D[1, sigma[1]] > D[0, sigma[1]] + D[1, sigma[0]] + 1e-6:
        with pytest.raises(SolverError):
            dense._assignment_duals(D, sigma, tol=1e-12)


def test_iteration_cap_is_an_error(monkeypatch):
    X, Y = make("latent", 20, 40, 40, 2)
    monkeypatch.setattr(dense, "NETWORK_SIMPLEX_MAX_ITER", 3)
    with pytest.raises(SolverError, match="network simplex did not reach optimality"):
        solve(X, Y, method="network-simplex")


def test_fast_path_failure_falls_back(monkeypatch):
    X, Y = make("latent", 20, 30, 30, 2)
    monkeypatch.setattr(dense, "ASSIGNMENT_MIN_ENTRIES", 0)

    def broken(D, *, tol):
        raise SolverError("simulated")

    monkeypatch.setitem(dense.METHODS, "assignment", broken)
    tr = solve(X, Y)
    assert tr.solver == "network-simplex" and tr.certificate.passed


def test_nan_duals_never_certify():
    X, Y = make("latent", 20, 25, 25, 2)
    tr = solve(X, Y)
    D = squared_distances(X, Y)
    u = tr.u.copy()
    u[4] = np.nan
    cert = certify(D, tr.rows, tr.cols, tr.mass, u, tr.v, math.nan, tol=1.0)
    assert not cert.passed
    new, low = dense._violations(D, u, tr.v, thr=1e-9, k=4)
    assert math.isnan(low)


def test_drifted_duals_are_repaired_by_the_c_transform():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((30, 9)), rng.standard_normal((30, 13))
    D = squared_distances(X, Y)
    tol = tolerance(X, Y)
    rows, cols, mass, u, v = dense._network_simplex(D, tol=tol)
    drifted = u.copy()
    drifted[:3] += 50 * tol  # what pivots' rounding does, exaggerated
    assert not certify(D, rows, cols, mass, drifted, v, tol=tol).passed
    repaired = dense._c_transform(D, (rows, cols, mass, drifted, v))
    cert = certify(D, *repaired, tol=tol)
    assert cert.passed and cert.max_violation <= 1e-12
    exact = ot.emd2(np.full(9, 1 / 9), np.full(13, 1 / 13), D, numItermax=10**9)
    assert cert.dual <= exact + 1e-12 <= cert.primal + 2e-12


def test_c_transform_cannot_rescue_a_suboptimal_plan():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    D = squared_distances(X, Y)
    tol = tolerance(X, Y)
    rows, cols, mass, u, v = dense._network_simplex(D, tol=tol)
    worst = np.argsort(-D, axis=1)[:, 0]
    if len(set(worst)) < 8:
        worst = np.roll(cols, 1)
    bad = (np.arange(8), worst, np.full(8, 1 / 8), u, v)
    assert not certify(D, *dense._c_transform(D, bad), tol=tol).passed
