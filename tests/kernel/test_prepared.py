"""Prepared reps: identical-column groups, one of each first, low-precision copies made once."""

from __future__ import annotations

import math
import threading

import numpy as np
import ot
import pytest
import torch
from test_transport import make

from smd_dist.kernel import transport
from smd_dist.kernel.bounds import low_precision, product_dtype
from smd_dist.kernel.preparation import preprocess, squared_distances
from smd_dist.kernel.prepared import (
    PreparedRep,
    as_prepared,
    identical_columns,
    prepare,
    prepare_pair,
)
from smd_dist.kernel.transport import solve

CPU = torch.device("cpu")


def _with_copies(seed=11, m=20, n=12):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n)) + 1.0
    X[:, [2, 9]] = X[:, [7]]  # a group of three
    X[:, [0, 4, 10]] = 0.0  # constant neurons: all-zero after centring
    return X


def test_dead_units_merged_after_centring():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((30, 40))
    X[:, ::5] = 3.0  # constant neurons become dead (all-zero) after centring
    X -= X.mean(0)
    reps, group, counts = identical_columns(X)
    assert counts.max() == 8 and reps.size == 33
    assert np.array_equal(X[:, reps][:, group], X)


def test_identical_columns_groups_by_first_occurrence():
    X = np.array([[1.0, 0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 3.0, 1.0, 0.0]])
    reps, group, counts = identical_columns(X)
    assert reps.tolist() == [0, 1, 3]
    assert group.tolist() == [0, 1, 0, 2, 1]
    assert counts.tolist() == [2, 2, 1]


def test_prepare_puts_one_of_each_group_first_and_remembers_the_neurons():
    X = _with_copies()
    centred = preprocess(X)
    rep = prepare(X, name="net/layer")
    assert isinstance(rep, PreparedRep) and rep.name == "net/layer"
    assert not rep.columns.flags.writeable and rep.columns.flags.f_contiguous
    assert rep.n_distinct == 8 and rep.merged
    assert sorted(rep.counts.tolist()) == [1] * 6 + [3, 3]
    # the same neurons, in an order that `neurons` undoes
    assert np.array_equal(rep.columns, centred[:, rep.neurons])
    # representatives keep their relative order, and each column's group is its
    # representative's position
    firsts = identical_columns(centred)[0]
    assert np.array_equal(rep.columns[:, :8], centred[:, firsts])
    assert np.array_equal(rep.columns[:, rep.group], rep.columns)
    assert rep.group[:8].tolist() == list(range(8))
    # what identical_columns would say of the reordered array
    keep, group, counts = identical_columns(np.array(rep.columns))
    assert keep.tolist() == list(range(8))
    assert np.array_equal(group, rep.group) and np.array_equal(counts, rep.counts)
    np.testing.assert_allclose(rep.sq_norms, (rep.columns**2).sum(0), rtol=1e-14)


def test_equal_norms_alone_do_not_merge_columns():
    """Distinct norms rule copies out without a fingerprint; equal norms of different
    columns (here a column and its negative) must still not be merged."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 6))
    X[:, 1] = -X[:, 0]
    X = X - X.mean(axis=0)
    rep = prepare(X, center=False)
    assert rep.sq_norms[0] == rep.sq_norms[1]
    assert rep.n_distinct == 6 and not rep.merged and rep.neurons is None
    lone = prepare(X[:, 2:], center=False)
    assert lone.n_distinct == 4 and np.array_equal(lone.group, np.arange(4))


def test_prepare_without_copies_keeps_the_order():
    X = np.random.default_rng(12).standard_normal((15, 6))
    rep = prepare(X)
    assert rep.neurons is None and not rep.merged and rep.n_distinct == 6
    assert np.array_equal(rep.columns, preprocess(X))
    assert rep.distinct() is rep.columns


def test_as_prepared_leaves_the_callers_array_alone():
    X = preprocess(_with_copies(seed=3))
    before = X.copy()
    rep = as_prepared(X)
    assert X.flags.writeable and np.array_equal(X, before)
    assert rep.merged and np.array_equal(rep.columns, X[:, rep.neurons])
    assert as_prepared(rep) is rep
    plain = preprocess(np.random.default_rng(4).standard_normal((15, 6)))
    assert as_prepared(plain).columns is plain  # nothing repeats: no copy


def test_merged_problem_is_a_view_with_the_same_optimum(monkeypatch):
    monkeypatch.setattr(transport, "MERGE_MIN_WORK", 0)  # merge even this small pair
    X, Y = make("redundant", 60, 48, 40, 13)
    X[:, 1::7] = 0.0
    reference = ot.emd2(
        np.full(48, 1 / 48), np.full(40, 1 / 40), squared_distances(X, Y), numItermax=10**9
    )
    rep = prepare(X, center=False)
    merged = rep.distinct()
    assert merged.shape[1] == rep.n_distinct < 48 and np.shares_memory(merged, rep.columns)
    dtype = product_dtype(CPU)
    low = rep.distinct_low_precision(CPU, dtype)
    assert low.low.shape[0] == rep.n_distinct
    whole = rep.low_precision(CPU, dtype).low
    assert low.low.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    tr = solve(rep, prepare(Y, center=False), device="cpu")
    assert tr.solver.startswith("merged-")
    assert math.isclose(tr.cost, reference, rel_tol=1e-12)


def test_low_precision_copy_is_made_once_and_equals_a_fresh_one():
    rep = prepare(np.random.default_rng(5).standard_normal((40, 30)))
    dtype = product_dtype(CPU)
    first = rep.low_precision(CPU, dtype)
    assert rep.low_precision(CPU, dtype) is first
    fresh = low_precision(rep.columns, rep.sq_norms, dtype)
    assert torch.equal(first.low, fresh.low) and np.array_equal(first.err, fresh.err)
    assert rep.nbytes > rep.columns.nbytes + first.low.nelement() * first.low.element_size() - 1


def test_threads_asking_at_once_share_one_low_precision_copy():
    rep = prepare(np.random.default_rng(6).standard_normal((200, 300)))
    dtype = product_dtype(CPU)
    seen = []
    threads = [
        threading.Thread(target=lambda: seen.append(rep.low_precision(CPU, dtype)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(low) for low in seen}) == 1


@pytest.mark.parametrize(
    "kind, shape", [("latent", (300, 420)), ("redundant", (400, 300)), ("copy", (256, 256))]
)
def test_prepared_reps_give_bit_identical_solves_fresh_or_reused(kind, shape):
    """Kept quantities change nothing: the same plan and cost, fresh or reused."""
    X, Y = make(kind, 150, *shape, seed=shape[0])
    fresh = solve(X.copy(), Y.copy())
    x, y = as_prepared(X.copy()), as_prepared(Y.copy())
    first, again = solve(x, y), solve(x, y)
    for tr in (first, again):
        assert tr.cost == fresh.cost and tr.solver == fresh.solver
        for field in ("rows", "cols", "mass", "u", "v"):
            assert np.array_equal(getattr(tr, field), getattr(fresh, field))


def test_plan_and_duals_come_back_in_the_callers_neuron_order(monkeypatch):
    monkeypatch.setattr(transport, "MERGE_MIN_WORK", 0)  # merge even this small pair
    X, Y = make("redundant", 40, 30, 24, 5)
    X[:, [3, 11, 17]] = 0.0
    Y[:, 5] = Y[:, 2]
    tr = solve(X, Y)
    assert tr.solver.startswith("merged-")
    P = tr.plan().toarray()
    np.testing.assert_allclose(P.sum(1), 1 / 30, rtol=1e-12)
    np.testing.assert_allclose(P.sum(0), 1 / 24, rtol=1e-12)
    D = squared_distances(X, Y)
    assert math.isclose(float((P * D).sum()), tr.cost, rel_tol=1e-12)
    # the duals price the original matrix: tight on the plan, feasible everywhere
    reduced = D - tr.u[:, None] - tr.v[None, :]
    assert reduced.min() >= -1e-9 and np.abs(reduced[tr.rows, tr.cols]).max() <= 1e-9
    order = np.lexsort((tr.cols, tr.rows))
    assert np.array_equal(order, np.arange(order.size))  # sorted by (row, col)


@pytest.mark.parametrize("scale", [1e-170, 1e-160, 1e155, 1e200])
def test_values_whose_squares_leave_float64_are_refused_not_computed(scale):
    X = np.random.default_rng(3).standard_normal((40, 6)) * scale
    with pytest.raises(ValueError, match=r"net/l \(shape \(40, 6\)\).*multiply the data"):
        prepare(X, name="net/l")
    prepare(np.zeros((40, 6)))  # all zero is in range: every cost is exactly zero
    assert prepare(X, normalize="unit").sq_norms.max() == pytest.approx(1.0)


def test_dropped_neurons_are_recorded():
    X = _with_copies()
    rep = prepare(X, constant_neurons="drop")
    assert rep.dropped.tolist() == [0, 4, 10] and rep.shape == (20, 9)
    assert prepare(X).dropped.size == 0 and prepare(X).shape == (20, 12)


def test_a_pair_too_small_to_merge_is_prepared_without_looking_for_copies():
    X = _with_copies()
    rep = prepare(X, group=False)
    assert rep.n_distinct == X.shape[1] and not rep.merged and rep.neurons is None
    assert not transport.merging_can_pay(rep.sq_norms, rep.sq_norms, 20)  # 12 neurons
    x, y = prepare_pair(X, X, group=transport.merging_can_pay)
    assert not x.merged and not y.merged
    x, y = prepare_pair(X, X, group=lambda *args: True)
    grouped = prepare(X)
    assert x.n_distinct == grouped.n_distinct == 8
    assert np.array_equal(x.columns, grouped.columns)
    assert np.array_equal(x.neurons, grouped.neurons)
    wide = prepare(np.random.default_rng(3).standard_normal((30, 600)), group=False)
    assert transport.merging_can_pay(wide.sq_norms, wide.sq_norms, 30)  # the sparse path
    dead = np.random.default_rng(3).standard_normal((2000, 64))
    dead[:, :20] = 0.0  # a third dead: merging 64² at M = 2000 pays
    norms = prepare(dead, group=False).sq_norms
    assert transport.merging_can_pay(norms, norms, 2000)


@pytest.mark.parametrize("shape", [(12, 14), (90, 100), (700, 600)])
def test_the_public_function_and_kept_reps_give_the_same_bits(shape):
    """soft_matching looks for copies only where solve could merge them, and solve works
    in the caller's order when it does not: the engine's kept reps give the same bits."""
    import smd_dist

    X, Y = make("redundant", 40, *shape, sum(shape))
    X[:, ::5] = 0.0
    Y[:, 1] = Y[:, 0]
    x, y = prepare(X), prepare(Y)
    assert x.merged and y.merged
    assert smd_dist.soft_matching_distance(X, Y) == math.sqrt(max(solve(x, y).cost, 0.0))
