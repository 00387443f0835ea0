"""The zarr activation store: round trips, names, hashing, damage detection, bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from smd_dist.store.activation_store import (
    ActivationStore,
    CorruptStoreError,
    StoreError,
    content_hash,
    decode_name,
    default_chunks,
    encode_name,
)


@pytest.fixture
def store(tmp_path):
    return ActivationStore(tmp_path / "store")


def chunk_files(store: ActivationStore, model: str, layer: str) -> list[Path]:
    """Chunk files of a rep's current data node, sorted."""
    group = Path(store.path) / "reps" / encode_name(model) / encode_name(layer)
    node = json.loads((group / "zarr.json").read_text())["attributes"]["current"]
    return sorted(p for p in (group / node / "c").rglob("*") if p.is_file())


# --- round trips -----------------------------------------------------------------------------


def test_round_trip_values_and_metadata(store, rng):
    x = rng.normal(size=(40, 9))  # float64 in, float32 stored
    rec = store.write("resnet18", "layer3", x, attrs={"module": "layer3", "pooling": "mean"})
    got = store.read("resnet18", "layer3")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))
    assert (rec.model, rec.layer, rec.n_neurons, rec.n_stimuli) == ("resnet18", "layer3", 9, 40)
    assert rec.rep_id == "resnet18/layer3"
    assert rec.content_hash == content_hash(x.astype(np.float32))
    assert store.list() == [rec]
    attrs = store.list()[0].attrs
    for key in ("model", "layer", "n_neurons", "n_stimuli", "dtype", "content_hash", "created",
                "smd_dist_version", "module", "pooling"):
        assert key in attrs, key
    assert attrs["dtype"] == "float32" and attrs["pooling"] == "mean"
    json.dumps(attrs, allow_nan=False)
    assert store.n_stimuli == 40
    # A fresh object on the same path sees the same thing.
    again = ActivationStore(store.path, mode="r")
    assert again.list() == [rec]
    np.testing.assert_array_equal(again.read("resnet18", "layer3"), got)


def test_open_is_lazy_dask_equal_to_read(store, rng):
    x = rng.normal(size=(30, 11)).astype(np.float32)
    with store.writer("m", "l", 11, chunks=(8, 4)) as w:
        w.append(x)
    lazy = store.open("m", "l")
    assert lazy.chunks == ((8, 8, 8, 6), (4, 4, 3))
    np.testing.assert_array_equal(lazy.compute(), x)


def test_stimulus_ids(store, rng):
    assert store.stimulus_ids is None and store.n_stimuli is None
    ids = [f"img{i}" for i in range(12)] + ["ünïcode id"]
    store.set_stimuli(ids)
    store.set_stimuli(ids)  # the same set again is fine
    assert store.stimulus_ids.tolist() == ids and store.n_stimuli == 13
    store.write("m", "l", rng.normal(size=(13, 2)))
    with pytest.raises(StoreError, match="different stimulus set: id 0"):
        store.set_stimuli(["x"] + ids[1:])
    with pytest.raises(StoreError, match="has 13 stimulus ids; refusing a different set of 2"):
        store.set_stimuli(["a", "b"])
    with pytest.raises(StoreError, match="unique"):
        ActivationStore(Path(store.path).parent / "other").set_stimuli(["a", "a"])


def test_stimulus_ids_must_match_existing_reps(store, rng):
    store.write("m", "l", rng.normal(size=(5, 2)))
    with pytest.raises(StoreError, match="reps have 5 stimuli, 4 ids were given"):
        store.set_stimuli(list("abcd"))


def test_default_chunks_are_a_few_megabytes():
    rows, cols = default_chunks(100_000, 512)
    assert 1 <= rows * cols * 4 / 2**20 <= 8
    assert default_chunks(10, 3) == (10, 3)
    rows, cols = default_chunks(None, 200_000)  # wide flattened conv layers: capped columns
    assert cols == 4096 and rows * cols * 4 <= 8 * 2**20


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, layer",
    [
        ("bert.base", "encoder.layer.3"),
        ("vgg16", "features/6"),
        ("org/model-v2", "blocks.0/attn"),
        ("100% model", "layer 1"),
        ("__private", ".."),
        (".hidden", "."),
        ("ünï", "%2E"),
    ],
)
def test_names_with_dots_and_slashes(store, rng, model, layer):
    x = rng.normal(size=(6, 3))
    store.write(model, layer, x)
    (rec,) = store.list()
    assert (rec.model, rec.layer) == (model, layer)
    np.testing.assert_allclose(store.read(model, layer), x.astype(np.float32))
    # Each name is one node on disk: slashes never create extra levels.
    reps = Path(store.path) / "reps"
    assert [p.name for p in reps.iterdir() if p.is_dir()] == [encode_name(model)]
    assert (reps / encode_name(model) / encode_name(layer) / "zarr.json").is_file()


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_name_encoding_is_reversible_and_safe(name):
    try:
        encoded = encode_name(name)
    except StoreError as err:  # only names whose UTF-8 bytes could encode past 240
        assert "too long" in str(err) and len(name.encode()) > 80
        return
    assert decode_name(encoded) == name
    assert "/" not in encoded and not encoded.startswith((".", "_"))
    assert encoded not in (".", "..")
    assert encoded.isascii()


def test_distinct_names_never_collide(store, rng):
    names = ["a.b", "a/b", "a%2Eb", "a_b", "a b"]
    for i, name in enumerate(names):
        store.write("m", name, np.full((3, 1), float(i)))
    assert sorted(r.layer for r in store.list()) == sorted(names)
    for i, name in enumerate(names):
        assert store.read("m", name)[0, 0] == i


def test_bad_names(store):
    with pytest.raises(StoreError, match="non-empty strings"):
        store.write("", "l", np.ones((2, 2)))
    with pytest.raises(StoreError, match="non-empty strings"):
        store.write("m", 3, np.ones((2, 2)))
    with pytest.raises(StoreError, match="too long"):
        store.write("m", "x" * 241, np.ones((2, 2)))
    store.write("m", "x" * 240, np.ones((2, 2)))
    with pytest.raises(StoreError, match="chunks must be two positive ints"):
        with store.writer("m", "c", 3, chunks=(0, 3)):
            pass


# --- streaming and hashing -------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5, 7, 8, 23, 100])
def test_streaming_writer_equals_one_shot_write(tmp_path, rng, batch):
    x = rng.normal(size=(53, 10)).astype(np.float32)
    one = ActivationStore(tmp_path / "one")
    rec_one = one.write("m", "l", x)
    many = ActivationStore(tmp_path / "many")
    with many.writer("m", "l", 10, chunks=(8, 4)) as w:
        for start in range(0, len(x), batch):
            w.append(x[start : start + batch])
    assert w.n_rows == 53
    (rec_many,) = many.list()
    assert rec_many.content_hash == rec_one.content_hash
    np.testing.assert_array_equal(many.read("m", "l"), x)


def test_hash_is_stable_across_runs():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    # Pinned: changing the hash definition silently would orphan every existing store.
    assert content_hash(x) == (
        "sha256:12323e005d0238524ff7a5240073b5c307bd065d1782e95fd73702a926c95b86"
    )
    assert content_hash(x) == content_hash(np.asfortranarray(x))
    assert content_hash(x) == content_hash(x.astype(np.float64))


def test_hash_is_sensitive_to_one_value_and_to_shape(rng):
    x = rng.normal(size=(20, 6)).astype(np.float32)
    y = x.copy()
    y[13, 4] = np.nextafter(y[13, 4], np.float32(np.inf))
    assert content_hash(x) != content_hash(y)
    assert content_hash(x) != content_hash(x.reshape(6, 20))


def test_hash_stable_across_stores(tmp_path, rng):
    x = rng.normal(size=(15, 4))
    a = ActivationStore(tmp_path / "a").write("m", "l", x)
    b = ActivationStore(tmp_path / "b").write("m", "l", x)
    assert a.content_hash == b.content_hash


# --- damage on disk --------------------------------------------------------------------------


def _two_reps(store, rng):
    x = rng.normal(size=(30, 10)).astype(np.float32)
    with store.writer("net.a", "features/6", 10, chunks=(8, 4)) as w:
        w.append(x)
    store.write("net.b", "fc", rng.normal(size=(30, 3)))
    return x


def test_corrupted_chunk_is_detected_on_read_and_by_verify(store, rng):
    _two_reps(store, rng)
    assert store.verify().ok
    target = chunk_files(store, "net.a", "features/6")[4]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="net.a/features/6"):
        store.read("net.a", "features/6")
    with pytest.raises(CorruptStoreError, match="net.a/features/6"):
        store.read("net.a", "features/6", verify=False)  # the chunk checksum still fires
    report = store.verify()
    assert not report.ok
    assert [(r, k) for r, k, _ in report.corrupt_chunks] == [("net.a/features/6", "c/1/1")]
    assert report.hash_mismatches == ("net.a/features/6",)
    assert "corrupt chunk c/1/1" in str(report)
    store.read("net.b", "fc")  # the other rep is untouched


def test_deleted_chunk_is_detected_by_the_hash(store, rng):
    _two_reps(store, rng)
    target = chunk_files(store, "net.a", "features/6")[0]
    target.unlink()
    with pytest.raises(CorruptStoreError, match="net.a/features/6.*content hash"):
        store.read("net.a", "features/6")
    report = store.verify()
    assert report.missing_chunks == (("net.a/features/6", "c/0/0"),)
    assert report.hash_mismatches == ("net.a/features/6",)
    assert not report.ok


def test_altered_but_valid_chunk_fails_the_hash(store, rng):
    """A chunk swapped for another valid chunk passes its checksum; the hash catches it."""
    _two_reps(store, rng)
    files = chunk_files(store, "net.a", "features/6")
    files[0].write_bytes(files[3].read_bytes())  # same chunk shape, different values
    with pytest.raises(CorruptStoreError, match="content hash"):
        store.read("net.a", "features/6")
    assert store.verify().hash_mismatches == ("net.a/features/6",)


def test_corrupted_stimulus_ids(store):
    store.set_stimuli(["a", "b", "c"])
    (Path(store.path) / "stimuli" / "c" / "0").unlink()
    with pytest.raises(CorruptStoreError, match="stimulus ids"):
        _ = store.stimulus_ids
    assert store.verify().stimuli_problems


# --- bad input and safety of existing data ----------------------------------------------------


def test_stimulus_count_mismatch_names_rep_and_both_counts(store, rng):
    store.write("a", "l1", rng.normal(size=(12, 3)))
    with pytest.raises(StoreError, match="b/l2 has 10 stimuli, the store expects 12"):
        store.write("b", "l2", rng.normal(size=(10, 3)))
    with pytest.raises(StoreError, match="b/l2 has at least 14 stimuli, the store expects 12"):
        store.write("b", "l2", rng.normal(size=(14, 3)))
    assert [r.rep_id for r in store.list()] == ["a/l1"]


def test_duplicate_without_overwrite(store, rng):
    x = rng.normal(size=(8, 3))
    rec = store.write("m", "l", x)
    with pytest.raises(StoreError, match="m/l already exists.*overwrite=True"):
        store.write("m", "l", x * 2)
    assert store.list() == [rec]
    np.testing.assert_array_equal(store.read("m", "l"), x.astype(np.float32))
    new = store.write("m", "l", x * 2, overwrite=True)
    assert new.content_hash != rec.content_hash
    np.testing.assert_array_equal(store.read("m", "l"), (x * 2).astype(np.float32))
    group = Path(store.path) / "reps" / "m" / "l"
    assert len([p for p in group.iterdir() if p.is_dir()]) == 1  # the old node is gone


def test_failed_overwrite_leaves_the_old_rep_intact(store, rng):
    x = rng.normal(size=(8, 3))
    rec = store.write("m", "l", x)
    bad = x.copy()
    bad[5, 1] = np.nan
    with pytest.raises(StoreError, match=r"m/l at stimulus rows \[5\]"):
        store.write("m", "l", bad, overwrite=True)
    assert store.list() == [rec]
    np.testing.assert_array_equal(store.read("m", "l"), x.astype(np.float32))
    assert store.verify().ok and not store.verify().incomplete


def test_exception_inside_writer_leaves_nothing(store, rng):
    store.write("keep", "l", rng.normal(size=(10, 2)))
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("m", "l", 4) as w:
            w.append(rng.normal(size=(6, 4)))
            raise RuntimeError("boom")
    assert [r.rep_id for r in store.list()] == ["keep/l"]
    assert ("m", "l") not in store
    report = store.verify()
    assert report.ok and report.incomplete == ()


def test_killed_writer_is_invisible_and_reported(store, rng):
    """A process that dies mid-write leaves a node list() ignores and verify() reports."""
    cm = store.writer("m", "l", 4)
    w = cm.__enter__()
    w.append(rng.normal(size=(6, 4)))
    w._flush(final=True)  # data reached the disk, but the write never completed
    assert store.list() == []
    with pytest.raises(StoreError, match="no rep 'm/l'"):
        store.read("m", "l")
    report = store.verify()
    assert report.ok and len(report.incomplete) == 1 and "m/l" in report.incomplete[0]
    store.write("m", "l", rng.normal(size=(6, 4)))  # a later write still works
    assert [r.rep_id for r in store.list()] == ["m/l"]


def test_wrong_neuron_count_in_a_later_batch(store, rng):
    with pytest.raises(StoreError, match=r"m/l: batch of shape \(3, 5\).*expected 4 neurons"):
        with store.writer("m", "l", 4) as w:
            w.append(rng.normal(size=(3, 4)))
            w.append(rng.normal(size=(3, 5)))
    assert store.list() == []


def test_non_finite_rows_are_named(store, rng):
    x = rng.normal(size=(10, 3))
    with pytest.raises(StoreError, match=r"m/l at stimulus rows \[7, 9\]"):
        with store.writer("m", "l", 3) as w:
            w.append(x[:5])
            bad = x[5:].copy()
            bad[2, 0] = np.inf
            bad[4, 2] = np.nan
            w.append(bad)
    # float64 values beyond float32's range overflow to inf on storage: refused too.
    with pytest.raises(StoreError, match="non-finite"):
        store.write("m", "l", np.full((2, 2), 1e300))


@pytest.mark.parametrize(
    "array, match",
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 3, 4)), "2-D"),
        (np.array([["a", "b"]]), "not real numeric"),
        (np.ones((3, 0)), "positive int"),
        (np.ones((0, 3)), "no stimuli"),
    ],
)
def test_bad_arrays(store, array, match):
    with pytest.raises(StoreError, match=match):
        store.write("m", "l", array)
    assert store.list() == []


def test_bad_attrs(store):
    with pytest.raises(StoreError, match="JSON-safe"):
        store.write("m", "l", np.ones((2, 2)), attrs={"x": object()})
    with pytest.raises(StoreError, match="JSON-safe"):
        store.write("m", "l", np.ones((2, 2)), attrs={"x": float("nan")})
    with pytest.raises(StoreError, match="set by the store"):
        store.write("m", "l", np.ones((2, 2)), attrs={"content_hash": "forged"})


def test_missing_rep_suggests_names(store, rng):
    store.write("resnet18", "layer3", rng.normal(size=(4, 2)))
    with pytest.raises(StoreError, match="did you mean 'resnet18/layer3'"):
        store.read("resnet18", "layer4")
    with pytest.raises(StoreError, match="no rep"):
        store.remove("nope", "x")


def test_remove(tiny_store):
    tiny_store.remove("b", "conv1")
    assert "b/conv1" not in [r.rep_id for r in tiny_store.list()]
    assert len(tiny_store.list()) == 5
    assert tiny_store.verify().ok


# --- opening ---------------------------------------------------------------------------------


def test_foreign_folder_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"not a store")
    for mode in ("r", "a", "w"):
        with pytest.raises(StoreError, match="photos"):
            ActivationStore(folder, mode=mode)
    assert sorted(os.listdir(folder)) == ["cat.jpg"]


def test_foreign_zarr_group_is_refused(tmp_path):
    zarr.open_group(tmp_path / "other", mode="w").attrs["hello"] = 1
    for mode in ("r", "a", "w"):
        with pytest.raises(StoreError, match="not an smd-dist activation store"):
            ActivationStore(tmp_path / "other", mode=mode)
    assert zarr.open_group(tmp_path / "other", mode="r").attrs["hello"] == 1


def test_unreadable_or_odd_paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        ActivationStore(tmp_path / "file.txt")
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "absent", mode="r")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot be opened"):
        ActivationStore(broken)
    v2 = tmp_path / "v2"
    zarr.open_group(v2, mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="format 2"):
        ActivationStore(v2)
    with pytest.raises(StoreError, match="mode"):
        ActivationStore(tmp_path / "x", mode="rw")


def test_newer_format_version_is_refused(store):
    zarr.open_group(store.path, mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        ActivationStore(store.path)


def test_read_only_mode_refuses_writes(store, rng):
    store.write("m", "l", rng.normal(size=(3, 2)))
    ro = ActivationStore(store.path, mode="r")
    for call in (
        lambda: ro.write("m", "l2", np.ones((3, 2))),
        lambda: ro.remove("m", "l"),
        lambda: ro.set_stimuli(list("abc")),
    ):
        with pytest.raises(StoreError, match="read-only"):
            call()
    assert ro.read("m", "l").shape == (3, 2)


def test_mode_w_replaces_an_existing_store(store, rng):
    store.write("m", "l", rng.normal(size=(3, 2)))
    fresh = ActivationStore(store.path, mode="w")
    assert fresh.list() == [] and fresh.n_stimuli is None


def test_mode_w_never_deletes_files_that_are_not_the_stores(store, rng):
    """Defect 6: mode='w' used to wipe the whole folder, the user's files with the store."""
    x = rng.normal(size=(3, 2))
    store.write("m", "l", x)
    notes = Path(store.path) / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(StoreError, match=r"also 1 other entries \('notes.txt'\)"):
        ActivationStore(store.path, mode="w")
    assert notes.read_text() == "my notes"
    np.testing.assert_array_equal(store.read("m", "l"), x.astype(np.float32))
    notes.unlink()
    assert ActivationStore(store.path, mode="w").list() == []


def test_empty_existing_folder_becomes_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    assert ActivationStore(tmp_path / "empty").list() == []


def test_pickles_cheaply_by_path_and_never_wipes(tmp_path, rng):
    store = ActivationStore(tmp_path / "s", mode="w")
    x = rng.normal(size=(5, 3)).astype(np.float32)
    store.write("m", "l", x)
    blob = pickle.dumps(store)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    assert clone.mode == "a" and clone.path == store.path
    np.testing.assert_array_equal(clone.read("m", "l"), x)
    ro = pickle.loads(pickle.dumps(ActivationStore(store.path, mode="r")))
    assert ro.mode == "r" and len(ro.list()) == 1


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ActivationStore("rel")
    assert os.path.isabs(store.path) and store.path == str(tmp_path / "rel")


def test_open_in_dask_worker_process(tiny_store):
    """A store travels to another process by path; its lazy arrays compute there."""
    import dask

    lazy = tiny_store.open("a", "conv1")
    with dask.config.set(scheduler="processes", num_workers=1):
        got = lazy.sum().compute()
    assert np.isclose(got, tiny_store.read("a", "conv1").sum(dtype=np.float64), rtol=1e-5)


# --- order ---------------------------------------------------------------------------------


def test_list_keeps_the_order_reps_were_written(tmp_path, rng):
    store = ActivationStore(tmp_path / "store")
    x = rng.standard_normal((6, 3))
    layers = ["relu1", "layer.2", "layer.10", "out"]  # by name: layer.10 < layer.2 < out < relu1
    for model in ("net-b", "net-a"):
        for layer in layers:
            store.write(model, layer, x)
    written = [f"{m}/{layer}" for m in ("net-b", "net-a") for layer in layers]
    assert [r.rep_id for r in store.list()] == written
    # A replaced rep keeps its place; a new layer of a model joins the end of that model.
    store.write("net-b", "layer.2", 2 * x, overwrite=True)
    store.write("net-b", "head", x)
    expected = written[:4] + ["net-b/head"] + written[4:]
    assert [r.rep_id for r in store.list()] == expected
    assert [r.rep_id for r in ActivationStore(store.path, mode="r").list()] == expected


def test_a_store_without_recorded_order_lists_by_name(tmp_path, rng):
    from smd_dist.store.activation_store import ORDER_ATTR

    store = ActivationStore(tmp_path / "store")
    for layer in ("b", "a", "c"):
        store.write("m", layer, rng.standard_normal((6, 3)))
    for layer in ("b", "a", "c"):  # as a store written before the order was recorded
        group = store.root[f"reps/m/{layer}"]
        group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != ORDER_ATTR})
    assert [r.layer for r in store.list()] == ["a", "b", "c"]
    store.write("m", "0-new", rng.standard_normal((6, 3)))  # written since: after them
    assert [r.layer for r in store.list()] == ["a", "b", "c", "0-new"]
