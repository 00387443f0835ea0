"""Partial soft matching score: hand-computed values, limits, registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

import smd_dist
from smd_dist.kernel.prepared import prepare
from smd_dist.metrics import PairValue, get


def latent_pair(rng, m=40, widths=(7, 11)):
    Z = rng.standard_normal((m, 3))
    return tuple(Z @ rng.standard_normal((3, n)) + 0.5 * rng.standard_normal((m, n))
                 for n in widths)


@pytest.mark.parametrize(("mass", "score"), [(0.25, 1.0), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)])
def test_hand_computed(mass, score):
    # One neuron x against y1 = x and y2 = -x: C = (0, 2). Up to 1/2 of the mass goes to y1
    # for free, the rest to y2 at cost 2 per unit.
    x = np.array([[1.0], [-1.0], [2.0], [0.0]])
    res = smd_dist.partial_soft_matching(x, np.hstack([x, -x]), mass=mass, return_plan=True)
    assert res.score == pytest.approx(score, abs=1e-12)
    assert res.mass == mass and res.solver == "partial-network-simplex"
    np.testing.assert_allclose(
        res.plan.toarray(), [[min(mass, 0.5), max(mass - 0.5, 0)]], atol=1e-15
    )


@pytest.mark.parametrize("widths", [(6, 6), (5, 9), (1, 3)])
def test_full_mass_is_the_soft_matching_score(rng, widths):
    X, Y = latent_pair(rng, widths=widths)
    assert smd_dist.partial_soft_matching_score(X, Y, mass=1.0) == pytest.approx(
        smd_dist.soft_matching_score(X, Y), abs=1e-12
    )


def test_score_falls_and_matched_correlation_falls_with_mass(rng):
    X, Y = latent_pair(rng)
    results = [smd_dist.partial_soft_matching(X, Y, mass=m) for m in np.linspace(0.05, 1, 20)]
    scores = [r.score for r in results]
    matched = [r.matched_correlation for r in results]
    # Costs are >= 0, so moving more mass costs more; and the cheapest mass goes first, so
    # the mean correlation of what is moved cannot rise.
    assert all(a >= b - 1e-12 for a, b in zip(scores, scores[1:], strict=False))
    assert all(a >= b - 1e-12 for a, b in zip(matched, matched[1:], strict=False))
    for r in results:
        assert r.score == pytest.approx(1 - r.mass + r.mass * r.matched_correlation, abs=1e-12)
        assert r.cost == pytest.approx(2 * (1 - r.score), abs=1e-12)


def test_outlier_neurons_are_left_out(rng):
    # X's 9 tuning curves shuffled, plus an unrelated neuron on each side: the full score is
    # dragged down by the outliers, the partial one at m = 0.9 is perfect.
    shared = rng.standard_normal((30, 9))
    X = np.hstack([shared, rng.standard_normal((30, 1))])
    Y = np.hstack([rng.standard_normal((30, 1)), shared[:, rng.permutation(9)]])
    res = smd_dist.partial_soft_matching(X, Y, mass=0.9)
    assert res.score == pytest.approx(1.0, abs=1e-12)
    assert res.matched_correlation == pytest.approx(1.0, abs=1e-12)
    assert smd_dist.soft_matching_score(X, Y) < 0.95


def test_symmetric(rng):
    X, Y = latent_pair(rng)
    a = smd_dist.partial_soft_matching_score(X, Y, mass=0.6)
    assert smd_dist.partial_soft_matching_score(Y, X, mass=0.6) == pytest.approx(a, abs=1e-12)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_bad_mass_is_refused_before_anything_else(bad):
    nan = np.full((4, 2), np.nan)  # bad data too: the mass is checked first
    with pytest.raises(ValueError, match="mass"):
        smd_dist.partial_soft_matching(nan, nan, mass=bad)
    with pytest.raises(ValueError, match="mass"):
        smd_dist.partial_soft_matching_score(nan, nan, mass=bad)


def test_constant_neurons_are_refused(rng):
    X = rng.standard_normal((8, 3))
    X[:, 1] = 2.0
    with pytest.raises(ValueError, match="constant"):
        smd_dist.partial_soft_matching(X, rng.standard_normal((8, 3)))


def test_registered_with_default_mass(rng):
    X, Y = latent_pair(rng)
    metric = get("partial_soft_matching_score")
    assert metric.kind == "similarity" and not metric.equal_width_only
    assert "0.9" in metric.description
    prep = metric.preprocessing(center=False, normalize=None)
    assert prep == {"center": True, "normalize": "unit"}
    out = metric.compute(prepare(X, **prep), prepare(Y, **prep), device="cpu")
    assert isinstance(out, PairValue)
    json.dumps({"v": out.value, "s": out.solver, "c": out.certificate})
    assert out.solver == "partial-network-simplex"
    assert set(out.certificate) == {"max_violation", "gap", "tolerance"}
    assert out.value == pytest.approx(smd_dist.partial_soft_matching_score(X, Y), rel=1e-12)
    assert out.value == pytest.approx(
        smd_dist.partial_soft_matching_score(X, Y, mass=0.9), rel=1e-12
    )


def test_engine_computes_it_by_name(tiny_store, tmp_path):
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        ds = smd_dist.compute_distances(
            tiny_store,
            metrics=["partial_soft_matching_score"],
            output=tmp_path / "out.zarr",
            client=client,
            progress=False,
        )
    values = ds["partial_soft_matching_score"]
    a, c = tiny_store.read("a", "conv1"), tiny_store.read("c", "fc")
    got = float(values.sel(rep_a="a/conv1", rep_b="c/fc"))
    assert got == pytest.approx(smd_dist.partial_soft_matching_score(a, c), rel=1e-12)
    # b/conv1 is a/conv1 with its neurons permuted.
    assert float(values.sel(rep_a="a/conv1", rep_b="b/conv1")) == pytest.approx(1.0, abs=1e-12)
