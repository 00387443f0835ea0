"""Checks the kernel's bound classes share: what ``below`` keeps under a budget."""

from __future__ import annotations

import numpy as np
import pytest


def _quarter_budget_keeps_each_rows_most_doubtful(b, D, u, v, full) -> None:
    """``b.below`` with a quarter of the doubtful entries ``full`` as its budget: an
    incomplete, sorted subset that every row still steers, each row keeping entries whose
    reduced costs ``D - u - v`` lie below the ones it leaves out."""
    n_rows, n_cols = D.shape
    part, complete = b.below(u, v, budget=full.size // 4, per_row=8)
    assert not complete
    assert np.all(np.diff(part) > 0) and np.isin(part, full).all()
    assert part.size < full.size / 4
    assert set(np.unique(part // n_cols)) == set(np.unique(full // n_cols))
    reduced = (D - u[:, None] - v[None, :]).ravel()
    kept = np.zeros(D.size, bool)
    kept[part] = True
    for i in range(0, n_rows, 9):
        row = slice(i * n_cols, (i + 1) * n_cols)
        assert np.median(reduced[row][kept[row]]) < np.median(reduced[row][~kept[row]])


@pytest.fixture
def quarter_budget_check():
    """:func:`_quarter_budget_keeps_each_rows_most_doubtful`, for either bound class."""
    return _quarter_budget_keeps_each_rows_most_doubtful
