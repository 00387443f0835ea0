"""scripts/models_vs_brain.py end to end on a small synthetic store."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import smd_dist
from smd_dist.store import ActivationStore

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "models_vs_brain.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("models_vs_brain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def store(tmp_path, script):
    """Two trained nets sharing tuning (one is the brain) and one untrained, 60 stimuli."""
    rng = np.random.default_rng(3)
    store = ActivationStore(tmp_path / "store", mode="w")
    store.set_stimuli([f"s{i}" for i in range(60)])
    latent = rng.standard_normal((60, 4))
    for model, trained in (("brain", True), ("m1", True), ("m2", False)):
        for layer, width in zip(script.LAYERS, (12, 16, 8, 5), strict=True):
            base = latent if trained else rng.standard_normal((60, 4))
            A = np.maximum(base @ rng.standard_normal((4, width)), 0)  # ReLU: sparse units
            store.write(model, layer, A + 0.05 * rng.standard_normal((60, width)),
                        attrs={"trained": trained})
    return store


@pytest.mark.slow
def test_rows_are_the_public_scores_and_the_report_is_written(script, store, tmp_path):
    setup = script.Setup(brain="brain", n_units=6, stimuli=(20, 60))
    rows = script.compare(store, setup)
    # 2 models x 4 layers x 2 areas x 2 subsets x (real, shuffled)
    assert len(rows) == 2 * 4 * 2 * 2 * 2
    rng = np.random.default_rng(setup.seed)
    areas = script.recordings(store, setup, rng)
    row = next(r for r in rows if r.n_stimuli == 60 and r.area == "fc1" and r.model == "m1"
               and r.layer == "conv2" and not r.shuffled)
    # All 60 stimuli: the subset is every stimulus, sorted.
    X = store.read("m1", "conv2").astype(np.float64)
    cv = smd_dist.soft_matching_cv(X, areas["fc1"], cv=5, seed=0, constant_neurons="drop")
    assert row.cv == cv.score
    assert row.in_sample == smd_dist.soft_matching_score(
        np.delete(X, cv.dropped[0], axis=1), np.delete(areas["fc1"], cv.dropped[1], axis=1))

    path = script.run(store, tmp_path / "docs", setup)
    text = path.read_text()
    assert path.name == "models-vs-brain.md"
    for heading in ("## Set-up", "## How far the in-sample score is inflated", "## Reading",
                    "## Models against recordings in another store"):
        assert heading in text
    assert "| 20 |" in text and "| 60 |" in text and "nan" not in text


@pytest.mark.slow
def test_the_models_against_recordings_example_runs(tmp_path):
    """The docs' rectangular example, as written, on the small demo build."""
    import re
    import subprocess

    doc = (SCRIPT.parent.parent / "docs" / "models-vs-brain.md").read_text()
    section = doc[doc.index("## Models against recordings in another store"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    env = {**__import__("os").environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    subprocess.run([sys.executable, "-m", "smd_dist", "demo", "build", "demo-data", "--small",
                    "-q"], cwd=tmp_path, check=True, env=env, capture_output=True)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "monkey/conv2" in done.stdout and "monkey/fc1" in done.stdout
    ds = smd_dist.open_distances(tmp_path / "demo-results" / "models-vs-recordings.zarr")
    assert list(ds.rep_b.values) == ["monkey/conv2", "monkey/fc1"]
    assert not np.isnan(ds["soft_matching_score"].values).any()
