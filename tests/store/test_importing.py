"""Importing .npy, .npz and HDF5 arrays into a store, and `smd-dist store ls|verify|import`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from smd_dist.cli import main
from smd_dist.store import ActivationStore, StoreError, import_arrays
from smd_dist.store.activation_store import encode_name

M = 12


@pytest.fixture
def arrays():
    rng = np.random.default_rng(5)
    return {"relu1": rng.standard_normal((M, 6)), "layer.2": rng.standard_normal((M, 4)),
            "layer.10": rng.standard_normal((M, 3))}


IDS = [f"img{i}" for i in range(M)]


def test_npz_with_ids_keeps_the_file_order(tmp_path, arrays):
    np.savez(tmp_path / "acts.npz", **arrays, stimulus_ids=np.array(IDS))
    store = ActivationStore(tmp_path / "store")
    records = import_arrays(store, tmp_path / "acts.npz", model="net")
    assert [r.layer for r in records] == list(arrays)
    assert [r.layer for r in store.list()] == ["relu1", "layer.2", "layer.10"]
    assert list(store.stimulus_ids) == IDS
    for name, values in arrays.items():
        np.testing.assert_array_equal(store.read("net", name), values.astype(np.float32))
    assert store.record("net", "relu1").attrs["source"] == "smd_dist.import"


def test_hdf5_datasets_by_path_chosen_and_renamed(tmp_path, arrays):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        for name, values in arrays.items():
            f[f"blocks/{name}"] = values
        f["stimulus_ids"] = np.array(IDS, dtype="S")
    store = ActivationStore(tmp_path / "store")
    layers = {"blocks/layer.10": "deep", "blocks/relu1": "shallow"}
    import_arrays(store, tmp_path / "acts.h5", model="net", layers=layers)
    assert [r.layer for r in store.list()] == ["deep", "shallow"]
    assert list(store.stimulus_ids) == IDS
    np.testing.assert_array_equal(store.read("net", "deep"),
                                  arrays["layer.10"].astype(np.float32))


def test_npy_is_one_layer_streamed_in_bands(tmp_path, monkeypatch):
    from smd_dist.store import importing

    big = np.random.default_rng(1).standard_normal((50, 3)).astype(np.float32)
    np.save(tmp_path / "fc.npy", big)
    monkeypatch.setattr(importing, "default_chunks", lambda rows, cols: (8, cols))
    store = ActivationStore(tmp_path / "store")
    (record,) = import_arrays(store, tmp_path / "fc.npy", model="net")
    assert record.layer == "fc" and record.n_stimuli == 50
    import_arrays(store, tmp_path / "fc.npy", model="net", layers="head")
    np.testing.assert_array_equal(store.read("net", "head"), big)


@pytest.mark.parametrize(
    ("layers", "ids", "match"),
    [
        (["relu1", "layer2"], None, r"no array 'layer2' \(did you mean 'layer.2'"),
        (None, IDS[:-1], "11 stimulus ids for 12 rows"),
        ({"relu1": "x", "layer.2": "x"}, None, "same layer name"),
    ],
)
def test_problems_are_found_before_anything_is_written(tmp_path, arrays, layers, ids, match):
    np.savez(tmp_path / "acts.npz", **arrays)
    store = ActivationStore(tmp_path / "store")
    with pytest.raises(StoreError, match=match):
        import_arrays(store, tmp_path / "acts.npz", model="net", layers=layers, stimulus_ids=ids)
    assert store.list() == [] and store.stimulus_ids is None


def test_shapes_and_existing_layers_are_refused(tmp_path, arrays):
    np.savez(tmp_path / "cube.npz", maps=np.zeros((M, 2, 2)))
    np.savez(tmp_path / "rows.npz", a=np.zeros((M, 2)), b=np.zeros((M + 1, 2)))
    store = ActivationStore(tmp_path / "store")
    with pytest.raises(StoreError, match=r"'maps' is float64 of shape \(12, 2, 2\)"):
        import_arrays(store, tmp_path / "cube.npz", model="net")
    with pytest.raises(StoreError, match="different numbers of rows"):
        import_arrays(store, tmp_path / "rows.npz", model="net")
    np.savez(tmp_path / "acts.npz", **arrays)
    import_arrays(store, tmp_path / "acts.npz", model="net")
    with pytest.raises(StoreError, match="net/relu1, net/layer.2, net/layer.10 already in"):
        import_arrays(store, tmp_path / "acts.npz", model="net")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="use one of .npy, .npz, .h5"):
        import_arrays(store, tmp_path / "notes.txt", model="net")


def test_cli_store_import_ls_verify(tmp_path, arrays):
    np.savez(tmp_path / "acts.npz", **arrays)
    (tmp_path / "ids.txt").write_text("\n".join(IDS) + "\n")
    store = str(tmp_path / "store")
    run = CliRunner().invoke
    out = run(main, ["store", "import", store, str(tmp_path / "acts.npz"), "--model", "net",
                     "--layer", "layer.10=deep", "--layer", "relu1", "--ids",
                     str(tmp_path / "ids.txt")])
    assert out.exit_code == 0, out.output
    assert "net/deep\t12 x 3" in out.output
    out = run(main, ["store", "ls", store])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "2 reps, 12 stimuli"
    assert [line.split()[0] for line in lines[1:]] == ["net/deep", "net/relu1"]
    out = run(main, ["store", "verify", store, "--no-progress"])
    assert out.exit_code == 0 and "2 reps checked: OK" in out.output
    group = tmp_path / "store" / "reps" / "net" / encode_name("relu1")
    node = json.loads((group / "zarr.json").read_text())["attributes"]["current"]
    chunk = next(p for p in (group / node / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    out = run(main, ["store", "verify", store, "--no-progress"])
    assert out.exit_code == 1 and "PROBLEMS FOUND" in out.output and "net/relu1" in out.output
    out = run(main, ["store", "import", store, str(tmp_path / "acts.npz"), "--model", "net",
                     "--layer", "relu1"])
    assert out.exit_code == 2 and out.output.startswith("smd-dist: error: net/relu1 already")
