"""Blocked 16-bit bounds and the wide-pair rounds: every bound against float64 costs,
every solve against ``ot.emd2`` with a high cap, with block sizes shrunk so that small
pairs run through every block boundary, segment and region path."""

from __future__ import annotations

import logging

import numpy as np
import ot
import pytest
import torch
from test_bounds import CASES
from test_transport import make, reference

from smd_dist.kernel import blocked, sparse
from smd_dist.kernel import bounds as bounds_module
from smd_dist.kernel import transport as solve_module
from smd_dist.kernel.blocked import BlockedBounds
from smd_dist.kernel.bounds import BoundViolation, CostBounds, low_precision
from smd_dist.kernel.certificate import cost_unit, tolerance_from_norms
from smd_dist.kernel.preparation import preprocess, squared_distances
from smd_dist.kernel.sparse import SOLVER, solve_sparse
from smd_dist.kernel.transport import solve

CPU = torch.device("cpu")


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def product_dtype(request, monkeypatch):
    """Force the product precision whatever the probe would pick on this CPU."""
    monkeypatch.setitem(bounds_module._PRODUCT_DTYPE, "cpu", request.param)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows and entries, so that small pairs cross every boundary."""
    monkeypatch.setattr(blocked, "_GEMM_ROWS", 7)
    monkeypatch.setattr(blocked, "_CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(blocked, "_PRICE_ELEMENTS", 500)
    monkeypatch.setattr(blocked, "_CUT_SAMPLE", 16)
    monkeypatch.setattr(blocked, "_SEGMENT", 8)
    monkeypatch.setattr(blocked, "_GROUP", 4)


@pytest.fixture
def wide(monkeypatch, small_blocks):
    """Every pair takes the sparse path, with the blocked bounds and the wide rounds."""
    monkeypatch.setattr(solve_module, "BLOCKED_MIN_ENTRIES", 1)
    monkeypatch.setattr(solve_module, "SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(solve_module, "SPARSE_TIED_MIN_ENTRIES", 1)
    # A dozen candidates per row and column are a large part of so small a matrix.
    monkeypatch.setattr(solve_module, "MAX_EXACT_FRACTION", 1.0)


def _both(X, Y, dtype, **options):
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    low = (low_precision(X, norms[0], dtype), low_precision(Y, norms[1], dtype))
    full = CostBounds(X, Y, norms, device=CPU, low=low)
    return full, BlockedBounds(X, Y, norms, device=CPU, low=low, **options), norms


@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_are_rigorous_and_within_a_quantum_of_the_float32_bounds(
    case, product_dtype, small_blocks
):
    X, Y = CASES[case](np.random.default_rng(len(case)))
    full, b, norms = _both(X, Y, product_dtype)
    D = squared_distances(X, Y)
    low = b.codes.double().numpy() * b.quantum
    assert np.all(low <= D), f"bound above the exact cost by {(low - D).max():.3g}"
    # Rounding down to a quantum, nothing else: the same bound, at most a quantum lower.
    gap = full.lower.double().numpy() - low
    assert gap.min() >= 0 and gap.max() <= b.quantum
    assert b.quantum == 2.0 ** np.round(np.log2(b.quantum))
    assert b.quantum < 2.6e-4 * b.scale
    assert b.scale == full.scale and b.dtype == full.dtype
    np.testing.assert_array_equal(b.lower_at(np.arange(D.size)), low.ravel())


def test_exact_refuses_a_broken_bound(small_blocks):
    X, Y = make("latent", 60, 30, 30, 2)
    _, b, _ = _both(X, Y, torch.bfloat16)
    b.codes[3, 4] = 2**15 - 1  # as if the product's error were larger
    with pytest.raises(BoundViolation, match="lower bound"):
        b.exact(np.array([3 * 30 + 4], dtype=np.int64))


@pytest.mark.parametrize("shape", [(60, 60), (40, 130), (130, 40)])
def test_candidates_hold_the_smallest_bounds_of_every_row_and_column(shape, small_blocks):
    nx, ny = shape
    X, Y = make("latent", 80, nx, ny, 4)
    k = 3
    full, b, _ = _both(X, Y, torch.bfloat16, k=k)
    keys = b.candidates()
    assert np.all(np.diff(keys) > 0)
    L = b.codes.double().numpy()
    chosen = np.zeros(L.shape, bool)
    chosen.ravel()[keys] = True
    k_row, k_col = k * max(1, round(ny / nx)), k * max(1, round(nx / ny))
    assert (chosen.sum(1) >= k_row).all() and (chosen.sum(0) >= k_col).all()
    assert keys.size < nx * ny / 2  # sparse
    # Each row's and each column's smallest bound is in (the codes break ties).
    assert chosen[np.arange(nx), L.argmin(1)].all()
    assert chosen[L.argmin(0), np.arange(ny)].all()
    assert np.array_equal(b.candidates(99), keys)  # fixed when built


def _regions(nx, ny):
    rng = np.random.default_rng(0)
    yield None, None
    yield np.sort(rng.choice(nx, nx // 3, replace=False)).astype(np.int64), None
    yield None, np.sort(rng.choice(ny, ny // 4, replace=False)).astype(np.int64)
    yield np.arange(5, nx, 2, dtype=np.int64), np.arange(0, ny, 3, dtype=np.int64)
    yield np.empty(0, np.int64), None


@pytest.mark.parametrize("cushion", [0.0, 0.02])
def test_below_proves_every_entry_it_leaves_out_of_its_region(
    product_dtype, small_blocks, cushion
):
    X, Y = make("latent", 80, 50, 70, 3)
    _, b, _ = _both(X, Y, product_dtype)
    D = squared_distances(X, Y)
    rng = np.random.default_rng(5)
    for rows, cols in _regions(50, 70):
        u = D.min(axis=1) - rng.random(50) * D.std()
        v = (D - u[:, None]).min(axis=0) - rng.random(70) * D.std() * 0.01
        keys, complete = b.below(u, v, rows=rows, cols=cols, cushion=cushion * b.scale)
        assert complete and np.all(np.diff(keys) > 0)
        inside = np.zeros((50, 70), bool)
        inside[np.ix_(np.arange(50) if rows is None else rows,
                      np.arange(70) if cols is None else cols)] = True
        flagged = np.zeros(D.size, bool)
        flagged[keys] = True
        assert not flagged[~inside.ravel()].any()
        reduced = (D - u[:, None] - v[None, :]).ravel()
        assert np.all(reduced[inside.ravel() & ~flagged] >= cushion * b.scale * (1 - 1e-6))
        if inside.any():
            assert flagged.sum() < inside.sum()  # the bound proves something


def test_below_over_budget_cuts_the_blocks_over_their_share(
    monkeypatch, small_blocks, quarter_budget_check
):
    monkeypatch.setattr(blocked, "_CUT_SAMPLE", 1024)  # each row's cut from all its columns
    X, Y = make("latent", 80, 64, 300, 3)
    _, b, _ = _both(X, Y, torch.bfloat16)
    D = squared_distances(X, Y)
    u = D.min(axis=1) + 0.5 * D.std()  # far from feasible: most entries are doubtful
    v = np.zeros(300)
    full, complete = b.below(u, v)
    assert complete and full.size > 64 * 40
    # Blocks of one row here: a budget fits when its share covers the busiest row.
    busiest = np.bincount(full // 300, minlength=64).max()
    same, complete = b.below(u, v, budget=busiest * 64, per_row=8)
    assert complete and np.array_equal(same, full)
    _, complete = b.below(u, v, budget=busiest * 64 - 1, per_row=8)
    assert not complete
    quarter_budget_check(b, D, u, v, full)
    with pytest.raises(ValueError, match="cushion must be >= 0, got -1"):
        b.below(u, v, cushion=-1.0)


def test_moved_region_covers_every_entry_the_reference_no_longer_proves():
    """Outside the region, cushion + (u' - u)_i + (v' - v)_j >= 0: the reference's proof
    still holds there, so only the region needs pricing."""
    rng = np.random.default_rng(1)
    for trial in range(20):
        u_ref, v_ref = rng.normal(size=40), rng.normal(size=60)
        u = u_ref + rng.normal(scale=0.01, size=40)
        v = v_ref + rng.normal(scale=0.01, size=60)
        v[rng.choice(60, 3)] += 1.0  # a few columns move far
        shift = rng.normal()  # the duals' gauge is free
        cushion = 0.1
        region = sparse._moved((u_ref + shift, v_ref - shift), u, v, cushion)
        inside = np.zeros((40, 60), bool)
        inside[np.ix_(np.arange(40) if region["rows"] is None else region["rows"],
                      np.arange(60) if region["cols"] is None else region["cols"])] = True
        slack = cushion + (u_ref - u)[:, None] + (v_ref - v)[None, :]
        assert (slack[~inside] >= 0).all()
        assert (slack < 0).any() and inside.sum() < inside.size / 2, trial
    assert sparse._moved(None, u, v, cushion) == {"rows": None, "cols": None}


KINDS = ["latent", "copy", "redundant", "ties", "random"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(120, 120), (90, 260), (260, 70)])
def test_wide_path_matches_network_simplex(kind, shape, product_dtype, wide):
    nx, ny = shape
    X, Y = make(kind, 60, nx, ny, seed=nx + 3 * ny + len(kind))
    for method in ("auto", SOLVER):
        tr = solve(X, Y, method=method)
        assert tr.solver.endswith(SOLVER), tr.solver
        assert abs(tr.cost - reference(X, Y)) <= 1e-10 * (
            np.einsum("ij,ij->j", X, X).max() + np.einsum("ij,ij->j", Y, Y).max()
        )
        assert tr.certificate.passed
        D = squared_distances(X, Y)
        assert (D - tr.u[:, None] - tr.v[None, :]).min() >= -tr.certificate.tolerance
        P = tr.plan().toarray()
        np.testing.assert_allclose(P.sum(1), 1 / nx, rtol=1e-9)
        np.testing.assert_allclose(P.sum(0), 1 / ny, rtol=1e-9)


@pytest.mark.parametrize("shape", [(60, 60), (40, 110)])
def test_wide_rounds_with_merged_counts_match_weighted_simplex(shape, small_blocks):
    nx, ny = shape
    X, Y = make("latent", 80, nx, ny, seed=nx * ny)
    rng = np.random.default_rng(nx)
    cx, cy = rng.integers(1, 9, nx), rng.integers(1, 9, ny)
    cx[0] = 60  # one heavy row, as a merged group of dead units
    _, b, norms = _both(X, Y, torch.bfloat16)
    sol = solve_sparse(b, tol=tolerance_from_norms(*norms), counts=(cx, cy))
    D = squared_distances(X, Y)
    ref = ot.emd2(cx / cx.sum(), cy / cy.sum(), D, numItermax=10**9)
    assert float(np.dot(sol.mass, sol.costs)) == pytest.approx(ref, rel=1e-12)
    assert (D - sol.u[:, None] - sol.v[None, :]).min() >= -tolerance_from_norms(*norms)


def _latent(n, seed, m=200, ny=None, dim=8):
    rng = np.random.default_rng(seed)
    ny = ny or n
    Z = rng.standard_normal((m, dim))
    X = preprocess(Z @ rng.standard_normal((dim, n)) + 0.3 * rng.standard_normal((m, n)))
    Y = preprocess(Z @ rng.standard_normal((dim, ny)) + 0.3 * rng.standard_normal((m, ny)))
    return X, Y


def _rounds(caplog, fn):
    with caplog.at_level(logging.DEBUG, logger="smd_dist.kernel.sparse"):
        caplog.clear()
        out = fn()
    records = [r for r in caplog.records if hasattr(r, "sparse_rounds")]
    assert len(records) == 1
    return out, records[0].sparse_rounds


def test_a_round_prices_only_the_rows_and_columns_whose_duals_moved(caplog, wide):
    """Found by a search over seeds: a pair whose last round prices a region, not the
    whole matrix, and still ends at the exact optimum."""
    seen = False
    for seed in range(12):
        X, Y = _latent(300, seed)
        tr, history = _rounds(caplog, lambda X=X, Y=Y: solve(X, Y, method=SOLVER))
        assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
        assert history[0].rows == 300 and history[0].cols == 300
        assert not history[-1].violated
        if any(r.rows * r.cols < 300 * 300 for r in history):
            seen = True
    assert seen


def test_a_large_growth_starts_the_next_round_cold(monkeypatch, wide):
    """After a round that added more than WARM_GROWTH of the candidates, the network simplex
    starts afresh; after a small one, from the previous duals."""
    X, Y = _latent(300, 3)
    real = sparse.emd_c_sparse
    calls = []

    def recording(a, b, rows, cols, costs, max_iter, *warm):
        calls.append((rows.size, warm))
        return real(a, b, rows, cols, costs, max_iter, *warm)

    monkeypatch.setattr(sparse, "emd_c_sparse", recording)
    for growth in (0.0, 10.0):
        calls.clear()
        monkeypatch.setattr(sparse, "WARM_GROWTH", growth)
        tr = solve(X, Y, method=SOLVER)
        assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
        assert len(calls) >= 2 and calls[0][1] == ()
        warm = [bool(w) for _, w in calls[1:]]
        assert all(warm) if growth else not any(warm)


def test_auto_takes_the_blocked_bounds_from_the_threshold(monkeypatch, caplog, small_blocks):
    X, Y = _latent(200, 7, ny=150)
    built = []
    real = blocked.BlockedBounds.__init__

    def spy(self, *args, **kwargs):
        built.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(blocked.BlockedBounds, "__init__", spy)
    monkeypatch.setattr(solve_module, "SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(solve_module, "BLOCKED_MIN_ENTRIES", 200 * 150 + 1)
    below = solve(X, Y)
    assert not built and below.solver == SOLVER
    monkeypatch.setattr(solve_module, "BLOCKED_MIN_ENTRIES", 200 * 150)
    at, history = _rounds(caplog, lambda: solve(X, Y))
    assert len(built) == 1 and at.solver == SOLVER
    assert at.cost == pytest.approx(below.cost, rel=1e-12)
    assert at.cost == pytest.approx(reference(X, Y), rel=1e-12)
    assert history[-1].new == 0 or not history[-1].violated
    assert sum(r.new for r in history) + history[0].candidates < 200 * 150 / 2


def test_centred_duals_keep_every_sum_and_lose_the_offset():
    rng = np.random.default_rng(2)
    u0, v0 = rng.normal(size=50) * 1e5, rng.normal(size=40) * 1e5
    offset = 9.57e9  # POT's potentials at 16384 x 28672 sat this far from zero
    u, v = u0 + offset, v0 - offset
    cu, cv = sparse._centred(u, v)
    np.testing.assert_array_equal(cu[:, None] + cv[None, :] - (u[:, None] + v[None, :]), 0)
    assert np.abs(cu).max() < 1e6 and np.abs(cv).max() < 1e6


def test_feasible_on_lowers_only_the_columns_a_candidate_violates():
    rng = np.random.default_rng(3)
    ny = 30
    keys = np.sort(rng.choice(20 * ny, 200, replace=False)).astype(np.int64)
    costs = rng.random(200)
    u = rng.random(20) * 0.1
    v = np.full(ny, 0.05)
    fixed = sparse._feasible_on(keys, costs, u, v, ny)
    reduced = costs - u[keys // ny] - fixed[keys % ny]
    assert reduced.min() >= 0 and (fixed <= v).all()
    bad = np.unique(keys[costs - u[keys // ny] - v[keys % ny] < 0] % ny)
    assert bad.size and np.array_equal(np.flatnonzero(fixed < v), bad)


def test_duals_far_from_zero_or_slightly_infeasible_still_certify(monkeypatch, wide):
    """POT's potentials carry an offset of about its artificial arc cost, and at large node
    counts stop a rounding short of feasible: 2^-19 at 16384 x 28672 (redundant and dead
    neurons), 40 % of the certificate's tolerance, which failed it. Simulated here: every
    solve's duals moved 2^27 away (sums then keep 2^-25, a third of the tolerance), and,
    separately, every tenth column's dual 1.2 tolerances too high. POT solves on costs
    scaled by a power of two to order one (:func:`cost_unit`), so both are in its units."""
    X, Y = _latent(200, 5, ny=160)
    tol = tolerance_from_norms(np.einsum("ij,ij->j", X, X), np.einsum("ij,ij->j", Y, Y))
    real = sparse.emd_c_sparse
    D = squared_distances(X, Y)
    unit = cost_unit(tol)
    for shift, excess in ((2.0**27 * unit, 0.0), (0.0, 1.2 * tol * unit)):

        def moved(a, b, rows, cols, costs, max_iter, *warm, shift=shift, excess=excess):
            out = list(real(a, b, rows, cols, costs, max_iter, *warm))
            out[4] = np.asarray(out[4]) + shift
            out[5] = np.asarray(out[5]) - shift
            out[5][::10] += excess
            return tuple(out)

        monkeypatch.setattr(sparse, "emd_c_sparse", moved)
        tr = solve(X, Y, method=SOLVER)
        assert tr.cost == pytest.approx(reference(X, Y), rel=1e-12)
        assert tr.certificate.passed and tr.certificate.max_violation == 0
        assert np.abs(tr.u).max() < 2.0**20
        assert (D - tr.u[:, None] - tr.v[None, :]).min() >= -tr.certificate.tolerance
