"""Rectangular runs (``against=``): one selection against another, in the same store or in
another store with the same stimuli."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
from click.testing import CliRunner

import smd_dist
from smd_dist import metrics
from smd_dist.cli import main
from smd_dist.config import ConfigError
from smd_dist.engine import (
    InputError,
    RunReport,
    assembly,
    compute_distances,
    output_status,
    plan_run,
    planning,
    run,
    tasks,
    worker_cache,
)
from smd_dist.engine.output import IncompatibleOutputError, ResultsOutput, open_distances
from smd_dist.store import ActivationStore

M = 24
MODELS = {"net-a/conv1": 6, "net-a/fc": 9, "net-b/conv1": 6, "net-b/fc": 4}
# "net-a/conv1" here is another array than the models store's: two stores, one rep id.
AREAS = {"brain/V1": 7, "brain/IT": 5, "net-a/conv1": 6}
STIMULI = [f"img{i:03d}" for i in range(M)]


def make_store(path, widths, *, seed, stimuli=STIMULI):
    rng = np.random.default_rng(seed)
    store = ActivationStore(path, mode="a")
    if stimuli is not None:
        store.set_stimuli(stimuli)
    latent = rng.standard_normal((len(stimuli or STIMULI), 4))
    for rep, width in widths.items():
        model, layer = rep.split("/", 1)
        noise = rng.standard_normal((latent.shape[0], width))
        store.write(model, layer, latent @ rng.standard_normal((4, width)) + 0.5 * noise)
    return store


@pytest.fixture
def models(tmp_path):
    return make_store(tmp_path / "models", MODELS, seed=1)


@pytest.fixture
def brain(tmp_path):
    return make_store(tmp_path / "brain", AREAS, seed=2)


def read(store, rep_id):
    return store.read(*rep_id.split("/", 1)).astype(np.float64)


def exact_distance(xa, xb):
    """The soft matching distance by POT's network simplex, independently of smd-dist."""
    xa, xb = xa - xa.mean(0), xb - xb.mean(0)
    na, nb = xa.shape[1], xb.shape[1]
    cost = ot.dist(xa.T, xb.T)
    return math.sqrt(ot.emd2(np.full(na, 1 / na), np.full(nb, 1 / nb), cost, numItermax=10**9))


def test_models_against_another_store_equal_the_pair_functions(models, brain, client, tmp_path):
    report = RunReport(0, 0, 0)
    ds = compute_distances(models, against=brain, output=tmp_path / "out", client=client,
                           progress=False, report=report)
    d = ds["soft_matching"]
    assert d.dims == ("rep_a", "rep_b")
    assert list(d.rep_a.values) == list(MODELS) and list(d.rep_b.values) == list(AREAS)
    assert report.n_pairs == report.n_computed == 12 and report.failed == []
    for a in MODELS:
        for b in AREAS:
            xa, xb = read(models, a), read(brain, b)
            # Solved with the rep whose id sorts first as the first argument, in any run.
            first = (xa, xb) if a < b else (xb, xa)
            assert d.sel(rep_a=a, rep_b=b).item() == smd_dist.soft_matching_distance(*first)
            assert d.sel(rep_a=a, rep_b=b).item() == pytest.approx(exact_distance(xa, xb),
                                                                   rel=1e-9)
    # The same id in both stores: two reps, each read from its own store.
    same_id = d.sel(rep_a="net-a/conv1", rep_b="net-a/conv1").item()
    assert same_id > 0.1
    assert ds["soft_matching_solver"].sel(rep_a="net-a/conv1", rep_b="net-a/conv1") != "identity"
    assert ds["model_b"].values.tolist() == ["brain", "brain", "net-a"]
    assert ds["layer_b"].values.tolist() == ["V1", "IT", "conv1"]
    assert ds["layer_index_b"].values.tolist() == [0, 1, 0]
    assert ds["n_neurons_b"].values.tolist() == [7, 5, 6]
    assert ds["layer_index_a"].values.tolist() == [0, 1, 0, 1]
    assert ds["n_neurons_a"].values.tolist() == [6, 9, 6, 4]
    assert ds.attrs["against_store"] == brain.path
    assert json.loads(ds.attrs["against_hashes"])["net-a/conv1"] == brain.record(
        "net-a", "conv1").content_hash
    assert json.loads(ds.attrs["store_hashes"])["net-a/conv1"] == models.record(
        "net-a", "conv1").content_hash
    opened = open_distances(tmp_path / "out")
    np.testing.assert_array_equal(opened["soft_matching"].values, d.values)
    assert list(opened.rep_b.values) == list(AREAS)


def test_the_worker_cache_tells_two_stores_apart(models, brain):
    """Two stores may both hold "net-a/conv1": their sources, the worker cache's keys,
    differ, and each reads its own store's values."""
    rect = run.rectangle(models, models.list(),
                         run.resolve_against(models, {"store": str(brain.path)}))
    sources = run._sources(rect.stores, rect.reps, ["{}"])
    same_id = [s for s in sources if s.rep_id == "net-a/conv1"]
    assert len(same_id) == 2 and same_id[0] != same_id[1] and len(set(same_id)) == 2
    worker_cache.clear()
    try:
        values = [tasks._prepared(s, 0.25)["{}"] for s in same_id]
        assert worker_cache.stats()["made"] >= 2
        assert not np.array_equal(values[0].columns, values[1].columns)
    finally:
        worker_cache.clear()


def test_overlapping_selections_of_one_store_compute_each_pair_once(models, client, tmp_path):
    report = RunReport(0, 0, 0)
    ds = compute_distances(models, reps=["net-a"], against=["net-a/fc", "net-b/*"],
                           output=tmp_path / "out", client=client, progress=False,
                           report=report)
    d = ds["soft_matching"]
    assert list(d.rep_a.values) == ["net-a/conv1", "net-a/fc"]
    assert list(d.rep_b.values) == ["net-a/fc", "net-b/conv1", "net-b/fc"]
    # 2 x 3 cells: net-a/fc against itself is no pair, the rest are 5 distinct pairs.
    assert report.n_pairs == report.n_computed == 5
    assert d.sel(rep_a="net-a/fc", rep_b="net-a/fc").item() == 0.0
    assert ds["soft_matching_solver"].sel(rep_a="net-a/fc", rep_b="net-a/fc") == "identity"
    records = ResultsOutput(tmp_path / "out").read().records
    assert len(records) == 5
    square = compute_distances(models, client=client, progress=False)["soft_matching"]
    for a in d.rep_a.values:
        for b in d.rep_b.values:
            assert d.sel(rep_a=a, rep_b=b).item() == square.sel(rep_a=a, rep_b=b).item()


def test_other_stimuli_are_refused_before_anything_runs(models, tmp_path, client):
    shuffled = make_store(tmp_path / "shuffled", AREAS, seed=2, stimuli=STIMULI[::-1])
    fewer = make_store(tmp_path / "fewer", AREAS, seed=2, stimuli=STIMULI[:-2])
    unnamed = make_store(tmp_path / "unnamed", AREAS, seed=2, stimuli=None)
    cases = [
        (shuffled, rf"differ at row 0: 'img000' in {models.path!r}, 'img023' in "
                   rf"{shuffled.path!r} \(24 of 24 rows differ\)"),
        (fewer, f"store {models.path!r} has 24 stimuli, store {fewer.path!r} has 22"),
        (unnamed, f"store {unnamed.path!r} records none"),
    ]
    for other, message in cases:
        for call in (compute_distances, plan_run):
            with pytest.raises(InputError, match=message) as err:
                kwargs = {"client": client, "progress": False} if call is compute_distances else {}
                call(models, against={"store": str(other.path), "reps": ["brain/*"]},
                     output=tmp_path / "out", **kwargs)
            assert f"net-a/conv1, net-a/fc, net-b/conv1, net-b/fc (store {models.path!r})" in str(
                err.value)
            assert "brain/V1, brain/IT in store" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("against", "error", "message"),
    [
        ({"store": "x", "rep": ["a"]}, ConfigError, "did you mean 'reps'"),
        ({"reps": [1]}, ConfigError, "against\\['reps'\\] must be a pattern"),
        (3, ConfigError, "against must be rep patterns"),
        (["nowhere/*"], InputError, "against: rep pattern 'nowhere/\\*' matches no"),
        ("net-a/conv1", InputError, "holds no pair"),
    ],
)
def test_bad_against_is_refused(models, client, tmp_path, against, error, message):
    with pytest.raises(error, match=message):
        compute_distances(models, reps="net-a/conv1", against=against,
                          output=tmp_path / "out", client=client, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_store_path_given_as_a_pattern_gets_a_hint(models, brain, client):
    with pytest.raises(InputError, match=r"give against=\{'store': "):
        compute_distances(models, against=str(brain.path), client=client, progress=False)
    ds = compute_distances(models, against=Path(brain.path), client=client, progress=False)
    assert list(ds.rep_b.values) == list(AREAS)


def test_resume_extends_the_rectangle_and_refuses_another_against(models, brain, client,
                                                                   tmp_path):
    out = tmp_path / "out"
    first = compute_distances(models, against={"store": str(brain.path), "reps": "brain"},
                              output=out, client=client, progress=False)
    report = RunReport(0, 0, 0)
    again = compute_distances(models, against={"store": str(brain.path), "reps": "brain"},
                              output=out, client=client, progress=False, report=report)
    assert report.n_computed == 0 and report.n_done_before == 8
    assert again["soft_matching"].values.tobytes() == first["soft_matching"].values.tobytes()
    plan = plan_run(models, against=brain, output=out)
    assert (plan.n_pairs, plan.n_done, plan.n_todo) == (12, 8, 4)
    assert plan.against == brain.path and plan.against_reps == tuple(AREAS)
    report = RunReport(0, 0, 0)
    wider = compute_distances(models, against=brain, output=out, client=client,
                              progress=False, report=report)
    assert report.n_computed == 4 and not np.isnan(wider["soft_matching"].values).any()
    status = output_status(out)
    assert status["pairs_total"] == 12 and status["pairs_with_results"] == 12
    assert status["against"] == {"store": brain.path, "reps": list(AREAS)}
    header = ResultsOutput(out).header()
    assert header["reps"] == list(MODELS) and header["against"]["reps"] == list(AREAS)
    other = make_store(tmp_path / "other", AREAS, seed=3)
    for against, asked in ((other, f"a run against the store {other.path!r}"),
                           (None, "an all-pairs run"),
                           (["net-b/*"], "a run against reps of its own store")):
        with pytest.raises(IncompatibleOutputError, match=asked):
            compute_distances(models, against=against, output=out, client=client,
                              progress=False)
        assert plan_run(models, against=against, output=out).output_state.startswith(
            "incompatible")
    square = tmp_path / "square"
    compute_distances(models, output=square, client=client, progress=False)
    with pytest.raises(IncompatibleOutputError, match="written by an all-pairs run"):
        compute_distances(models, against=brain, output=square, client=client, progress=False)


def test_failures_metric_options_and_dropped_neurons_work_for_the_rectangle(
    models, tmp_path, client, monkeypatch
):
    dead = np.random.default_rng(5).standard_normal((M, 6))
    dead[:, 2] = 0.0
    areas = make_store(tmp_path / "areas", {"brain/V1": 7}, seed=4)
    areas.write("brain", "dead", dead)
    real = metrics.get("soft_matching")

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def compute(self, xa, xb, **kw):
            if xa.shape[1] == 7 or xb.shape[1] == 7:
                raise RuntimeError("injected failure")
            return real.compute(xa, xb, **kw)

    get = metrics.get
    monkeypatch.setattr(tasks.metric_registry, "get",
                        lambda name: Flaky() if name == "soft_matching" else get(name))
    kwargs = {"against": areas, "output": tmp_path / "out", "client": client,
              "progress": False, "metrics": ["soft_matching", "soft_matching_score"],
              "normalize": "unit", "constant_neurons": "drop"}
    report = RunReport(0, 0, 0)
    ds = compute_distances(models, reps="net-a", report=report, **kwargs)
    assert report.failed == [
        "net-a/conv1 vs brain/V1 (soft_matching): RuntimeError: injected failure",
        "net-a/fc vs brain/V1 (soft_matching): RuntimeError: injected failure",
    ]
    assert ds.attrs["n_failed_pairs"] == 2
    assert ds["n_constant_dropped_b"].values.tolist() == [0, 1]
    assert ds["n_constant_dropped_a"].values.tolist() == [0, 0]
    xa, xb = read(models, "net-a/fc"), read(areas, "brain/dead")
    assert ds["soft_matching_score"].sel(rep_a="net-a/fc", rep_b="brain/dead").item() == (
        smd_dist.soft_matching_score(xb[:, [0, 1, 3, 4, 5]], xa))
    monkeypatch.undo()
    report = RunReport(0, 0, 0)
    ds = compute_distances(models, reps="net-a", report=report, **kwargs)
    assert report.n_computed == 2 and report.failed == []
    assert ds["n_constant_dropped_b"].values.tolist() == [0, 1]
    assert not np.isnan(ds["soft_matching"].values).any()


def test_a_url_store_with_storage_options_can_be_the_other_store(models, brain, client):
    url = ActivationStore(f"file://{brain.path}", mode="r",
                          storage_options={"auto_mkdir": False})
    by_url = compute_distances(models, against=url, client=client, progress=False)
    by_path = compute_distances(models, against=brain, client=client, progress=False)
    assert by_url.attrs["against_store"] == f"file://{brain.path}"
    assert by_url["soft_matching"].values.tobytes() == by_path["soft_matching"].values.tobytes()
    rect = run.rectangle(models, models.list(), run.resolve_against(models, url))
    options = {s.storage_options for s in run._sources(rect.stores, rect.reps, ["{}"])}
    assert options == {"", '{"auto_mkdir": false}'}


def test_blocks_over_a_rectangle_cover_each_pair_once():
    rows, cols = np.arange(40), np.arange(30, 52)  # ten reps on both sides
    wanted = assembly.wanted_pairs(52, rows, cols)
    a, b = assembly.pending_pairs(np.eye(52, dtype=bool), wanted)
    assert a.size == 40 * 22 - 10 - 45  # cells, less the diagonal, less pairs met twice
    widths = np.random.default_rng(0).integers(4, 300, size=52)
    blocks = planning.plan_blocks(widths, a, b, task_entries=20_000, max_pairs=64, min_tasks=4)
    got = np.concatenate([np.stack([blk.a, blk.b], 1) for blk in blocks])
    assert sorted(map(tuple, got.tolist())) == sorted(zip(a.tolist(), b.tolist(), strict=True))


def test_the_cli_runs_a_config_with_against(models, brain, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"store: {models.path}\noutput: out\nreps: [net-b]\n"
        "against: {store: brain, reps: ['brain/*']}\n"
        "cluster: {kind: local, worker-processes: false, n-workers: 1}\n"
    )
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"against   2 in {brain.path}: brain/V1, brain/IT" in result.output
    assert "pairs     4: 0 already done, 4 to compute" in result.output
    result = runner.invoke(main, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "4 pairs of 2 reps against 2" in result.output
    result = runner.invoke(main, ["run", str(cfg), "--no-progress", "--against", "net-a"])
    assert result.exit_code == 0, result.output
    assert "2 pairs of 2 reps against 1: 0 already done, 2 computed" in result.output
    assert list(open_distances(tmp_path / "out").rep_b.values) == ["net-a/conv1"]
    result = runner.invoke(main, ["status", str(tmp_path / "out")])
    assert f"against     1 reps in {brain.path}" in result.output, result.output
    result = runner.invoke(main, ["plot", str(tmp_path / "out"), str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["soft_matching_heatmap.png"]
    result = runner.invoke(main, ["plot", str(tmp_path / "out"), str(tmp_path / "figs"),
                                  "--kind", "mds"])
    assert result.exit_code == 2 and "not a rectangle" in result.output, result.output
    same = tmp_path / "same.yaml"
    same.write_text(f"store: {models.path}\noutput: same\nreps: [net-a]\nagainst: [net-b/fc]\n"
                    "cluster: {kind: local, worker-processes: false, n-workers: 1}\n")
    result = runner.invoke(main, ["run", str(same), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 pairs of 2 reps against 1" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("against: {store: b, rep: [x]}\n", "unknown key 'rep' in run config"),
        ("against: {store: [b]}\n", "against.store must be a store path or URL"),
        ("against: {reps: [1]}\n", "against.reps must be a pattern or a list of patterns"),
        ("against: 3\n", "'against' must be a string or a list or a mapping or null"),
        ("against: [brain/*]\n", "against: rep pattern 'brain/*' matches no representation"),
        ("against: {store: nowhere}\n", "no activation store"),
    ],
)
def test_cli_refuses_a_bad_against_with_exit_2(models, tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"store: {models.path}\noutput: out\n{text}")
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["run", str(cfg), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_pairwise_against_equals_the_pair_functions():
    rng = np.random.default_rng(3)
    reps = {f"net/l{i}": rng.standard_normal((M, 5 + i)) for i in range(3)}
    areas = {"V1": rng.standard_normal((M, 4)), "net/l1": rng.standard_normal((M, 6))}
    d = smd_dist.pairwise(reps, against=areas)
    assert d.dims == ("rep_a", "rep_b") and d.shape == (3, 2)
    assert list(d.rep_b.values) == ["V1", "net/l1"]
    assert d["n_neurons_b"].values.tolist() == [4, 6]
    for a in reps:
        for b in areas:
            assert d.sel(rep_a=a, rep_b=b).item() == smd_dist.soft_matching_distance(
                reps[a], areas[b])
    # The same array under the same name on both sides is one rep.
    shared = smd_dist.pairwise(reps, "soft_matching_score", against={"net/l1": reps["net/l1"]})
    assert shared.sel(rep_a="net/l1").item() == 1.0
    assert shared.sel(rep_a="net/l0").item() == smd_dist.soft_matching_score(
        reps["net/l0"], reps["net/l1"])
    with pytest.raises(ConfigError, match="against must be a non-empty mapping"):
        smd_dist.pairwise(reps, against={})
    with pytest.raises(ValueError, match="stimulus count mismatch"):
        smd_dist.pairwise(reps, against={"V1": rng.standard_normal((M + 1, 4))})
