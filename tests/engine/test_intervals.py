"""The engine with the certified Sinkhorn metric: options from config, intervals in the output."""

from __future__ import annotations

import math

import dask.config
import numpy as np
import pytest

from smd_dist.engine import IncompatibleOutputError, InputError, compute_distances
from smd_dist.engine.assembly import assemble
from smd_dist.engine.output import ResultsOutput, open_distances
from smd_dist.metrics import get
from smd_dist.store import ActivationStore

WIDTHS = {"a/l1": 12, "a/l2": 20, "b/l1": 12, "b/l2": 7}
SINKHORN = "soft_matching_sinkhorn"


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(3)
    store = ActivationStore(tmp_path / "store", mode="a")
    latent = rng.standard_normal((40, 4))
    for rep, width in WIDTHS.items():
        model, layer = rep.split("/")
        weights = rng.standard_normal((4, width))
        store.write(model, layer, latent @ weights + 0.2 * rng.standard_normal((40, width)))
    return store


def test_intervals_are_recorded_and_hold_the_exact_value(store, client, tmp_path):
    with dask.config.set({f"smd-dist.metric-options.{SINKHORN}.rtol": 0.05}):
        ds = compute_distances(
            store,
            metrics=["soft_matching", SINKHORN],
            output=tmp_path / "out",
            client=client,
            progress=False,
        )
    assert ds.attrs["n_failed_pairs"] == 0
    assert "soft_matching_lower" not in ds and "soft_matching_upper" not in ds
    exact, value = ds["soft_matching"].values, ds[SINKHORN].values
    lower, upper = ds[f"{SINKHORN}_lower"].values, ds[f"{SINKHORN}_upper"].values
    solver = ds[f"{SINKHORN}_solver"].values
    certified = 0
    for i in range(len(WIDTHS)):
        assert lower[i, i] == upper[i, i] == value[i, i] == 0.0
        for j in range(len(WIDTHS)):
            if i == j:
                continue
            if solver[i, j] == "sinkhorn-certified":
                certified += 1
                assert lower[i, j] <= exact[i, j] <= upper[i, j] == value[i, j]
                assert upper[i, j] - lower[i, j] <= 0.05 * upper[i, j]
            else:
                assert solver[i, j].startswith("sinkhorn-fallback-")
                assert math.isnan(lower[i, j]) and math.isnan(upper[i, j])
                assert value[i, j] == exact[i, j]
    assert certified > 0
    opened = open_distances(tmp_path / "out")
    np.testing.assert_array_equal(opened[f"{SINKHORN}_lower"].values, lower)
    records = ResultsOutput(tmp_path / "out").read().records.latest()
    solvers = np.array(records.solvers)[records.column("solver")]
    assert (np.isnan(records.column("lower")) == (solvers != "sinkhorn-certified")).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rtol": 2.0}, r"smd-dist.metric-options.soft_matching_sinkhorn: .*rtol must be"),
        ({"rtol": 0}, "rtol must be between 0 and 1"),
        ({"tol": 0.1}, r"has no option 'tol' \(its options: rtol\)"),
    ],
)
def test_bad_metric_options_are_refused_before_any_pair(store, client, tmp_path, options, match):
    with dask.config.set({f"smd-dist.metric-options.{SINKHORN}": options}):
        with pytest.raises(InputError, match=match):
            compute_distances(
                store, metrics=[SINKHORN], output=tmp_path / "out", client=client, progress=False
            )
    assert not (tmp_path / "out").exists()


def test_metric_options_reach_compute():
    from smd_dist.kernel.prepared import prepare

    rng = np.random.default_rng(0)
    x, y = prepare(rng.standard_normal((30, 9))), prepare(rng.standard_normal((30, 11)))
    metric = get(SINKHORN)
    assert metric.interval and metric.options == {"rtol": 1e-3}
    wide = metric.compute(x, y, device="cpu", rtol=0.5)
    assert wide.solver == "sinkhorn-certified" and wide.value == wide.upper
    assert wide.upper - wide.lower <= 0.5 * wide.upper
    narrow = metric.compute(x, y, device="cpu", rtol=1e-16)  # the margins alone are wider
    assert narrow.solver.startswith("sinkhorn-fallback-") and narrow.lower is None
    with pytest.raises(ValueError, match="has no option 'atol'"):
        metric.compute(x, y, atol=1.0)
    with pytest.raises(ValueError, match="metric 'soft_matching' has no option 'rtol'"):
        get("soft_matching").compute(x, y, rtol=0.1)


def test_ledger_parts_without_the_interval_fields_still_load(tmp_path, ledger_helpers):
    output = ResultsOutput(tmp_path / "out")
    output.initialise({"format": 1, "preprocessing": {}, "version_series": "0.1"})
    pair = {"rep_a": "a/l1", "rep_b": "a/l2", "hash_a": "h1", "hash_b": "h2"}
    old = {**pair, "metric": "soft_matching", "value": 1.5, "solver": "network-simplex",
           "max_violation": 0.0, "gap": 0.0, "seconds": 0.1}
    ledger_helpers.write_format1(output.path, [old], num_fields=False)
    new = {**pair, "metric": SINKHORN, "value": 2.0, "solver": "sinkhorn-certified",
           "max_violation": 0.0, "gap": 0.01, "seconds": 0.2, "lower": 1.99, "upper": 2.0}
    output.append(ledger_helpers.records([new]))
    read = output.read()
    assert not read.incomplete and not read.corrupt
    loaded_old, loaded_new = ledger_helpers.rows(read.records.latest())
    assert loaded_old["value"] == 1.5
    assert math.isnan(loaded_old["lower"]) and math.isnan(loaded_old["upper"])
    assert loaded_new == {**new, "error": "", "worker": ""}

    class Rep:
        def __init__(self, rep_id, content_hash):
            self.rep_id, self.content_hash, self.n_neurons = rep_id, content_hash, 3
            self.model, self.layer = rep_id.split("/")

    reps = [Rep("a/l1", "h1"), Rep("a/l2", "h2")]
    ds = assemble(read.records, reps, [get("soft_matching"), get(SINKHORN)])
    assert ds[f"{SINKHORN}_lower"].values[0, 1] == 1.99
    assert "soft_matching_lower" not in ds


def test_a_resume_with_other_metric_options_is_refused(store, client, tmp_path):
    first = compute_distances(store, metrics=[SINKHORN], output=tmp_path / "out",
                              client=client, progress=False)
    header = ResultsOutput(tmp_path / "out").header()
    assert header["metric_options"] == {SINKHORN: {"rtol": 1e-3}}
    with dask.config.set({f"smd-dist.metric-options.{SINKHORN}": {"rtol": 0.05}}):
        with pytest.raises(IncompatibleOutputError, match=r"rtol.*0\.001.*0\.05.*--fresh"):
            compute_distances(store, metrics=[SINKHORN], output=tmp_path / "out",
                              client=client, progress=False)
        # a metric without options joins the output; the refused options never do
        compute_distances(store, metrics=["soft_matching"], output=tmp_path / "out",
                          client=client, progress=False)
    again = compute_distances(store, metrics=[SINKHORN], output=tmp_path / "out",
                              client=client, progress=False)
    assert again[SINKHORN].values.tobytes() == first[SINKHORN].values.tobytes()
    assert ResultsOutput(tmp_path / "out").header()["metric_options"] == {
        SINKHORN: {"rtol": 1e-3}, "soft_matching": {}}
