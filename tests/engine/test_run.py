"""The all-pairs engine on a tiny store and an in-process Dask cluster."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import ot
import pytest
import xarray as xr
from click.testing import CliRunner

import smd_dist
from smd_dist import metrics
from smd_dist.cli import main
from smd_dist.config import ConfigError
from smd_dist.engine import (
    InputError,
    OutputLockedError,
    RunReport,
    compute_distances,
    planning,
    run,
    selection,
    settings,
    tasks,
)
from smd_dist.engine.output import IncompatibleOutputError, OutputError, open_distances
from smd_dist.store import ActivationStore

WIDTHS = {"net-a/conv.1": 6, "net-a/conv.2": 9, "net-b/features/0": 6, "net-b/fc": 12}
M = 30


def make_store(path, widths=WIDTHS, seed=0):
    rng = np.random.default_rng(seed)
    store = ActivationStore(path, mode="a")
    latent = rng.standard_normal((M, 5))
    for rep, width in widths.items():
        model, layer = rep.split("/", 1)
        weights = rng.standard_normal((5, width))
        store.write(model, layer, latent @ weights + 0.3 * rng.standard_normal((M, width)))
    return store


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


def test_matrix_matches_kernel_and_independent_ot(store, client, tmp_path):
    ds = compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    d = ds["soft_matching"]
    ids = list(WIDTHS)
    assert list(d.rep_a.values) == ids  # the store's order: as written, not by name
    np.testing.assert_array_equal(d.values, d.values.T)
    assert np.all(np.diag(d.values) == 0)
    for a in ids:
        for b in ids:
            if a >= b:
                continue
            xa = store.read(*a.split("/", 1)).astype(np.float64)
            xb = store.read(*b.split("/", 1)).astype(np.float64)
            assert d.sel(rep_a=a, rep_b=b).item() == smd_dist.soft_matching_distance(xa, xb)
            xa, xb = xa - xa.mean(0), xb - xb.mean(0)
            cost = ot.dist(xa.T, xb.T)
            na, nb = xa.shape[1], xb.shape[1]
            exact = ot.emd2(np.full(na, 1 / na), np.full(nb, 1 / nb), cost, numItermax=10**9)
            assert d.sel(rep_a=a, rep_b=b).item() == pytest.approx(math.sqrt(exact), rel=1e-9)
    assert ds["n_neurons_a"].sel(rep_a="net-b/fc").item() == 12
    assert ds["model_b"].sel(rep_b="net-b/features/0").item() == "net-b"
    assert ds["layer_b"].sel(rep_b="net-b/features/0").item() == "features/0"
    assert set(json.loads(ds.attrs["store_hashes"])) == set(ids)
    assert json.loads(ds.attrs["preprocessing"]) == {"center": True, "normalize": None}
    assert ds.attrs["n_failed_pairs"] == 0
    json.dumps(ds.attrs)
    opened = open_distances(tmp_path / "out")
    xr.testing.assert_identical(opened["soft_matching"], d)
    plain = xr.open_zarr(tmp_path / "out", consolidated=False)
    np.testing.assert_array_equal(plain["soft_matching"].values, d.values)
    opened.to_netcdf(tmp_path / "out.nc", engine="h5netcdf")


def test_resume_computes_nothing_and_rerun_is_bit_identical(store, client, tmp_path):
    first = compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    report = RunReport(0, 0, 0)
    again = compute_distances(
        store, output=tmp_path / "out", client=client, progress=False, report=report
    )
    assert report.n_computed == 0 and report.n_done_before == 6
    np.testing.assert_array_equal(again["soft_matching"].values, first["soft_matching"].values)
    fresh = compute_distances(store, output=tmp_path / "other", client=client, progress=False)
    assert fresh["soft_matching"].values.tobytes() == first["soft_matching"].values.tobytes()


def test_new_reps_compute_only_new_pairs(store, client, tmp_path):
    compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    make_store(store.path, widths={"net-c/head": 7}, seed=5)
    report = RunReport(0, 0, 0)
    ds = compute_distances(
        store, output=tmp_path / "out", client=client, progress=False, report=report
    )
    assert report.n_pairs == 10 and report.n_done_before == 6 and report.n_computed == 4
    assert ds.sizes["rep_a"] == 5
    assert not np.isnan(ds["soft_matching"].values).any()


def test_each_rep_is_read_and_prepared_once_per_worker(store, client):
    from smd_dist.engine import worker_cache

    worker_cache.clear()
    before = worker_cache.stats()
    compute_distances(store, client=client, progress=False)
    after = worker_cache.stats()
    # The input check prepares each of the 4 reps once; the pair tasks find them kept.
    assert after["made"] - before["made"] == len(WIDTHS)
    assert after["hits"] - before["hits"] >= len(WIDTHS)
    worker_cache.clear()


def test_long_lived_objects_are_frozen_for_the_run_and_handed_back(store, client, monkeypatch):
    import gc

    assert gc.get_freeze_count() == 0
    seen = []
    real = run.dispatch.run_blocks

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(run.dispatch, "run_blocks", spy)
    compute_distances(store, client=client, progress=False)
    assert seen and seen[0] > 1000  # the scheduler's process skips them in full collections
    assert gc.get_freeze_count() == 0
    with run._gc_frozen():
        with run._gc_frozen():
            pass
        assert gc.get_freeze_count() > 0  # an inner run does not thaw an outer one
    assert gc.get_freeze_count() == 0


def test_a_prepared_rep_has_its_copies_last(tmp_path):
    from smd_dist.kernel.prepared import identical_columns, prepare

    rng = np.random.default_rng(3)
    x = rng.standard_normal((M, 10))
    x[:, [1, 6]] = 0.0  # dead units
    x[:, 8] = x[:, 2]  # a copy
    store = ActivationStore(tmp_path / "s", mode="a")
    store.write("net", "dup", x)
    record = store.record("net", "dup")
    prep = selection.prep_key({"center": True, "normalize": None})
    source = tasks.RepSource(str(store.path), "net", "dup", record.content_hash, (prep,))
    A = tasks.prepare_rep(source)[prep]
    assert not A.columns.flags.writeable and A.n_distinct == 8
    assert identical_columns(np.array(A.columns))[0].tolist() == list(range(8))  # a prefix
    y = rng.standard_normal((M, 7))
    direct = smd_dist.soft_matching_distance(store.read("net", "dup"), y)
    value = metrics.get("soft_matching").compute(A, prepare(y)).value
    assert value == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("threads", [1, 8])
def test_input_checks_are_submitted_widest_first_in_one_call(store, monkeypatch, threads):
    import distributed

    calls = []

    class Done:
        status = "finished"

        def __init__(self, batch):
            self.batch = batch

        def result(self):
            return [(None, 0)] * len(self.batch)  # no problem, no neuron dropped as constant

        def release(self):
            pass

    class Recorder:
        def map(self, func, batches, fractions, key):
            calls.append([[source.rep_id for source in batch] for batch in batches])
            return [Done(batch) for batch in batches]

        def gather(self, futures):
            return [future.result() for future in futures]

    monkeypatch.setattr(distributed, "wait", lambda futures: None)
    chosen = store.list()
    sources = run._sources(store, chosen, ["{}"])
    dropped = run._check_inputs(Recorder(), chosen, np.arange(len(chosen)), sources, token="t",
                                threads=threads)
    assert dropped == dict.fromkeys(range(len(chosen)), 0)
    (batches,) = calls
    width = {r.rep_id: r.n_neurons for r in chosen}
    order = [width[rep] for batch in batches for rep in batch]
    assert order == sorted(order, reverse=True) and len(order) == len(chosen)
    # Batches of about a quarter of a thread's share of the neurons (33 in all): with one
    # thread, at least 8.25 neurons each; with eight, one rep each.
    sizes = [[width[rep] for rep in batch] for batch in batches]
    assert sizes == ([[12], [9], [6], [6]] if threads == 8 else [[12], [9], [6, 6]])


def test_the_keep_budget_follows_the_workers_memory_limit(client):
    from smd_dist.engine import worker_cache

    limits = {w["id"]: w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
    seen = client.submit(worker_cache.memory_limit, pure=False).result()
    assert seen in limits.values() and seen > 0


def test_reps_too_big_to_keep_are_checked_then_read_again(store, client, monkeypatch):
    from smd_dist.engine import worker_cache

    kept = compute_distances(store, client=client, progress=False)
    monkeypatch.setattr(tasks, "KEEP_PREPARED_FRACTION", 0.0)
    before = worker_cache.stats()["made"]
    reread = compute_distances(store, client=client, progress=False)
    assert reread["soft_matching"].values.tobytes() == kept["soft_matching"].values.tobytes()
    # Nothing kept: each check reads its rep, and each pair task reads both of its own.
    assert worker_cache.stats()["made"] - before >= len(WIDTHS) + 2
    assert worker_cache.stats()["kept_bytes"] == 0
    bad = np.random.default_rng(1).standard_normal((M, 4))
    bad[:, 1] = 2.0
    store.write("net-c", "flat", bad)
    with pytest.raises(InputError, match=r"net-c/flat"):
        compute_distances(store, client=client, progress=False, normalize="zscore")


def test_selection_and_several_metrics_in_memory(store, client):
    ds = compute_distances(
        store,
        reps=["net-a", "net-b/fc"],
        client=client,
        progress=False,
        metrics=["soft_matching", "permutation", "linear_cka"],
    )
    assert list(ds.rep_a.values) == ["net-a/conv.1", "net-a/conv.2", "net-b/fc"]
    perm = ds["permutation"]
    assert math.isnan(perm.sel(rep_a="net-a/conv.1", rep_b="net-a/conv.2").item())
    assert (
        ds["permutation_solver"]
        .sel(rep_a="net-a/conv.1", rep_b="net-a/conv.2")
        .item()
        .startswith("undefined")
    )
    assert np.all(np.diag(ds["linear_cka"].values) == 1)
    assert ds.attrs["n_failed_pairs"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reps": ["net-z/*"]}, "matches no representation"),
        ({"reps": ["net-a/conv.1"]}, "at least 2"),
        ({"metrics": ["soft_matchng"]}, "soft_matching"),
    ],
)
def test_bad_selection_or_metric_is_refused(store, client, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_distances(store, client=client, progress=False, **kwargs)


def test_bad_rep_is_refused_before_any_pair(tmp_path, client):
    store = make_store(tmp_path / "store")
    bad = np.random.default_rng(1).standard_normal((M, 4))
    bad[:, 2] = 3.0
    store.write("net-c", "flat", bad)
    with pytest.raises(InputError, match=r"net-c/flat.*constant"):
        compute_distances(
            store, output=tmp_path / "out", client=client, progress=False, normalize="unit"
        )
    assert not len(smd_dist.engine.output.ResultsOutput(tmp_path / "out").read().records)


def test_failed_pair_is_recorded_and_retried_alone(store, client, tmp_path, monkeypatch):
    real = metrics.get("soft_matching")

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def compute(self, xa, xb, **kw):
            if xa.shape[1] == 12 or xb.shape[1] == 12:
                raise RuntimeError("injected failure")
            return real.compute(xa, xb, **kw)

    monkeypatch.setattr(
        tasks.metric_registry,
        "get",
        lambda name: Flaky() if name == "soft_matching" else metrics.get(name),
    )
    report = RunReport(0, 0, 0)
    ds = compute_distances(
        store, output=tmp_path / "out", client=client, progress=False, report=report
    )
    assert len(report.failed) == 3 and all("injected failure" in f for f in report.failed)
    assert (
        ds["soft_matching_error"]
        .sel(rep_a="net-a/conv.1", rep_b="net-b/fc")
        .item()
        .startswith("RuntimeError")
    )
    assert not np.isnan(ds["soft_matching"].sel(rep_a="net-a/conv.1", rep_b="net-a/conv.2"))
    monkeypatch.undo()
    report = RunReport(0, 0, 0)
    ds = compute_distances(
        store, output=tmp_path / "out", client=client, progress=False, report=report
    )
    assert report.n_computed == 3 and report.failed == []
    assert not np.isnan(ds["soft_matching"].values).any()


def test_incompatible_output_is_refused(store, client, tmp_path):
    compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    with pytest.raises(IncompatibleOutputError, match="normalize"):
        compute_distances(
            store, output=tmp_path / "out", client=client, progress=False, normalize="zscore"
        )


def dead_store(path):
    """The tiny store with dead units (constant neurons) in two reps."""
    store = make_store(path)
    dead = np.random.default_rng(2).standard_normal((M, 7))
    dead[:, [1, 4]] = 0.0
    dead[:, 6] = 1.5
    store.write("net-c", "relu", dead)
    half = np.random.default_rng(3).standard_normal((M, 5))
    half[:, 0] = 0.0
    store.write("net-d", "relu", half)
    return store


def test_the_score_drops_constant_neurons_when_asked_and_records_how_many(tmp_path, client):
    store = dead_store(tmp_path / "store")
    with pytest.raises(InputError, match=r"net-c/relu.*constant_neurons='drop'"):
        compute_distances(store, metrics=["soft_matching_score"], client=client, progress=False)
    out = tmp_path / "out"
    ds = compute_distances(
        store,
        metrics=["soft_matching_score", "soft_matching"],
        output=out,
        client=client,
        progress=False,
        constant_neurons="drop",
    )
    assert ds.attrs["n_failed_pairs"] == 0
    counts = dict(zip(ds.rep_a.values, ds.n_constant_dropped_a.values.tolist(), strict=True))
    assert counts == {r: 0 for r in WIDTHS} | {"net-c/relu": 3, "net-d/relu": 1}
    assert ds.n_constant_dropped_b.values.tolist() == ds.n_constant_dropped_a.values.tolist()
    a, b = store.read("net-c", "relu"), store.read("net-d", "relu")
    score = ds["soft_matching_score"].sel(rep_a="net-c/relu", rep_b="net-d/relu").item()
    assert score == pytest.approx(
        smd_dist.soft_matching_score(a, b, constant_neurons="drop"), rel=1e-12
    )
    # every metric sees the same neurons: the distance too is on the live ones
    distance = ds["soft_matching"].sel(rep_a="net-c/relu", rep_b="net-d/relu").item()
    live = [np.delete(a, [1, 4, 6], axis=1), np.delete(b, 0, axis=1)]
    assert distance == pytest.approx(smd_dist.soft_matching_distance(*live), rel=1e-12)
    assert json.loads(ds.attrs["preprocessing"])["constant_neurons"] == "drop"

    # resumed with nothing to do: the counts are still known
    again = compute_distances(
        store,
        metrics=["soft_matching_score", "soft_matching"],
        output=out,
        client=client,
        progress=False,
        constant_neurons="drop",
    )
    assert again.n_constant_dropped_a.values.tolist() == ds.n_constant_dropped_a.values.tolist()
    assert open_distances(out).n_constant_dropped_b.values.tolist() == list(counts.values())
    # an output keeps the setting it was made with
    with pytest.raises(IncompatibleOutputError, match="constant_neurons"):
        compute_distances(store, metrics=["soft_matching"], output=out, client=client,
                          progress=False)
    with pytest.raises(ConfigError, match="'refuse' or 'drop'"):
        compute_distances(store, client=client, progress=False, constant_neurons="keep")


def test_default_preprocessing_keys_are_unchanged(store, client, tmp_path):
    """Outputs made before constant_neurons existed stay resumable: the default adds no key."""
    ds = compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    assert json.loads(ds.attrs["preprocessing"]) == {"center": True, "normalize": None}
    assert "n_constant_dropped_a" not in ds.coords
    assert smd_dist.config.get("preprocessing.constant_neurons") == "refuse"


def test_cli_run_config_drops_constant_neurons(tmp_path):
    store = dead_store(tmp_path / "store")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"store: {store.path}\noutput: out\nmetrics: [soft_matching_score]\n"
        "preprocessing: {constant_neurons: drop}\ncluster: {kind: local, n-workers: 1}\n"
    )
    result = CliRunner().invoke(main, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    ds = open_distances(tmp_path / "out")
    assert ds.n_constant_dropped_a.sel(rep_a="net-c/relu").item() == 3


def test_second_run_on_a_locked_output_is_refused(store, client, tmp_path):
    with run._output_lock(tmp_path / "out"):
        with pytest.raises(OutputLockedError, match="another run"):
            compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    compute_distances(store, output=tmp_path / "out", client=client, progress=False)


def test_unwritable_or_full_output_is_refused_before_compute(store, client, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="not writable"):
        compute_distances(store, output=blocker / "out", client=client, progress=False)

    class Usage:
        free = 1000

    monkeypatch.setattr(run.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(OutputError, match="MiB free"):
        compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    assert not (tmp_path / "out").exists()


def test_too_wide_pair_is_refused_with_remedies(store, client, monkeypatch):
    monkeypatch.setattr(planning, "pair_memory_bytes", lambda m, a, b: 10**15)
    with pytest.raises(InputError, match="pooling"):
        compute_distances(store, client=client, progress=False)


def test_a_pair_must_fit_in_a_worker_threads_share_of_memory(store, client, monkeypatch):
    worker = next(iter(client.scheduler_info()["workers"].values()))
    limit, threads = worker["memory_limit"], worker["nthreads"]
    assert threads == 2
    need = int(0.5 * limit)  # fits the process, not two pairs solved at once by its threads
    monkeypatch.setattr(planning, "pair_memory_bytes", lambda m, a, b: need)
    with pytest.raises(InputError, match=rf"worker threads have {limit / 2 / 2**30:.2f} GiB"):
        compute_distances(store, client=client, progress=False)


def test_the_memory_check_takes_the_pair_that_needs_the_most_not_the_widest():
    """Just below the blocked path's threshold a pair needs more than one just above it."""
    from types import SimpleNamespace

    class Client:
        def scheduler_info(self):
            return {"workers": {"w": {"memory_limit": 150 * 2**20, "nthreads": 1}}}

    chosen = [SimpleNamespace(rep_id=f"m/{w}", n_neurons=w) for w in (2047, 2048, 2048)]
    store = SimpleNamespace(n_stimuli=100)
    a, b = np.array([0, 1]), np.array([1, 2])
    assert planning.pair_memory_bytes(100, 2047, 2048) > planning.pair_memory_bytes(
        100, 2048, 2048
    )
    with pytest.raises(InputError, match="pair m/2047 "):
        run._check_memory(Client(), store, chosen, a, b)


def test_cli_run_and_status(store, tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"store: {store.path}\noutput: out\nmetrics: [soft_matching, linear_cka]\n"
        "cluster: {kind: local, n-workers: 1}\n"
    )
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pairs     6: 0 already done, 6 to compute" in result.output
    assert "largest pair (net-a/conv.2 vs net-b/fc)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "store"]
    result = runner.invoke(main, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "6 pairs of 4 reps" in result.output
    result = runner.invoke(main, ["status", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "6 of 6 have results" in result.output and "failed      0" in result.output
    ds = open_distances(tmp_path / "out")
    assert set(json.loads(ds.attrs["metrics"])) == {"soft_matching", "linear_cka"}
    # --reps and --output replace the config's; --output is taken from where one stands.
    monkeypatch.chdir(tmp_path)
    args = ["run", str(cfg), "--no-progress", "--reps", "net-b", "--reps", "net-a/conv.1",
            "--output", "elsewhere"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 pairs of 3 reps" in result.output
    assert list(open_distances(tmp_path / "elsewhere").rep_a.values) == [
        "net-a/conv.1", "net-b/features/0", "net-b/fc"]
    result = runner.invoke(main, ["run", str(cfg), "--dry-run", "--output", "elsewhere"])
    assert "pairs     6: 3 already done, 3 to compute" in result.output, result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("store: s\noutput: o\nmetrcs: [soft_matching]\n", "metrics"),
        ("store: [unclosed\n", "not valid YAML"),
        ("store: s\noutput: o\nengine: {flush-secnds: 1}\n", "did you mean 'flush-seconds'"),
        (
            "store: s\noutput: o\nengine: {task-entries: -1}\n",
            "'task-entries' must be an integer >= 0, got -1",
        ),
        ("store: s\noutput: o\npreprocessing: {normalize: zcore}\n", "did you mean 'zscore'"),
        ("store: s\noutput: o\npreprocessing: {centre: true}\n", "did you mean 'center'"),
        ("store: s\noutput: o\ncluster: {kind: local, n-wrkers: 1}\n", "'n-workers'"),
        ("store: s\noutput: o\nresume: yes please\n", "'resume' must be true or false"),
        ("store: s\noutput: o\nmetrics: soft_matching, linear_cka\n", "unknown metric"),
        ("store: s\noutput: o\nreps: [1, 2]\n", "'reps' must be a list of strings"),
        ("store: s\noutput: o\ndevice: gpu\n", "device must be null, 'cpu', 'cuda'"),
        ("store: nowhere\noutput: o\n", "no activation store"),
    ],
)
def test_cli_run_reports_config_errors(tmp_path, store, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text.replace("store: s\n", f"store: {store.path}\n"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["run", str(cfg), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.startswith("smd-dist: error: ")
        assert len(result.output.splitlines()) <= 5 and "Traceback" not in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_engine_settings_take_env_spelling_and_run_config_over_defaults():
    import subprocess
    import sys

    import dask.config

    from smd_dist.config import ConfigError

    defaults = settings.engine_settings()
    assert defaults["flush-seconds"] == 2.0 and defaults["task-entries"] == 2**21
    # An environment variable reaches dask.config spelt with "_" (read at import).
    read = "from smd_dist.engine.settings import engine_settings as s; print(s()['flush-seconds'])"
    env = {**os.environ, "DASK_SMD_DIST__ENGINE__FLUSH_SECONDS": "0.5"}
    out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0.5", out.stderr
    with dask.config.set({"smd-dist.engine.flush-seconds": 0.5}):
        assert settings.engine_settings()["flush-seconds"] == 0.5
        # a run config's engine: section wins over the config
        over = settings.engine_settings({"flush_seconds": 3, "task-entries": 0})
        assert over["flush-seconds"] == 3.0 and over["task-entries"] == 0
    # a config whose engine mapping lost keys still gets the package's defaults
    with dask.config.set({"smd-dist.engine": {"wave-size": 8}}):
        assert settings.engine_settings() == {**defaults, "wave-size": 8}
    for bad in ({"flush-seconds": 0}, {"wave-size": 0}, {"max-pairs-per-task": 1.5},
                {"task-entries": True}, "fast", {"flush-seconds": 1, "flush_seconds": 2}):
        with pytest.raises(ConfigError, match="engine setting"):
            settings.engine_settings(bad)


def test_blocks_cover_each_pair_once_largest_work_first():
    widths = np.array([300, 16, 2048, 8, 700, 16, 12, 1024])
    a, b = np.triu_indices(len(widths), 1)
    entries = 64 * 64
    blocks = planning.plan_blocks(widths, a, b, task_entries=entries, max_pairs=4)
    pairs = sorted((int(i), int(j)) for block in blocks
                   for i, j in zip(block.a, block.b, strict=True))
    assert pairs == sorted(zip(a.tolist(), b.tolist(), strict=True))
    work = [block.work for block in blocks]
    assert work == sorted(work, reverse=True)
    assert work == [int((widths[block.a] * widths[block.b]).sum()) for block in blocks]
    assert (blocks[0].a.tolist(), blocks[0].b.tolist()) == ([2], [7])
    # a pair of task_entries or more is alone; smaller ones are batched, at most max_pairs,
    # within task_entries
    alone = {(int(block.a[0]), int(block.b[0])) for block in blocks if len(block) == 1}
    assert {(i, j) for i, j in pairs if widths[i] * widths[j] >= entries} <= alone
    batches = [block for block in blocks if len(block) > 1]
    assert batches and max(len(block) for block in batches) == 4
    assert all(block.work <= entries for block in batches)
    # task_entries=0: one pair per block
    assert all(len(block) == 1 for block in
               planning.plan_blocks(widths, a, b, task_entries=0, max_pairs=4))


def test_blocks_are_tiles_of_few_reps():
    widths = np.full(30, 8)
    a, b = np.triu_indices(30, 1)
    blocks = planning.plan_blocks(widths, a, b, task_entries=64 * 10, max_pairs=100)
    # Bands of 3 reps (25 neurons: a band against a band is about 640 entries): each block
    # is one tile, 3 pairs on the diagonal, 9 off it, so it reads and keeps 6 reps, where 9
    # pairs in matrix order (one row) would touch 10.
    assert sorted(len(block) for block in blocks) == [3] * 10 + [9] * 45
    assert max(block.reps.size for block in blocks) == 6
    # At least min_tasks blocks, so that every worker thread has work.
    assert len(planning.plan_blocks(widths, a, b, task_entries=10**9, max_pairs=10**6,
                                    min_tasks=8)) >= 8
    assert planning.plan_blocks(widths, a[:0], b[:0], task_entries=64, max_pairs=4) == []


# --- order, early refusals, --fresh, the lock, the user's client, dry runs ------------------


def test_the_matrix_keeps_depth_order_with_a_layer_index(tmp_path, client):
    from smd_dist import analysis

    depth = ["relu1", "layer.2", "layer.10", "out"]  # by name: layer.10, layer.2, out, relu1
    store = make_store(
        tmp_path / "store",
        widths={f"{m}/{layer}": 5 for m in ("net-z", "net-a") for layer in depth},
    )
    ds = compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    written = [f"{m}/{layer}" for m in ("net-z", "net-a") for layer in depth]
    assert list(ds.rep_a.values) == written and list(ds.rep_b.values) == written
    assert ds["layer_index_a"].values.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    opened = open_distances(tmp_path / "out")
    assert list(opened.rep_a.values) == written
    assert opened["layer_index_b"].values.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    picked = analysis.select(opened, models="net-a", layers=["out", "layer.*"])
    assert list(picked.rep_a.values) == ["net-a/layer.2", "net-a/layer.10", "net-a/out"]
    assert picked["layer_index_a"].values.tolist() == [1, 2, 3]
    # Values do not depend on the order: each pair is solved in its key's order.
    xa, xb = store.read("net-z", "relu1"), store.read("net-a", "out")
    value = ds["soft_matching"].sel(rep_a="net-z/relu1", rep_b="net-a/out").item()
    assert value == smd_dist.soft_matching_distance(xb.astype(np.float64), xa.astype(np.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalize": "zcore"}, "normalize' must be null, 'unit' or 'zscore', got 'zcore'"),
        ({"center": "yes"}, "'center' must be true or false"),
        ({"device": "gpu"}, "device must be null, 'cpu', 'cuda'"),
        ({"cluster": {"kind": "local", "n-wrkers": 1}}, "did you mean 'n-workers'"),
        ({"cluster": {"kind": "lcoal"}}, "did you mean 'local'"),
        ({"engine": {"flush-secnds": 1}}, "did you mean 'flush-seconds'"),
        ({"metrics": ["soft_matchng"]}, "soft_matching"),
        ({"metrics": [3]}, "metrics must be a name or a list of names"),
        ({"reps": ["net-z/*"]}, "matches no representation"),
        ({"reps": 3}, "reps must be a pattern or a list"),
        ({"resume": "no"}, "'resume' must be true or false"),
        ({"fresh": 1}, "'fresh' must be true or false"),
        ({"output": "s3://bucket/out"}, "must be a local folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_cluster_or_file(
    store, tmp_path, monkeypatch, kwargs, match
):
    from smd_dist.engine import clusters

    def no_cluster(*args, **kw):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(clusters, "make_client", no_cluster)
    monkeypatch.setattr(run, "current_client", lambda: None)
    monkeypatch.chdir(tmp_path)
    kwargs = {"output": tmp_path / "out", **kwargs}
    with pytest.raises(ValueError, match=match):
        compute_distances(store, progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_no_lock_file_is_left_when_a_run_ends(store, client, tmp_path):
    out = tmp_path / "out"
    compute_distances(store, output=out, client=client, progress=False)
    assert not Path(f"{out}.lock").exists() and not Path(f"{out}.lock.json").exists()
    bad = np.random.default_rng(1).standard_normal((M, 4))
    bad[:, 2] = 3.0
    store.write("net-c", "flat", bad)  # the score refuses it on the workers, inside the lock
    with pytest.raises(InputError, match="net-c/flat"):
        compute_distances(store, output=out, client=client, progress=False,
                          metrics=["soft_matching_score"])
    assert not Path(f"{out}.lock").exists()
    with run._output_lock(out):
        assert Path(f"{out}.lock").exists()
        with pytest.raises(OutputLockedError):
            with run._output_lock(out):
                pass
        assert Path(f"{out}.lock").exists()  # the refused run took nothing away
    assert not Path(f"{out}.lock").exists()
    with run._output_lock(out):  # and it can be taken again
        pass


def test_fresh_discards_an_output_written_with_other_settings(store, client, tmp_path):
    out = tmp_path / "out"
    compute_distances(store, output=out, client=client, progress=False)
    with pytest.raises(IncompatibleOutputError, match="--fresh"):
        compute_distances(store, output=out, client=client, progress=False, normalize="zscore")
    report = RunReport(0, 0, 0)
    ds = compute_distances(store, output=out, client=client, progress=False,
                           normalize="zscore", fresh=True, report=report)
    assert report.n_done_before == 0 and report.n_computed == 6
    assert json.loads(ds.attrs["preprocessing"])["normalize"] == "zscore"
    x, y = store.read("net-a", "conv.1"), store.read("net-a", "conv.2")
    assert ds["soft_matching"].sel(rep_a="net-a/conv.1", rep_b="net-a/conv.2").item() == (
        smd_dist.soft_matching_distance(x.astype(np.float64), y.astype(np.float64),
                                        normalize="zscore")
    )
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an smd-dist output"):
        compute_distances(store, output=foreign, client=client, progress=False, fresh=True)
    assert (foreign / "mine.txt").read_text() == "keep"


def test_the_current_dask_client_is_used_and_progress_false_prints_nothing(
    store, client, tmp_path, monkeypatch, capfd
):
    from smd_dist.engine import clusters

    def no_cluster(*args, **kw):
        raise AssertionError("a cluster was started although a client exists")

    monkeypatch.setattr(clusters, "make_client", no_cluster)
    capfd.readouterr()
    ds = compute_distances(store, output=tmp_path / "out", progress=False)
    assert ds.attrs["n_failed_pairs"] == 0
    assert capfd.readouterr() == ("", "")


def test_progress_false_starts_a_cluster_without_a_word(store, tmp_path, monkeypatch, capfd):
    from distributed import LocalCluster

    from smd_dist.engine import clusters

    started = []

    def in_process(cfg, **kwargs):  # the cluster make_client would start, in this process
        started.append(cfg)
        return LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                            dashboard_address=":0")

    monkeypatch.setattr(clusters, "make_cluster", in_process)
    monkeypatch.setattr(run, "current_client", lambda: None)
    capfd.readouterr()
    compute_distances(store, cluster={"kind": "local", "n-workers": 1}, progress=False)
    assert started and capfd.readouterr() == ("", "")
    compute_distances(store, cluster={"kind": "local", "n-workers": 1}, progress=True)
    assert "smd-dist: local cluster, 1 worker" in capfd.readouterr().err


def test_plan_run_says_what_a_run_would_do_and_writes_nothing(store, client, tmp_path):
    out = tmp_path / "out"
    plan = run.plan_run(store, output=out, cluster={"kind": "local", "n-workers": 1})
    assert (plan.n_pairs, plan.n_done, plan.n_todo, plan.output_state) == (6, 0, 6, "new")
    assert plan.reps == tuple(WIDTHS) and plan.metrics == ("soft_matching",)
    assert plan.largest_pair == ("net-a/conv.2", "net-b/fc")
    assert plan.largest_pair_bytes == planning.pair_memory_bytes(M, 9, 12)
    assert plan.cluster["kind"] == "local" and plan.cluster["n-workers"] == 1
    assert "jobs" not in plan.cluster  # a SLURM key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    compute_distances(store, output=out, client=client, progress=False, reps=["net-a"])
    plan = run.plan_run(store, output=out)
    assert (plan.n_done, plan.n_todo, plan.output_state) == (1, 5, "resumes")
    assert run.plan_run(store, output=out, resume=False).n_todo == 6
    assert run.plan_run(store, output=out, normalize="unit").output_state.startswith(
        "incompatible: output"
    )
    assert run.plan_run(store, output=out, normalize="unit", fresh=True).n_todo == 6
    with pytest.raises(ValueError, match="zcore"):
        run.plan_run(store, output=out, normalize="zcore")


def test_plain_xr_open_zarr_opens_the_output_without_a_warning(store, client, tmp_path):
    import warnings

    ds = compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(tmp_path / "out")
    np.testing.assert_array_equal(plain["soft_matching"].values, ds["soft_matching"].values)
    assert list(plain["layer_index_a"].values) == [0, 1, 0, 1]


# --- safety on a shared file system -----------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://bucket/x.zarr", "memory://x.zarr"])
def test_a_url_output_is_refused_before_compute(store, client, tmp_path, monkeypatch, url):
    """Defect 5: a URL output used to write a local folder named 's3:' or 'memory:'."""
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    monkeypatch.setattr(run, "_check_inputs", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ValueError, match="is a URL|must be a local folder"):
        compute_distances(store, output=url, client=client, progress=False)
    assert set(os.listdir(tmp_path)) == before


def test_an_output_reached_through_a_link_shares_its_lock(store, client, tmp_path):
    """Defect 10: a second run through a symlink alias used to run at the same time."""
    real = tmp_path / "out"
    compute_distances(store, output=real, client=client, progress=False)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    with run._output_lock(real):
        with pytest.raises(OutputLockedError, match="another run"):
            compute_distances(store, output=alias, client=client, progress=False)
    ds = compute_distances(store, output=alias, client=client, progress=False)
    assert smd_dist.engine.output_status(alias)["pairs_with_results"] == 6
    assert ds.sizes["rep_a"] == 4


def test_files_beside_the_output_are_never_written_through_links(store, client, tmp_path):
    """Defect 10: the lock info and the write probe used to follow planted links."""
    victims = {name: tmp_path / f"victim-{name}" for name in ("info", "probe")}
    for victim in victims.values():
        victim.write_text("precious")
    (tmp_path / "out.lock.json").symlink_to(victims["info"])
    (tmp_path / f".smd-dist-write-test-{os.getpid()}").symlink_to(victims["probe"])
    compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    assert {n: v.read_text() for n, v in victims.items()} == {"info": "precious",
                                                             "probe": "precious"}
    assert not (tmp_path / "out.lock.json").exists()


def test_a_linked_lock_file_is_refused(store, client, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out.lock").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        compute_distances(store, output=tmp_path / "out", client=client, progress=False)
    assert victim.read_text() == "precious"


SECRETS = ("hunter2", "hf_abc123", "s3cr3t", "AKIA123", "tok123", "wandb-xyz")


def test_secrets_in_the_run_config_are_not_recorded(store, client, tmp_path):
    """Defect 9: tokens in a prologue and passwords in addresses used to be stored as is."""
    cfg = {
        "store": str(store.path),
        "cluster": {
            "kind": "slurm",
            "address": "tls://alice:hunter2@10.0.0.5:8786",
            "job-script-prologue": ["module load cuda", "export HF_TOKEN=hf_abc123"],
            "worker-extra-args": ["--lifetime", "55m", "--wandb-key", "wandb-xyz"],
        },
        "storage_options": {"key": "AKIA123", "secret": "s3cr3t", "anon": False},
        "api_token": "tok123",
    }
    ds = compute_distances(store, output=tmp_path / "out", client=client, progress=False,
                           run_config=cfg)
    for recorded in (ds.attrs["run_config"], open_distances(tmp_path / "out").attrs["run_config"]):
        assert not [s for s in SECRETS if s in recorded], recorded
        kept = json.loads(recorded)
        assert kept["cluster"]["address"] == "tls://alice:***@10.0.0.5:8786"
        assert kept["cluster"]["job-script-prologue"] == ["module load cuda",
                                                          "export HF_TOKEN=***"]
        assert kept["cluster"]["worker-extra-args"][:2] == ["--lifetime", "55m"]
        assert kept["storage_options"]["anon"] is False and kept["store"] == str(store.path)
    assert cfg["api_token"] == "tok123"  # the caller's config is left as it was


def test_a_url_store_reaches_the_workers_with_its_storage_options(store, tmp_path):
    """A store read through fsspec: the workers (other processes) open it with the same
    options; the matrix equals the one from the plain path."""
    from distributed import Client, LocalCluster

    url = ActivationStore(f"file://{store.path}", mode="r",
                          storage_options={"auto_mkdir": False})
    sources = run._sources(url, url.list(), ["{}"])
    assert {s.storage_options for s in sources} == {'{"auto_mkdir": false}'}
    assert "auto_mkdir" not in repr(sources[0])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        by_url = compute_distances(url, client=c, progress=False)
        by_path = compute_distances(store, client=c, progress=False)
    assert by_url["soft_matching"].values.tobytes() == by_path["soft_matching"].values.tobytes()
