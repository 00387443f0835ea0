"""Exact partial transport: cross-checks against independent solvers and the certificate."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest
from scipy.optimize import linear_sum_assignment, linprog

from smd_dist.kernel.certificate import SolverError, tolerance_from_norms
from smd_dist.kernel.partial import SOLVER, certify_partial, check_mass, solve_partial
from smd_dist.kernel.preparation import preprocess
from smd_dist.kernel.transport import solve


def unit(rng, m, n):
    return preprocess(rng.standard_normal((m, n)), center=True, normalize="unit")


def costs(X, Y):
    return ((X[:, :, None] - Y[:, None, :]) ** 2).sum(axis=0)


def linprog_partial(D, m):
    """The partial problem as a plain LP, solved by HiGHS."""
    nx, ny = D.shape
    rows = np.kron(np.eye(nx), np.ones(ny))
    cols = np.kron(np.ones(nx), np.eye(ny))
    res = linprog(
        D.ravel(),
        A_ub=np.vstack([rows, cols]),
        b_ub=np.r_[np.full(nx, 1 / nx), np.full(ny, 1 / ny)],
        A_eq=np.ones((1, nx * ny)),
        b_eq=[m],
        method="highs",
    )
    assert res.status == 0, res.message
    return res.fun


def feasible(tr, m):
    nx, ny = tr.shape
    P = tr.plan().toarray()
    assert P.min() >= 0
    assert (P.sum(axis=1) <= 1 / nx * (1 + 1e-9)).all()
    assert (P.sum(axis=0) <= 1 / ny * (1 + 1e-9)).all()
    assert P.sum() == pytest.approx(m, rel=1e-12)
    assert (tr.u <= 0).all() and (tr.v <= 0).all()


@pytest.mark.parametrize("seed", range(40))
def test_matches_linprog_on_small_problems(seed):
    rng = np.random.default_rng(seed)
    nx, ny = (int(n) for n in rng.integers(1, 8, size=2))
    m = float(rng.choice([0.05, 0.3, 0.5, 0.9, 1.0, rng.uniform(0.01, 1.0)]))
    X, Y = unit(rng, 9, nx), unit(rng, 9, ny)
    tr = solve_partial(X, Y, mass=m)
    assert tr.cost == pytest.approx(linprog_partial(costs(X, Y), m), abs=1e-12)
    assert tr.solver == SOLVER and tr.certificate.passed and tr.transported == m
    feasible(tr, m)


@pytest.mark.parametrize("n, k", [(3, 1), (3, 2), (4, 1), (4, 3), (5, 2), (5, 3), (5, 4)])
def test_matches_brute_force_partial_matchings(n, k):
    # Equal widths and m = k/n: the polytope is integral (a flow polytope), so the optimum
    # is a matching of k pairs, each carrying 1/n.
    rng = np.random.default_rng(100 * n + k)
    X, Y = unit(rng, 7, n), unit(rng, 7, n)
    D = costs(X, Y)
    best = min(
        sum(D[i, j] for i, j in zip(rows, cols, strict=True))
        for rows in itertools.combinations(range(n), k)
        for cols in itertools.permutations(range(n), k)
    )
    assert solve_partial(X, Y, mass=k / n).cost == pytest.approx(best / n, abs=1e-12)


@pytest.mark.parametrize("shape", [(40, 60), (75, 30), (120, 120)])
@pytest.mark.parametrize("m", [0.2, 0.75])
def test_matches_pot_partial_wasserstein(shape, m):
    rng = np.random.default_rng(shape[0] + shape[1])
    Z = rng.standard_normal((50, 5))
    X = preprocess(Z @ rng.standard_normal((5, shape[0])) + rng.standard_normal((50, shape[0])),
                   center=True, normalize="unit")
    Y = preprocess(Z @ rng.standard_normal((5, shape[1])) + rng.standard_normal((50, shape[1])),
                   center=True, normalize="unit")
    a, b = np.full(shape[0], 1 / shape[0]), np.full(shape[1], 1 / shape[1])
    ref = ot.partial.partial_wasserstein2(a, b, costs(X, Y), m=m, numItermax=10**9)
    tr = solve_partial(X, Y, mass=m)
    assert tr.cost == pytest.approx(ref, abs=1e-12)
    feasible(tr, m)


@pytest.mark.parametrize("widths", [(6, 6), (5, 8), (1, 4)])
def test_full_mass_is_the_balanced_problem(rng, widths):
    X, Y = unit(rng, 12, widths[0]), unit(rng, 12, widths[1])
    assert solve_partial(X, Y, mass=1.0).cost == pytest.approx(solve(X, Y).cost, abs=1e-13)


@pytest.mark.parametrize("m", [1e-3, 1e-9, 1e-12])
def test_tiny_mass_goes_to_the_cheapest_pair(rng, m):
    # m below every capacity: all of it moves along the cheapest entry.
    X, Y = unit(rng, 20, 30), unit(rng, 20, 17)
    tr = solve_partial(X, Y, mass=m)
    assert tr.cost == pytest.approx(m * costs(X, Y).min(), rel=1e-9)
    assert tr.mass.sum() == pytest.approx(m, abs=1e-15)


def test_identical_neurons_plan_in_callers_order(rng):
    base = unit(rng, 10, 4)
    X = base[:, [0, 1, 0, 2, 3, 3]]  # copies: the prepared rep reorders its columns
    Y = unit(rng, 10, 5)
    tr = solve_partial(X, Y, mass=0.6)
    feasible(tr, 0.6)
    P = tr.plan().toarray()
    assert (P * costs(X, Y)).sum() == pytest.approx(tr.cost, abs=1e-13)
    assert tr.cost == pytest.approx(linprog_partial(costs(X, Y), 0.6), abs=1e-12)


def test_unmatched_neurons_are_the_outliers(rng):
    # Y holds X's 9 tuning curves permuted plus one unrelated neuron, and X one of its own:
    # moving 0.9 of the mass needs only the perfect matches.
    shared = unit(rng, 30, 9)
    X = np.hstack([shared, unit(rng, 30, 1)])
    Y = np.hstack([unit(rng, 30, 1), shared[:, rng.permutation(9)]])
    tr = solve_partial(X, Y, mass=0.9)
    assert tr.cost == pytest.approx(0.0, abs=1e-12)
    P = tr.plan().toarray()
    assert P[9].sum() < 1e-15 and P[:, 0].sum() < 1e-15  # rounding of the flows only


def test_certificate_rejects_a_suboptimal_plan(rng):
    X, Y = unit(rng, 10, 5), unit(rng, 10, 5)
    D = costs(X, Y)
    tr = solve_partial(X, Y, mass=0.6)
    tol = tolerance_from_norms(np.ones(5), np.ones(5))
    # A feasible plan of three matched pairs, the costliest there are: the duals of the
    # optimum cannot vouch for it.
    rows, cols = linear_sum_assignment(-D)
    rows, cols = rows[:3], cols[:3]
    flow = np.full(3, 0.2)
    *_, cert = certify_partial(D, rows, cols, flow, tr.u, tr.v, tr.w, m=0.6, tol=tol)
    assert not cert.passed and cert.gap > 1e-3
    with pytest.raises(SolverError, match="certificate failed"):
        cert.raise_if_failed()


def test_certificate_rejects_an_infeasible_plan(rng):
    X, Y = unit(rng, 10, 4), unit(rng, 10, 4)
    D = costs(X, Y)
    tr = solve_partial(X, Y, mass=0.5)
    with pytest.raises(SolverError, match="moves"):  # wrong total
        certify_partial(D, tr.rows, tr.cols, tr.mass * 1.1, tr.u, tr.v, tr.w, m=0.5, tol=1e-11)
    with pytest.raises(SolverError, match="capacities"):  # a row over 1/Nx
        certify_partial(D, np.zeros(2, int), np.array([0, 1]), np.full(2, 0.25), tr.u, tr.v,
                        tr.w, m=0.5, tol=1e-11)


def test_dual_bound_holds_for_random_feasible_plans(rng):
    # Weak duality as the certificate states it: every feasible plan costs at least the dual.
    X, Y = unit(rng, 10, 6), unit(rng, 10, 7)
    D = costs(X, Y)
    tr = solve_partial(X, Y, mass=0.7)
    dual = math.fsum(np.full(6, 1 / 6) * tr.u) + math.fsum(np.full(7, 1 / 7) * tr.v) + 0.7 * tr.w
    for _ in range(50):
        P = rng.random((6, 7))
        P *= min(1 / 6 / P.sum(axis=1).max(), 1 / 7 / P.sum(axis=0).max())
        P *= 0.7 / P.sum() if P.sum() >= 0.7 else 1
        if P.sum() < 0.7 * (1 - 1e-12):
            continue
        assert (P * D).sum() >= dual - 1e-12
    assert tr.cost == pytest.approx(dual, abs=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"),
                                 True, "0.5", None])
def test_mass_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="mass"):
        check_mass(bad)
    with pytest.raises(ValueError, match="mass"):
        solve_partial(np.full((3, 2), np.nan), np.zeros((3, 2)), mass=bad)
