"""Per-array derived quantities: kept for read-only arrays only, dropped with the array."""

from __future__ import annotations

import gc

import numpy as np
from test_solvers import make

from smd_dist import derived as derived_module
from smd_dist.derived import derived, freeze
from smd_dist.solvers import solve


def _counter():
    calls = []

    def compute(a):
        calls.append(1)
        return float(a.sum())

    return calls, compute


def test_writeable_arrays_are_computed_every_time():
    calls, compute = _counter()
    a = np.arange(6.0)
    assert derived(a, "sum", compute) == 15.0
    a[0] = 100.0  # an edit in place is seen: nothing was kept
    assert derived(a, "sum", compute) == 115.0
    assert len(calls) == 2


def test_read_only_arrays_are_computed_once_per_name():
    calls, compute = _counter()
    a = freeze(np.arange(6.0))
    assert not a.flags.writeable
    assert derived(a, "sum", compute) == derived(a, "sum", compute) == 15.0
    assert len(calls) == 1
    derived(a, "other", compute)
    assert len(calls) == 2


def test_values_are_dropped_with_their_array():
    a = freeze(np.arange(6.0))
    key = id(a)
    derived(a, "sum", lambda x: 1)
    assert key in derived_module._VALUES
    del a
    gc.collect()
    assert key not in derived_module._VALUES


def test_frozen_inputs_give_bit_identical_solves():
    """Kept quantities change nothing: the same plan and cost, fresh or reused."""
    for kind, shape in [("latent", (300, 420)), ("redundant", (400, 300)), ("copy", (256, 256))]:
        X, Y = make(kind, 150, *shape, seed=shape[0])
        fresh = solve(X.copy(), Y.copy())
        Xf, Yf = freeze(X.copy()), freeze(Y.copy())
        first, again = solve(Xf, Yf), solve(Xf, Yf)
        for tr in (first, again):
            assert tr.cost == fresh.cost and tr.solver == fresh.solver
            assert np.array_equal(tr.cols, fresh.cols) and np.array_equal(tr.mass, fresh.mass)
