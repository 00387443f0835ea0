"""Cross-validated soft matching score: an independent reimplementation, bias, bad input."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from sklearn.model_selection import KFold

import smd_dist
from smd_dist.metrics import cross_validation


def latent_pair(rng, m=60, widths=(7, 9), noise=0.5):
    Z = rng.standard_normal((m, 4))
    return tuple(Z @ rng.standard_normal((4, n)) + noise * rng.standard_normal((m, n))
                 for n in widths)


def zscored(A):
    A = A - A.mean(axis=0)
    return A / np.linalg.norm(A, axis=0)


def independent_cv(X, Y, k, seed):
    """Held-out scores written out with KFold, NumPy and POT's network simplex."""
    nx, ny = X.shape[1], Y.shape[1]
    out = []
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(X):
        corr = zscored(X[train]).T @ zscored(Y[train])
        P = ot.emd(np.full(nx, 1 / nx), np.full(ny, 1 / ny), 1 - corr, numItermax=10**9)
        out.append(float((P * (zscored(X[test]).T @ zscored(Y[test]))).sum()))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    widths = tuple(int(n) for n in rng.integers(1, 12, size=2))
    k = int(rng.integers(2, 8))
    X, Y = latent_pair(rng, widths=widths)
    res = smd_dist.soft_matching_cv(X, Y, cv=k, seed=seed)
    ref = independent_cv(X, Y, k, seed)
    np.testing.assert_allclose(res.fold_scores, ref, rtol=0, atol=1e-12)
    assert res.score == pytest.approx(np.mean(ref), abs=1e-12)
    assert res.n_splits == k == len(res.train_scores) == len(res.certificates)
    assert res.seed == seed and [d.size for d in res.dropped] == [0, 0]
    assert all(c.passed for c in res.certificates)


def test_train_scores_are_the_in_sample_scores_of_the_training_stimuli(rng):
    X, Y = latent_pair(rng)
    res = smd_dist.soft_matching_cv(X, Y, cv=4, seed=1)
    for (train, _), s in zip(KFold(4, shuffle=True, random_state=1).split(X),
                             res.train_scores, strict=True):
        assert s == pytest.approx(smd_dist.soft_matching_score(X[train], Y[train]), abs=1e-12)


def test_score_option_and_seeds(rng):
    X, Y = latent_pair(rng)
    cv = smd_dist.soft_matching_score(X, Y, cv=5, seed=7)
    assert cv == smd_dist.soft_matching_cv(X, Y, cv=5, seed=7).score
    assert cv == smd_dist.soft_matching_score(X, Y, cv=5, seed=7)  # reproducible
    assert cv != smd_dist.soft_matching_score(X, Y, cv=5, seed=8)  # other folds
    assert smd_dist.soft_matching_score(X, Y, cv=None) == smd_dist.soft_matching_score(X, Y)


def test_in_sample_score_is_biased_on_unrelated_neurons():
    # Independent noise: every correlation is zero in expectation. The in-sample plan picks
    # the largest chance correlations; held out, they average to zero.
    in_sample, held_out = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        X, Y = rng.standard_normal((40, 20)), rng.standard_normal((40, 20))
        in_sample.append(smd_dist.soft_matching_score(X, Y))
        held_out.append(smd_dist.soft_matching_score(X, Y, cv=5, seed=seed))
    assert min(in_sample) > 0.15
    assert abs(np.mean(held_out)) < 0.05


def test_shared_tuning_survives_cross_validation(rng):
    Z = rng.standard_normal((80, 6))
    X = Z + 0.1 * rng.standard_normal((80, 6))
    Y = Z[:, ::-1] + 0.1 * rng.standard_normal((80, 6))
    assert smd_dist.soft_matching_score(X, Y, cv=5) > 0.95


@pytest.mark.parametrize("bad", [1, 0, -3, 11, 21, 2.5, "3", True])
def test_bad_cv_is_refused_before_any_solve(rng, monkeypatch, bad):
    def no_solve(*args, **kwargs):
        raise AssertionError("solved before refusing")

    monkeypatch.setattr(cross_validation, "solve", no_solve)
    X, Y = rng.standard_normal((21, 3)), rng.standard_normal((21, 4))  # at most 10 folds
    with pytest.raises(ValueError, match=r"cv must be .* from 2 to 10 for 21 stimuli"):
        smd_dist.soft_matching_cv(X, Y, cv=bad)
    with pytest.raises(ValueError, match="cv must be"):
        smd_dist.soft_matching_score(X, Y, cv=bad)


def test_bad_seed_and_option_are_refused(rng):
    X, Y = rng.standard_normal((20, 3)), rng.standard_normal((20, 4))
    with pytest.raises(ValueError, match="seed must be"):
        smd_dist.soft_matching_cv(X, Y, cv=2, seed="zero")
    with pytest.raises(ValueError, match="constant_neurons must be"):
        smd_dist.soft_matching_cv(X, Y, cv=2, constant_neurons="ignore")
    with pytest.raises(ValueError, match="stimulus count mismatch"):
        smd_dist.soft_matching_cv(X, Y[:10], cv=2)


def sparse_neuron_data(rng):
    """X's column 2 fires on two stimuli only, so some fold sees it constant."""
    X, Y = latent_pair(rng, m=30, widths=(5, 6))
    X[:, 2] = 0.0
    X[[4, 17], 2] = 1.0
    return X, Y


def test_neuron_constant_on_a_fold_is_refused_by_default(rng, monkeypatch):
    monkeypatch.setattr(cross_validation, "solve", lambda *a, **k: pytest.fail("solved"))
    X, Y = sparse_neuron_data(rng)
    with pytest.raises(ValueError, match=r"(?s)X .* constant on the held-out stimuli of fold "
                       r"\d/5 \(cv=5, seed=0\) at columns \[2\].*constant_neurons='drop'"):
        smd_dist.soft_matching_cv(X, Y, cv=5)


def test_drop_leaves_the_neuron_out_of_every_fold(rng):
    X, Y = sparse_neuron_data(rng)
    res = smd_dist.soft_matching_cv(X, Y, cv=5, constant_neurons="drop")
    assert res.dropped[0].tolist() == [2] and res.dropped[1].size == 0
    kept = smd_dist.soft_matching_cv(np.delete(X, 2, axis=1), Y, cv=5)
    assert res.fold_scores == kept.fold_scores
    with pytest.raises(ValueError, match="every neuron is constant"):
        smd_dist.soft_matching_cv(X[:, [2]], Y, cv=5, constant_neurons="drop")
