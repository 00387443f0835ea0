"""The certified Sinkhorn interval: never a bound that is not one, checked against exact OT."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

import smd_dist
from smd_dist.kernel import sinkhorn
from smd_dist.kernel.certificate import SolverError
from smd_dist.kernel.preparation import squared_distances
from smd_dist.kernel.prepared import prepare
from smd_dist.kernel.transport import solve

KINDS = ["random", "latent", "copy", "redundant", "ties"]
SHAPES = [(1, 4), (7, 7), (24, 24), (40, 25), (13, 64)]
SCALES = [1e-6, 1.0, 1e6]
#: Unconverged iterates too: an interval must hold whatever the budget.
BUDGETS = [1, 8, sinkhorn.MAX_ITER]


def make(kind, m, nx, ny, seed):
    """(stimuli, neurons) pairs: no structure, shared latent, near copies, redundant
    neurons with dead units (exact and near ties), binary data (massive exact ties)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((m, nx)), rng.standard_normal((m, ny))
    if kind == "latent":
        Z = rng.standard_normal((m, 4))
        X = Z @ rng.standard_normal((4, nx)) + 0.3 * rng.standard_normal((m, nx))
        return X, Z @ rng.standard_normal((4, ny)) + 0.3 * rng.standard_normal((m, ny))
    if kind == "copy":
        X = rng.standard_normal((m, nx))
        idx = rng.permutation(nx) if nx == ny else rng.integers(0, nx, ny)
        return X, X[:, idx] + 1e-3 * rng.standard_normal((m, ny))
    if kind == "redundant":
        base = rng.standard_normal((m, max(2, max(nx, ny) // 4)))
        X = base[:, rng.integers(0, base.shape[1], nx)] + 1e-4 * rng.standard_normal((m, nx))
        Y = base[:, rng.integers(0, base.shape[1], ny)] + 1e-4 * rng.standard_normal((m, ny))
        X[:, rng.random(nx) < 0.25] = 0.0
        Y[:, rng.random(ny) < 0.25] = 0.0
        return X, Y
    if kind == "ties":
        return rng.integers(0, 2, (m, nx)).astype(float), rng.integers(0, 2, (m, ny)) * 1.0
    raise ValueError(kind)


def exact_costs(x, y):
    """The exact optimum twice over: POT's network simplex on the float64 costs (uniform
    masses, no merging), and the package's certified kernel.

    POT's pivoting thresholds are absolute, so it gets the costs scaled by a power of two
    (exact) to a largest entry near one.
    """
    D = squared_distances(x.columns, y.columns)
    nx, ny = D.shape
    unit = 2.0 ** math.frexp(max(float(D.max()), 1e-300))[1]
    ref = unit * ot.emd2(np.full(nx, 1 / nx), np.full(ny, 1 / ny), D / unit, numItermax=10**9)
    return ref, solve(x, y).cost


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_interval_holds_the_exact_cost(kind, shape, scale):
    X, Y = make(kind, 16, *shape, seed=100 * KINDS.index(kind) + SHAPES.index(shape))
    x, y = prepare(X * scale), prepare(Y * scale)
    ref, kernel = exact_costs(x, y)
    for budget in BUDGETS:
        iv = sinkhorn.sinkhorn_interval(x, y, rtol=1e-3, device="cpu", max_iter=budget)
        assert iv.lower <= ref <= iv.upper, (budget, iv, ref)
        assert iv.lower <= kernel <= iv.upper, (budget, iv, kernel)
        assert iv.iterations <= budget


@pytest.mark.parametrize("regime", ["latent", "permuted", "redundant"])
@pytest.mark.parametrize(("nx", "ny"), [(96, 96), (64, 150)])
def test_interval_on_the_benchmark_regimes(regime, nx, ny):
    from smd_dist.demo import workloads

    X, Y = workloads.pair(regime, nx, ny, n_stimuli=300, seed=3)
    x, y = prepare(X), prepare(Y)
    ref, kernel = exact_costs(x, y)
    for rtol in (1e-1, 1e-3):
        iv = sinkhorn.sinkhorn_interval(x, y, rtol=rtol, device="cpu")
        assert iv.lower <= min(ref, kernel) and max(ref, kernel) <= iv.upper
    assert sinkhorn.sinkhorn_interval(x, y, rtol=1e-1, device="cpu").within(1e-1)


@pytest.mark.parametrize("seed", range(6))
def test_any_potentials_give_a_lower_bound(seed):
    # The c-transform makes *any* potentials feasible; the margin covers the rounding.
    X, Y = make("copy", 20, 15, 15, seed)
    x, y = prepare(X), prepare(Y)
    D = squared_distances(x.columns, y.columns)
    ref, _ = exact_costs(x, y)
    a, b = np.full(15, 1 / 15), np.full(15, 1 / 15)
    delta = sinkhorn.cost_error(20, float(x.sq_norms.max() + y.sq_norms.max()))
    rng = np.random.default_rng(seed)
    opposite = -ot.emd(a, b, D, log=True)[1]["v"]
    for g in (np.zeros(15), rng.standard_normal(15) * D.mean(), opposite):
        assert sinkhorn.dual_lower_bound(D, a, b, g, delta=delta) <= ref
    # The exact duals, with the margin, come within it of the optimum.
    v = ot.emd(a, b, D, log=True)[1]["v"]
    assert sinkhorn.dual_lower_bound(D, a, b, v, delta=delta) >= ref - 4 * delta


@pytest.mark.parametrize("seed", range(6))
def test_any_nonnegative_plan_rounds_to_an_upper_bound(seed):
    rng = np.random.default_rng(seed)
    X, Y = make("latent", 12, 9, 14, seed)
    x, y = prepare(X), prepare(Y)
    D = squared_distances(x.columns, y.columns)
    ref, _ = exact_costs(x, y)
    a, b = np.full(9, 1 / 9), np.full(14, 1 / 14)
    scale = float(x.sq_norms.max() + y.sq_norms.max())
    delta = sinkhorn.cost_error(12, scale)
    K = torch.from_numpy(rng.random((9, 14)) ** 8)  # far from any marginal
    p, q = torch.from_numpy(rng.random(9)), torch.from_numpy(rng.random(14))
    up = sinkhorn.rounded_upper_bound(
        D, K, p, q, a, b, delta=delta, X=x.columns, Y=y.columns, scale=scale
    )
    assert up >= ref
    # The optimal plan itself rounds to its own cost, to the margins.
    G = ot.emd(a, b, D)
    up = sinkhorn.rounded_upper_bound(
        D, torch.from_numpy(G), torch.ones(9, dtype=torch.float64),
        torch.ones(14, dtype=torch.float64), a, b,
        delta=delta, X=x.columns, Y=y.columns, scale=scale,
    )
    assert ref <= up <= ref + 4 * delta + 1e-12 * ref


def test_a_cost_matrix_off_its_error_bound_is_an_error():
    X, Y = make("latent", 12, 6, 6, 0)
    x, y = prepare(X), prepare(Y)
    D = squared_distances(x.columns, y.columns)
    scale = float(x.sq_norms.max() + y.sq_norms.max())
    delta = sinkhorn.cost_error(12, scale)
    ones = torch.ones(6, dtype=torch.float64)
    with pytest.raises(SolverError, match="broke its rounding assumptions"):
        sinkhorn.rounded_upper_bound(
            D + 10 * delta, torch.eye(6, dtype=torch.float64), ones, ones,
            np.full(6, 1 / 6), np.full(6, 1 / 6),
            delta=delta, X=x.columns, Y=y.columns, scale=scale,
        )


def test_interval_closes_to_the_rounding_margins_on_a_clear_matching():
    # Near copies: Sinkhorn finds the permutation, and only the floating-point margins
    # (rounding level of the largest squared norms) separate the bounds from the optimum.
    X, Y = make("copy", 16, 24, 24, 1)
    x, y = prepare(X), prepare(Y)
    ref, _ = exact_costs(x, y)
    scale = float(x.sq_norms.max() + y.sq_norms.max())
    iv = sinkhorn.sinkhorn_interval(x, y, rtol=1e-6, device="cpu")
    assert iv.within(1e-6)
    assert 0 < ref - iv.lower <= 1e-13 * scale and 0 < iv.upper - ref <= 1e-13 * scale


def test_soft_matching_sinkhorn_reports_a_certified_interval():
    X, Y = make("latent", 40, 30, 45, 2)
    res = smd_dist.soft_matching(X, Y, method="sinkhorn", rtol=1e-2, device="cpu")
    exact = smd_dist.soft_matching(X, Y)
    assert res.solver == "sinkhorn-certified"
    assert res.lower <= exact.distance <= res.upper == res.distance
    assert res.upper - res.lower <= 1e-2 * res.upper
    assert res.cost == pytest.approx(res.upper**2, rel=1e-15)
    cert = res.certificate
    assert cert.passed and cert.primal == res.cost and cert.dual == pytest.approx(res.lower**2)
    assert exact.lower is None and exact.upper is None


def test_too_wide_an_interval_is_solved_exactly_and_says_so():
    X, Y = make("latent", 40, 30, 45, 2)
    # The margins alone make the interval wider than 1e-16 relative: never certified.
    res = smd_dist.soft_matching(X, Y, method="sinkhorn", rtol=1e-16, device="cpu")
    exact = smd_dist.soft_matching(X, Y)
    assert res.solver == f"sinkhorn-fallback-{exact.solver}"
    assert res.lower is None and res.upper is None
    assert res.distance == exact.distance and res.certificate.passed


@pytest.mark.parametrize("same", [True, False])
def test_zero_distance_pairs_are_solved_exactly(same):
    # An interval [0, sqrt(margin)] is never relatively narrow: such pairs go exact.
    rng = np.random.default_rng(4)
    X = rng.standard_normal((10, 5)) if not same else np.zeros((10, 5))
    res = smd_dist.soft_matching(X, X[:, ::-1], method="sinkhorn", device="cpu")
    assert res.distance == 0.0 and res.solver.startswith("sinkhorn-fallback-")


@pytest.mark.parametrize("rtol", [0, 1, -0.1, 1.5, math.nan, math.inf, "0.1", None, True])
def test_rtol_outside_the_open_unit_interval_is_refused(rtol):
    X = np.ones((3, 2))  # also invalid under normalisation: rtol is checked first
    with pytest.raises(ValueError, match="rtol must be"):
        smd_dist.soft_matching(X, X, method="sinkhorn", rtol=rtol, normalize="unit")
    with pytest.raises(ValueError, match="rtol must be"):
        sinkhorn.sinkhorn_interval(np.eye(3), np.eye(3), rtol=rtol)


def test_bad_method_plan_request_and_input_are_refused():
    X = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(ValueError, match="method must be one of 'exact', 'sinkhorn'"):
        smd_dist.soft_matching(X, X, method="entropic")
    with pytest.raises(ValueError, match="return_plan=True needs method='exact'"):
        smd_dist.soft_matching(X, X, method="sinkhorn", return_plan=True)
    bad = X.copy()
    bad[2, 1] = np.nan
    for method in ("exact", "sinkhorn"):
        with pytest.raises(ValueError, match=r"layer7 \(shape \(6, 3\)\) contains NaN"):
            smd_dist.soft_matching(bad, X, method=method, names=("layer7", "Y"))
    with pytest.raises(ValueError, match="stimulus count mismatch"):
        smd_dist.soft_matching(X, X[:4], method="sinkhorn")
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn.sinkhorn_interval(X, X, max_iter=0)


def test_interval_is_deterministic():
    X, Y = make("redundant", 30, 40, 33, 5)
    x, y = prepare(X), prepare(Y)
    first = sinkhorn.sinkhorn_interval(x, y, device="cpu")
    assert first == sinkhorn.sinkhorn_interval(prepare(X.copy()), prepare(Y.copy()), device="cpu")
