"""The certificate: its fields, and that wrong duals or a wrong plan fail it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_transport import make

from smd_dist.kernel.certificate import SolverError, certify, marginals, min_reduced_cost
from smd_dist.kernel.preparation import squared_distances
from smd_dist.kernel.transport import solve


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


def test_uniform_masses_are_shared_and_read_only():
    a, b = marginals((5, 7), None)
    assert marginals((7, 5), None)[0] is b  # made once per width
    assert not a.flags.writeable and np.array_equal(a, np.full(5, 0.2))


@pytest.mark.parametrize("shape", [(3, 5), (300, 200), (40, 5000)])
def test_min_reduced_cost_in_blocks_is_the_whole_matrix_minimum(shape):
    rng = np.random.default_rng(sum(shape))
    D, u, v = rng.random(shape), rng.random(shape[0]), rng.random(shape[1])
    assert min_reduced_cost(D, u, v) == float((D - u[:, None] - v[None, :]).min())
    D[shape[0] - 1, shape[1] - 1] = np.nan
    assert min_reduced_cost(D, u, v) == -math.inf
