"""smd_dist.pairwise: every pair of a few in-memory arrays, equal to the pair functions."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import ot
import pytest

import smd_dist

# The module, not the function smd_dist.engine exports under the same name.
pairwise_module = importlib.import_module("smd_dist.engine.pairwise")

M = 40


@pytest.fixture
def reps():
    rng = np.random.default_rng(11)
    latent = rng.standard_normal((M, 4))
    widths = {"net/conv1": 7, "net/conv2": 9, "other/fc": 7, "other/out": 5}
    return {
        name: latent @ rng.standard_normal((4, w)) + 0.2 * rng.standard_normal((M, w))
        for name, w in widths.items()
    }


PAIR_FUNCTIONS = {
    "soft_matching": smd_dist.soft_matching_distance,
    "soft_matching_score": smd_dist.soft_matching_score,
    "procrustes": smd_dist.procrustes_distance,
    "linear_cka": smd_dist.linear_cka,
}


@pytest.mark.parametrize("metric", sorted(PAIR_FUNCTIONS))
def test_values_equal_the_pair_functions_bit_for_bit(reps, metric):
    d = smd_dist.pairwise(reps, metric)
    names = list(reps)
    assert d.name == metric and d.dims == ("rep_a", "rep_b") and d.dtype == np.float64
    assert list(d.rep_a.values) == names and list(d.rep_b.values) == names
    assert d["n_neurons_a"].values.tolist() == [7, 9, 7, 5]
    np.testing.assert_array_equal(d.values, d.values.T)
    identity = 0.0 if d.attrs["kind"] == "distance" else 1.0
    assert np.all(np.diag(d.values) == identity)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert d.sel(rep_a=a, rep_b=b).item() == PAIR_FUNCTIONS[metric](reps[a], reps[b])
    json.dumps(d.attrs)


def test_soft_matching_agrees_with_an_independent_solver(reps):
    d = smd_dist.pairwise(reps)
    for a, b in [("net/conv1", "net/conv2"), ("other/fc", "other/out")]:
        xa, xb = reps[a] - reps[a].mean(0), reps[b] - reps[b].mean(0)
        na, nb = xa.shape[1], xb.shape[1]
        exact = ot.emd2(np.full(na, 1 / na), np.full(nb, 1 / nb), ot.dist(xa.T, xb.T),
                        numItermax=10**9)
        assert d.sel(rep_a=a, rep_b=b).item() == pytest.approx(math.sqrt(exact), rel=1e-9)


def test_no_float32_round_trip(reps):
    d = smd_dist.pairwise(reps)
    a, b = reps["net/conv1"], reps["net/conv2"]
    exact = smd_dist.soft_matching_distance(a, b)
    rounded = smd_dist.soft_matching_distance(a.astype(np.float32), b.astype(np.float32))
    assert exact != rounded  # the inputs' float64 digits matter here ...
    assert d.sel(rep_a="net/conv1", rep_b="net/conv2").item() == exact  # ... and are kept


def test_preprocessing_and_undefined_pairs(reps):
    z = smd_dist.pairwise(reps, normalize="zscore", center=True)
    assert json.loads(z.attrs["preprocessing"]) == {"center": True, "normalize": "zscore"}
    assert z.sel(rep_a="net/conv1", rep_b="other/fc").item() == smd_dist.soft_matching_distance(
        reps["net/conv1"], reps["other/fc"], normalize="zscore")
    p = smd_dist.pairwise(reps, "permutation")
    assert p.sel(rep_a="net/conv1", rep_b="other/fc").item() == (
        smd_dist.permutation_distance(reps["net/conv1"], reps["other/fc"]))
    assert math.isnan(p.sel(rep_a="net/conv1", rep_b="net/conv2").item())  # widths differ


def test_a_client_gives_the_same_matrix(reps, monkeypatch):
    from distributed import Client, LocalCluster

    here = smd_dist.pairwise(reps)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        there = smd_dist.pairwise(reps, client=client)
        assert there.values.tobytes() == here.values.tobytes()
        # Small work stays in this process even with a current client; large work uses it.
        monkeypatch.setattr(pairwise_module, "_on_client", lambda *a: pytest.fail("shipped"))
        smd_dist.pairwise(reps)
        seen = []
        monkeypatch.setattr(pairwise_module, "IN_PROCESS_ENTRIES", 0)
        monkeypatch.setattr(pairwise_module, "_on_client", lambda c, *a: seen.append(c) or {})
        smd_dist.pairwise(reps)
        assert seen == [client]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([np.zeros((3, 2))], "mapping of names"),
        ({}, "mapping of names"),
        ({1: np.zeros((3, 2))}, "rep names must be strings"),
        ({"a": np.zeros(3), "b": np.zeros((3, 2))}, r"a: expected a 2-D .* shape \(3,\)"),
        ({"a": np.ones((3, 2)), "b": np.ones((4, 2))}, "a has 3 stimuli, b has 4"),
    ],
)
def test_bad_input_is_refused_naming_it(bad, match):
    with pytest.raises(ValueError, match=match):
        smd_dist.pairwise(bad)


def test_bad_values_and_options_are_named(reps):
    broken = dict(reps)
    broken["other/fc"] = broken["other/fc"].copy()
    broken["other/fc"][5, 2] = np.nan
    with pytest.raises(ValueError, match="other/fc"):
        smd_dist.pairwise(broken)
    with pytest.raises(ValueError, match="soft_matching"):
        smd_dist.pairwise(reps, "soft_matchng")
    with pytest.raises(ValueError, match="zcore"):
        smd_dist.pairwise(reps, normalize="zcore")
    with pytest.raises(ValueError, match="device"):
        smd_dist.pairwise(reps, device="gpu")
