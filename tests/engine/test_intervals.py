"""The engine with the certified Sinkhorn metric: options from config, intervals in the output."""

from __future__ import annotations

import math

import dask.config
import numpy as np
import pytest
import zarr

from smd_dist.engine import InputError, compute_distances
from smd_dist.engine.output import (
    LEDGER,
    CorruptOutputError,
    PairRecord,
    ResultsOutput,
    _part_checksum,
    assemble,
    open_distances,
)
from smd_dist.metrics import get
from smd_dist.store import ActivationStore

WIDTHS = {"a/l1": 12, "a/l2": 20, "b/l1": 12, "b/l2": 7}
SINKHORN = "soft_matching_sinkhorn"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


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
    latest, _, _ = ResultsOutput(tmp_path / "out").records()
    for record in latest.values():
        assert math.isnan(record.lower) == (record.solver != "sinkhorn-certified")


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


def _append_old_part(output: ResultsOutput, records) -> None:
    """A ledger part as written before the interval fields: four numbers, no field names."""
    num = np.array([[r.value, r.max_violation, r.gap, r.seconds] for r in records], dtype="f8")
    fields = ("metric", "rep_a", "rep_b", "hash_a", "hash_b", "solver", "error", "worker")
    txt = np.array([[getattr(r, f) for f in fields] for r in records], dtype=object)
    ledger = zarr.open_group(output.path / LEDGER, mode="a", use_consolidated=False)
    part = ledger.create_group("p00000000000000000001-1", attributes={"complete": False})
    part.create_array("num", data=num, chunks=num.shape)
    text = part.create_array("txt", shape=txt.shape, dtype=str, chunks=txt.shape)
    text[...] = txt
    part.attrs.update({"n": len(records), "sha256": _part_checksum(num, txt)})
    part.attrs["complete"] = True


def test_ledger_parts_without_the_interval_fields_still_load(tmp_path):
    output = ResultsOutput(tmp_path / "out")
    output.initialise({"format": 1, "preprocessing": {}, "version_series": "0.1"})
    old = PairRecord("soft_matching", "a/l1", "a/l2", "h1", "h2", 1.5, "network-simplex",
                     0.0, 0.0, 0.1)
    _append_old_part(output, [old])
    new = PairRecord(SINKHORN, "a/l1", "a/l2", "h1", "h2", 2.0, "sinkhorn-certified",
                     0.0, 0.01, 0.2, lower=1.99, upper=2.0)
    output.append([new])
    latest, incomplete, corrupt = output.records()
    assert not incomplete and not corrupt
    loaded_old = latest[old.key]
    assert loaded_old.value == 1.5
    assert math.isnan(loaded_old.lower) and math.isnan(loaded_old.upper)
    assert latest[new.key] == new

    class Rep:
        def __init__(self, rep_id, content_hash):
            self.rep_id, self.content_hash, self.n_neurons = rep_id, content_hash, 3
            self.model, self.layer = rep_id.split("/")

    reps = [Rep("a/l1", "h1"), Rep("a/l2", "h2")]
    ds = assemble(latest, reps, [get("soft_matching"), get(SINKHORN)])
    assert ds[f"{SINKHORN}_lower"].values[0, 1] == 1.99
    assert "soft_matching_lower" not in ds
    # The field names are under the part's checksum: renaming the columns is caught.
    name = output.part_names()[-1]  # the new part: numbered after the old one
    part = zarr.open_group(output.path / LEDGER / name, mode="a", use_consolidated=False)
    part.attrs["num_fields"] = ["value", "max_violation", "gap", "seconds", "upper", "lower"]
    with pytest.raises(CorruptOutputError, match="checksum mismatch"):
        output.read_part(name)
