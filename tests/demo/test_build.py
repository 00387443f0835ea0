"""The offline demo build (reduced size): layout, contents, and bit-identical rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from smd_dist.cli import main
from smd_dist.demo import DIGITS_LAYERS, MINILM_LAYERS, SMALL, build_demo, load_sentences
from smd_dist.store import ActivationStore


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """One small build through the Python API, one through the CLI."""
    first = build_demo(tmp_path_factory.mktemp("demo") / "a", small=True, progress=False)
    second = tmp_path_factory.mktemp("demo") / "b"
    result = CliRunner().invoke(main, ["demo", "build", str(second), "--small", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "built in" in result.output
    return first, second


def hashes(path):
    return [(r.rep_id, r.content_hash) for r in ActivationStore(path, mode="r").list()]


@pytest.mark.slow
def test_two_builds_give_identical_hashes(two_builds):
    first, second = two_builds
    for name in ("digits", "minilm"):
        a, b = hashes(Path(first.digits).parent / name), hashes(second / name)
        assert a and a == b, name


@pytest.mark.slow
def test_demo_layout_and_contents(two_builds):
    first, _ = two_builds
    root = Path(first.digits).parent
    assert json.loads((root / "demo.json").read_text())["stores"] == {
        "digits": "digits", "minilm": "minilm"}
    assert first.small and first.seconds > 0

    digits = ActivationStore(first.digits, mode="r")
    models = sorted({r.model for r in digits.list()})
    expected = sorted(
        f"cnn-w{w}-s{s}{suffix}" for w in SMALL["widths"] for s in SMALL["seeds"]
        for suffix in ("", "-untrained")
    )
    assert models == expected
    assert {r.layer for r in digits.list()} == set(DIGITS_LAYERS.values())
    assert digits.n_stimuli == SMALL["n_test"] == len(digits.stimulus_ids)
    assert digits.stimulus_ids[0].startswith("d")
    w = SMALL["widths"][0]
    rec = digits.record(f"cnn-w{w}-s0", "conv1")
    assert rec.n_neurons == 16 * w and rec.attrs["trained"] is True
    assert rec.attrs["pooling"] == "flatten" and rec.attrs["module"] == "pool1"
    assert digits.record(f"cnn-w{w}-s0", "logits").n_neurons == 10
    untrained = digits.record(f"cnn-w{w}-s0-untrained", "conv1")
    assert untrained.attrs["trained"] is False and untrained.content_hash != rec.content_hash

    minilm = ActivationStore(first.minilm, mode="r")
    assert sorted({r.model for r in minilm.list()}) == ["minilm-l6", "minilm-l6-random"]
    assert {r.layer for r in minilm.list()} == set(MINILM_LAYERS)
    assert {r.n_neurons for r in minilm.list()} == {384}
    assert minilm.n_stimuli == SMALL["n_sentences"]
    assert minilm.record("minilm-l6", "encoder.layer.5").attrs["pooling"] == "mean"
    assert digits.verify().ok and minilm.verify().ok


def test_demo_build_keeps_existing_stores_without_force(tmp_path):
    """Defect 6: `demo build PATH` used to replace PATH/digits whatever it held."""
    import numpy as np

    mine = ActivationStore(tmp_path / "digits", mode="w")
    mine.write("my-model", "conv1", np.ones((5, 3)))
    result = CliRunner().invoke(main, ["demo", "build", str(tmp_path), "--small", "--quiet"])
    assert result.exit_code == 2 and "--force" in result.output, result.output
    assert [r.rep_id for r in ActivationStore(tmp_path / "digits", mode="r").list()] == [
        "my-model/conv1"]
    assert not (tmp_path / "minilm").exists() and not (tmp_path / "demo.json").exists()
    (tmp_path / "digits" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(
        main, ["demo", "build", str(tmp_path), "--small", "--quiet", "--force"])
    assert result.exit_code == 2 and "notes.txt" in result.output, result.output
    assert (tmp_path / "digits" / "notes.txt").read_text() == "mine"


def test_shipped_sentences():
    sentences, ids = load_sentences()
    assert len(sentences) >= 300 and len(set(sentences)) == len(sentences)
    assert len(set(ids)) == len(ids)
    topics = {i.rsplit("-", 1)[0] for i in ids}
    assert len(topics) >= 10
    small, small_ids = load_sentences(40)
    assert len(small) == 40 and len({i.rsplit("-", 1)[0] for i in small_ids}) >= 10


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "build", str(tmp_path), "--small", "--quiet"])
    assert result.exit_code != 0 and "not an smd-dist activation store" in result.output
    assert (tmp_path / "digits" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_engine_scores_the_digits_nets_with_dead_units_dropped(two_builds):
    import numpy as np
    from distributed import Client, LocalCluster

    from smd_dist.engine import InputError, compute_distances

    digits = ActivationStore(two_builds[0].digits, mode="r")
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(InputError, match="constant_neurons='drop'"):
            compute_distances(digits, metrics=["soft_matching_score"], client=client,
                              progress=False)
        ds = compute_distances(digits, metrics=["soft_matching_score"], client=client,
                               progress=False, constant_neurons="drop")
    assert ds.attrs["n_failed_pairs"] == 0
    assert ds.n_constant_dropped_a.values.max() > 0  # dead ReLUs
    score = ds["soft_matching_score"].values
    assert np.isfinite(score).all() and score.min() >= -1 and score.max() <= 1 + 1e-12
