"""The results output: ledger parts, checksums, quarantine, assembly, open_distances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from smd_dist.engine.output import (
    CorruptOutputError,
    IncompatibleOutputError,
    OutputError,
    PairRecord,
    ResultsOutput,
    assemble,
    canonical_pair,
    open_distances,
)


@dataclass(frozen=True)
class Rep:
    rep_id: str
    model: str
    layer: str
    n_neurons: int
    content_hash: str


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    description: str = "test metric"


REPS = [
    Rep("m1/a.1", "m1", "a.1", 4, "h1"),
    Rep("m1/b/2", "m1", "b/2", 8, "h2"),
    Rep("m2/a", "m2", "a", 4, "h3"),
]
HEADER = {
    "format": 1,
    "preprocessing": {"center": True, "normalize": None},
    "version_series": "0.1",
}


def record(a, b, value, metric="soft_matching", error=""):
    ra, rb = canonical_pair(a.rep_id, b.rep_id)
    ha = a.content_hash if ra == a.rep_id else b.content_hash
    hb = b.content_hash if rb == b.rep_id else a.content_hash
    return PairRecord(
        metric,
        ra,
        rb,
        ha,
        hb,
        value,
        solver="lap",
        max_violation=0.0,
        gap=0.0,
        seconds=0.1,
        error=error,
        lower=0.5,
        upper=4.0,
    )


@pytest.fixture
def output(tmp_path):
    out = ResultsOutput(tmp_path / "out.zarr")
    out.initialise(HEADER)
    return out


def test_append_and_read_round_trip(output):
    recs = [record(REPS[0], REPS[1], 1.5), record(REPS[0], REPS[2], 2.5)]
    output.append(recs)
    latest, incomplete, corrupt = output.records()
    assert sorted(latest.values(), key=lambda r: r.value) == recs
    assert incomplete == [] and corrupt == []


def test_later_part_supersedes_earlier(output):
    output.append([record(REPS[0], REPS[1], float("nan"), error="SolverError: boom")])
    output.append([record(REPS[0], REPS[1], 3.0)])
    latest, _, _ = output.records()
    (only,) = latest.values()
    assert only.value == 3.0 and only.ok


def test_incomplete_part_is_ignored(output):
    output.append([record(REPS[0], REPS[1], 1.0)])
    name = output.append([record(REPS[0], REPS[2], 2.0)])
    import zarr

    zarr.open_group(output.path / "ledger" / name, mode="a").attrs["complete"] = False
    latest, incomplete, _ = output.records()
    assert [r.value for r in latest.values()] == [1.0]
    assert incomplete == [name]


def _chunk_files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]


def test_corrupt_part_is_detected_named_and_quarantined(output):
    output.append([record(REPS[0], REPS[1], 1.0)])
    name = output.append([record(REPS[0], REPS[2], 2.0)])
    chunk = next(p for p in _chunk_files(output.path / "ledger" / name) if "num" in p.parts)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match=name):
        output.records()
    latest, _, corrupt = output.records(on_corrupt="quarantine")
    assert [r.value for r in latest.values()] == [1.0]
    assert len(corrupt) == 1 and "m1/a.1 vs m2/a" in corrupt[0]
    assert (output.path / "quarantine" / name).is_dir()


def test_deleted_chunk_fails_checksum(output):
    name = output.append([record(REPS[0], REPS[2], 2.0)])
    for chunk in _chunk_files(output.path / "ledger" / name):
        if "num" in chunk.parts:
            chunk.unlink()
    with pytest.raises(CorruptOutputError, match="checksum"):
        output.records()


def test_incompatible_output_is_refused(output):
    output.append([record(REPS[0], REPS[2], 2.0)])
    other = ResultsOutput(output.path)
    with pytest.raises(IncompatibleOutputError, match="preprocessing.*--fresh"):
        other.initialise({**HEADER, "preprocessing": {"center": True, "normalize": "unit"}})
    with pytest.raises(IncompatibleOutputError, match="version_series"):
        other.initialise({**HEADER, "version_series": "9.9"})


def test_an_output_without_results_takes_the_new_settings(output):
    # A first run stopped before any pair (a bad rep, Ctrl-C) must not lock its settings in.
    unit = {**HEADER, "preprocessing": {"center": True, "normalize": "unit"}}
    output.append([])  # nothing: no part is written
    ResultsOutput(output.path).initialise(unit)
    assert output.header()["preprocessing"] == unit["preprocessing"]
    output.append([record(REPS[0], REPS[2], 2.0)])
    with pytest.raises(IncompatibleOutputError):
        output.initialise(HEADER)


def test_discard_removes_an_output_and_nothing_else(output, tmp_path):
    output.append([record(REPS[0], REPS[2], 2.0)])
    output.discard()
    assert not output.path.exists()
    output.discard()  # nothing there: nothing to do
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an smd-dist output"):
        ResultsOutput(folder).discard()
    assert (folder / "notes.txt").read_text() == "mine"


def test_foreign_folder_is_refused(tmp_path):
    folder = tmp_path / "not-an-output"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        ResultsOutput(folder).initialise(HEADER)
    assert (folder / "notes.txt").read_text() == "mine"


def test_assemble_is_symmetric_labeled_with_identity_diagonal():
    recs = {r.key: r for r in [record(REPS[0], REPS[1], 1.0), record(REPS[1], REPS[2], 2.0)]}
    metrics = [Metric("soft_matching", "distance"), Metric("linear_cka", "similarity")]
    recs.update({r.key: r for r in [record(REPS[0], REPS[1], 0.5, metric="linear_cka")]})
    ds = assemble(recs, REPS, metrics)
    d = ds["soft_matching"]
    assert d.dims == ("rep_a", "rep_b")
    assert list(d.rep_a.values) == ["m1/a.1", "m1/b/2", "m2/a"]
    np.testing.assert_array_equal(d.values, d.values.T)
    assert np.all(np.diag(d.values) == 0.0)
    assert np.all(np.diag(ds["linear_cka"].values) == 1.0)
    assert d.sel(rep_a="m1/b/2", rep_b="m2/a").item() == 2.0
    assert math.isnan(d.sel(rep_a="m1/a.1", rep_b="m2/a").item())
    assert ds["soft_matching_error"].sel(rep_a="m1/a.1", rep_b="m2/a").item() == "not computed"
    assert list(ds.n_neurons_a.values) == [4, 8, 4]
    assert list(ds.layer_b.values) == ["a.1", "b/2", "a"]


def test_open_distances_verifies_checksums(output):
    recs = {
        r.key: r
        for r in [
            record(REPS[0], REPS[1], 1.0),
            record(REPS[1], REPS[2], 2.0),
            record(REPS[0], REPS[2], 3.0),
        ]
    }
    output.append(list(recs.values()))
    ds = assemble(recs, REPS, [Metric("soft_matching", "distance")], attrs={"note": "x"})
    output.write_dataset(ds)
    opened = open_distances(output.path)
    xr.testing.assert_identical(opened["soft_matching"], ds["soft_matching"])
    plain = xr.open_zarr(output.path, consolidated=False)
    assert plain["soft_matching"].shape == (3, 3)
    chunk = next(p for p in _chunk_files(output.path / "soft_matching"))
    chunk.unlink()
    with pytest.raises(CorruptOutputError, match="soft_matching"):
        open_distances(output.path)


def test_open_distances_before_assembly_says_so(output):
    with pytest.raises(OutputError, match="no assembled matrix"):
        open_distances(output.path)


def test_compact_keeps_latest_records(output):
    output.append([record(REPS[0], REPS[1], 1.0)])
    output.append([record(REPS[0], REPS[1], 1.0), record(REPS[0], REPS[2], 2.0)])
    before, _, _ = output.records()
    output.compact()
    assert len(output.part_names()) == 1
    after, _, _ = output.records()
    assert after == before


def test_ledger_order_does_not_depend_on_the_clock(output, monkeypatch):
    """A clock that steps back (or a node whose clock runs ahead) must not let an older
    failure supersede a newer success."""
    import time

    clock = iter([2_000_000_000_000_000_000, 1_000_000_000_000_000_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock, 1_500_000_000_000_000_000))
    output.append([record(REPS[0], REPS[1], float("nan"), error="SolverError: boom")])
    output.append([record(REPS[0], REPS[1], 3.0)])
    monkeypatch.undo()
    latest, _, _ = output.records()
    (only,) = latest.values()
    assert only.ok and only.value == 3.0
    output.compact()
    output.append([record(REPS[0], REPS[2], 4.0)])
    latest, _, _ = output.records()
    assert sorted(r.value for r in latest.values()) == [3.0, 4.0]


def _flaky_chunk_reads(monkeypatch, failures: int):
    """Make the first ``failures`` reads of a ledger part's ``num`` chunk fail with ESTALE."""
    import errno

    from zarr.storage import LocalStore

    real = LocalStore.get
    calls = {"failed": 0}

    async def flaky(self, key, *args, **kwargs):
        if "num/c" in key and calls["failed"] < failures:
            calls["failed"] += 1
            raise OSError(errno.ESTALE, "Stale file handle", key)
        return await real(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", flaky)
    return calls


def test_a_transient_read_error_is_retried_not_quarantined(output, monkeypatch):
    output.append([record(REPS[0], REPS[1], 1.0)])
    calls = _flaky_chunk_reads(monkeypatch, failures=1)
    latest, _, corrupt = output.records(on_corrupt="quarantine")
    assert calls["failed"] == 1
    assert corrupt == [] and [r.value for r in latest.values()] == [1.0]
    assert not (output.path / "quarantine").exists()


def test_a_lasting_read_error_stops_the_read_and_quarantines_nothing(output, monkeypatch):
    name = output.append([record(REPS[0], REPS[1], 1.0)])
    monkeypatch.setattr("smd_dist.engine.output._RETRY_SECONDS", (0.0, 0.0))
    _flaky_chunk_reads(monkeypatch, failures=10**6)
    with pytest.raises(OutputError, match="Stale file handle.*nothing was quarantined"):
        output.records(on_corrupt="quarantine")
    assert output.part_names() == [name]


def test_a_url_output_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/x.zarr", "memory://x.zarr"):
        with pytest.raises(OutputError, match="URL"):
            ResultsOutput(url).initialise(HEADER)
    assert list(tmp_path.iterdir()) == []
