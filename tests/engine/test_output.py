"""The results output: ledger parts, checksums, quarantine, assembly, open_distances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from smd_dist.engine.assembly import assemble, done_pairs, failures, pending_pairs
from smd_dist.engine.ledger import Ledger, Records
from smd_dist.engine.output import (
    CorruptOutputError,
    IncompatibleOutputError,
    OutputError,
    ResultsOutput,
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
    "format": 2,
    "preprocessing": {"center": True, "normalize": None},
    "version_series": "0.1",
}


def row(a, b, value, metric="soft_matching", error=""):
    (ra, ha), (rb, hb) = sorted([(a.rep_id, a.content_hash), (b.rep_id, b.content_hash)])
    return {
        "metric": metric, "rep_a": ra, "rep_b": rb, "hash_a": ha, "hash_b": hb,
        "value": value, "solver": "lap", "max_violation": 0.0, "gap": 0.0, "seconds": 0.1,
        "error": error, "worker": "w", "lower": 0.5, "upper": 4.0,
    }


@pytest.fixture
def output(tmp_path):
    out = ResultsOutput(tmp_path / "out.zarr")
    out.initialise(HEADER)
    return out


@pytest.fixture
def records(ledger_helpers):
    return lambda *rows: ledger_helpers.records(rows)


def values(records: Records) -> list[float]:
    return records.column("value").tolist()


def _same(x: dict, y: dict) -> bool:
    return all(
        x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
        for k in x
    )


def test_append_and_read_round_trip(output, records, ledger_helpers):
    rows = [row(REPS[0], REPS[1], 1.5), row(REPS[0], REPS[2], 2.5, error="SolverError: x")]
    name = output.append(records(*rows))
    read = output.read()
    assert read.parts == (name,) and read.incomplete == () and read.corrupt == ()
    assert not read.old_layout
    back = ledger_helpers.rows(read.records)
    assert all(_same(x, y) for x, y in zip(back, rows, strict=True))
    assert read.records.ok.tolist() == [True, False]
    part = zarr.open_group(output.path / "ledger" / name, mode="r", use_consolidated=False)
    # One part is three arrays, whatever its number of records.
    assert sorted(part.array_keys()) == ["codes", "num", "text"]


def test_later_part_supersedes_earlier(output, records):
    output.append(records(row(REPS[0], REPS[1], float("nan"), error="SolverError: boom")))
    output.append(records(row(REPS[0], REPS[1], 3.0), row(REPS[1], REPS[2], 4.0)))
    latest = output.read().records.latest()
    assert values(latest) == [3.0, 4.0] and latest.ok.all()


def test_a_changed_rep_is_a_new_key(output, records):
    """A rep whose content changed (new hash) is compared anew: its old record stays in the
    ledger but is not the pair's any more."""
    changed = Rep("m2/a", "m2", "a", 4, "h3-new")
    output.append(records(row(REPS[0], REPS[2], 1.0)))
    output.append(records(row(REPS[0], changed, 2.0)))
    latest = output.read().records.latest()
    assert len(latest) == 2
    assert done_pairs(latest, REPS, ["soft_matching"])[0, 2]
    assert not done_pairs(latest, [REPS[0], REPS[1], changed], ["soft_matching"])[0, 1]
    assert done_pairs(latest, [REPS[0], REPS[1], changed], ["soft_matching"])[0, 2]


def test_incomplete_part_is_ignored(output, records):
    output.append(records(row(REPS[0], REPS[1], 1.0)))
    name = output.append(records(row(REPS[0], REPS[2], 2.0)))
    zarr.open_group(output.path / "ledger" / name, mode="a").attrs["complete"] = False
    read = output.read()
    assert values(read.records) == [1.0]
    assert read.incomplete == (name,)


def test_a_crash_mid_flush_leaves_a_part_that_is_ignored(output, records, monkeypatch):
    """The process dies after a part's arrays are written, before its completion mark."""
    output.append(records(row(REPS[0], REPS[1], 1.0)))

    class Killed(BaseException):
        pass

    real = zarr.Group.attrs.fget

    def dying_attrs(group):
        attrs = real(group)
        if group.path.startswith("p") and "text" in group:
            raise Killed
        return attrs

    monkeypatch.setattr(zarr.Group, "attrs", property(dying_attrs))
    with pytest.raises(Killed):
        output.append(records(row(REPS[0], REPS[2], 2.0)))
    monkeypatch.undo()
    assert len(output.ledger.part_names()) == 2
    read = output.read()
    assert values(read.records) == [1.0] and len(read.incomplete) == 1


def _chunk_files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]


@pytest.mark.parametrize("array", ["num", "codes", "text"])
def test_corrupt_part_is_detected_named_and_quarantined(output, records, array):
    output.append(records(row(REPS[0], REPS[1], 1.0)))
    name = output.append(records(row(REPS[0], REPS[2], 2.0)))
    chunk = next(p for p in _chunk_files(output.path / "ledger" / name) if array in p.parts)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match=name):
        output.read()
    read = output.read(on_corrupt="quarantine")
    assert values(read.records) == [1.0]
    assert len(read.corrupt) == 1
    if array == "num":  # the pairs are named where the strings still decode
        assert "m1/a.1 vs m2/a (soft_matching)" in read.corrupt[0]
    assert (output.path / "quarantine" / name).is_dir()
    assert name not in output.ledger.part_names()


def test_a_changed_number_fails_the_checksum(output, records):
    name = output.append(records(row(REPS[0], REPS[2], 2.0)))
    part = zarr.open_group(output.path / "ledger" / name, mode="a", use_consolidated=False)
    num = part["num"][...]
    num[0, 0] = 2.5  # rewritten with valid chunk checksums: only the part's SHA-256 knows
    part["num"][...] = num
    with pytest.raises(CorruptOutputError, match="checksum"):
        output.read()
    skipped = output.read(on_corrupt="skip")
    assert len(skipped.corrupt) == 1 and name in output.ledger.part_names()


def test_deleted_chunk_fails_checksum(output, records):
    name = output.append(records(row(REPS[0], REPS[2], 2.0)))
    for chunk in _chunk_files(output.path / "ledger" / name):
        if "num" in chunk.parts:
            chunk.unlink()
    with pytest.raises(CorruptOutputError, match="checksum"):
        output.read()


def test_format1_parts_are_read_as_they_were_written(output, ledger_helpers):
    rows = [row(REPS[0], REPS[1], 1.5), row(REPS[0], REPS[2], float("nan"), error="boom")]
    ledger_helpers.write_format1(output.path, rows[:1], number=1, num_fields=False)
    ledger_helpers.write_format1(output.path, rows[1:], number=2)
    read = output.read()
    assert read.old_layout and read.incomplete == () and read.corrupt == ()
    back = ledger_helpers.rows(read.records)
    assert _same(back[1], rows[1])
    # Parts from before the interval fields hold four numbers: the bounds are NaN.
    assert math.isnan(back[0]["lower"]) and math.isnan(back[0]["upper"])
    assert _same({**back[0], "lower": 0.5, "upper": 4.0}, rows[0])
    assert read.records.ok.tolist() == [True, False]
    # Compacted, they become one part of this layout, the same records.
    output.ledger.compact(read.records.latest(), replaces=output.ledger.part_names())
    again = output.read()
    assert not again.old_layout and len(again.parts) == 1
    assert all(_same(x, y) for x, y in zip(ledger_helpers.rows(again.records), back,
                                           strict=True))


def test_a_damaged_format1_part_is_quarantined(output, ledger_helpers):
    name = ledger_helpers.write_format1(output.path, [row(REPS[0], REPS[2], 2.0)])
    part = zarr.open_group(output.path / "ledger" / name, mode="a", use_consolidated=False)
    part.attrs["num_fields"] = ["value", "max_violation", "gap", "seconds", "upper", "lower"]
    with pytest.raises(CorruptOutputError, match="checksum mismatch.*m1/a.1 vs m2/a"):
        output.read()


def test_records_concat_merges_tables_and_latest_keeps_the_last(records):
    first = records(row(REPS[0], REPS[1], 1.0), row(REPS[1], REPS[2], 2.0))
    second = records(row(REPS[1], REPS[2], 3.0, error="x"),
                     row(REPS[0], REPS[1], 4.0, metric="linear_cka"))
    merged = Records.concat([first, Records.empty(), second])
    assert len(merged) == 4 and len(merged.reps) == 3 and len(merged.metrics) == 2
    latest = merged.latest()
    assert values(latest) == [1.0, 3.0, 4.0] and latest.ok.tolist() == [True, False, True]
    assert latest.failures() == ["m1/b/2 vs m2/a (soft_matching): x"]
    pruned = latest.take([0]).pruned()
    assert pruned.reps == ("m1/a.1", "m1/b/2") and pruned.errors == ()
    assert pruned.metrics == ("soft_matching",) and pruned.codes[0, 4] == -1


def test_incompatible_output_is_refused(output, records):
    output.append(records(row(REPS[0], REPS[2], 2.0)))
    other = ResultsOutput(output.path)
    with pytest.raises(IncompatibleOutputError, match="preprocessing.*--fresh"):
        other.initialise({**HEADER, "preprocessing": {"center": True, "normalize": "unit"}})
    with pytest.raises(IncompatibleOutputError, match="version_series"):
        other.initialise({**HEADER, "version_series": "9.9"})
    with pytest.raises(IncompatibleOutputError, match="format 3.*reads formats 1 to 2"):
        ResultsOutput(output.path)._write_header({**HEADER, "format": 3})
        other.initialise(HEADER)


def test_metric_options_are_recorded_and_other_options_refused(output, records):
    header = {**HEADER, "metrics": ["sinkhorn"], "metric_options": {"sinkhorn": {"rtol": 1e-3}}}
    output.initialise(header)
    output.append(records(row(REPS[0], REPS[2], 2.0, metric="sinkhorn")))
    with pytest.raises(IncompatibleOutputError, match=r"sinkhorn with options .*0\.001.*0\.1"):
        output.initialise({**header, "metric_options": {"sinkhorn": {"rtol": 0.1}}})
    # Another metric, run later, keeps the first one's options in the header.
    output.initialise({**HEADER, "metric_options": {"soft_matching": {}}})
    assert output.header()["metric_options"] == {"sinkhorn": {"rtol": 1e-3}, "soft_matching": {}}
    output.initialise(header)


def test_an_output_from_before_options_were_recorded_is_taken_at_the_defaults(output, records):
    output._write_header({**HEADER, "format": 1, "metrics": ["sinkhorn"]})
    output.append(records(row(REPS[0], REPS[2], 2.0, metric="sinkhorn")))
    defaults = {"sinkhorn": {"rtol": 1e-3}, "other": {"mass": 0.5}}
    asked = {**HEADER, "metric_options": {"sinkhorn": {"rtol": 0.1}}}
    with pytest.raises(IncompatibleOutputError, match="sinkhorn"):
        output.initialise(asked, defaults=defaults)
    # a metric it never ran may take any options; the defaults resume
    output.initialise({**HEADER, "metric_options": {"sinkhorn": {"rtol": 1e-3},
                                                     "other": {"mass": 0.9}}},
                      defaults=defaults)
    assert output.header()["format"] == 2


def test_an_output_without_results_takes_the_new_settings(output, records):
    # A first run stopped before any pair (a bad rep, Ctrl-C) must not lock its settings in.
    unit = {**HEADER, "preprocessing": {"center": True, "normalize": "unit"}}
    assert output.append(Records.empty()) is None  # nothing: no part is written
    ResultsOutput(output.path).initialise(unit)
    assert output.header()["preprocessing"] == unit["preprocessing"]
    output.append(records(row(REPS[0], REPS[2], 2.0)))
    with pytest.raises(IncompatibleOutputError):
        output.initialise(HEADER)


def test_discard_removes_an_output_and_nothing_else(output, records, tmp_path):
    output.append(records(row(REPS[0], REPS[2], 2.0)))
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


def test_assemble_is_symmetric_labeled_with_identity_diagonal(records):
    recs = records(
        row(REPS[0], REPS[1], 1.0),
        row(REPS[1], REPS[2], 2.0),
        row(REPS[0], REPS[1], 0.5, metric="linear_cka"),
        row(REPS[0], REPS[2], float("nan"), metric="linear_cka", error="ValueError: no"),
        row(REPS[0], REPS[1], 9.0, metric="not in this run"),
        row(REPS[0], Rep("m2/a", "m2", "a", 4, "old hash"), 9.0),
    )
    metrics = [Metric("soft_matching", "distance"), Metric("linear_cka", "similarity")]
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
    assert ds["soft_matching_error"].sel(rep_a="m2/a", rep_b="m1/b/2").item() == ""
    assert ds["soft_matching_solver"].sel(rep_a="m2/a", rep_b="m1/b/2").item() == "lap"
    assert ds["soft_matching_solver"].values[1, 1] == "identity"
    assert ds["linear_cka_error"].values[2, 0] == "ValueError: no"
    assert ds["soft_matching_seconds"].values[1, 2] == 0.1
    assert ds["soft_matching_seconds"].values[0, 0] == 0.0
    assert list(ds.n_neurons_a.values) == [4, 8, 4]
    assert list(ds.layer_b.values) == ["a.1", "b/2", "a"]
    assert failures(recs, REPS, ["soft_matching", "linear_cka"]) == [
        "m1/a.1 vs m2/a (linear_cka): ValueError: no"
    ]
    done = done_pairs(recs.latest(), REPS, ["soft_matching", "linear_cka"])
    assert [p.tolist() for p in pending_pairs(done)] == [[0, 1], [2, 2]]


def test_open_distances_verifies_checksums(output, records):
    recs = records(row(REPS[0], REPS[1], 1.0), row(REPS[1], REPS[2], 2.0),
                   row(REPS[0], REPS[2], 3.0))
    output.append(recs)
    ds = assemble(recs, REPS, [Metric("soft_matching", "distance")], attrs={"note": "x"})
    output.write_dataset(ds)
    opened = open_distances(output.path)
    xr.testing.assert_identical(opened["soft_matching"], ds["soft_matching"])
    plain = xr.open_zarr(output.path, consolidated=False)
    assert plain["soft_matching"].shape == (3, 3)
    chunk = next(p for p in _chunk_files(output.path / "soft_matching"))
    chunk.unlink()
    with pytest.raises(CorruptOutputError, match="soft_matching.*pairs affected: m1/a.1 vs"):
        open_distances(output.path)


def test_open_distances_before_assembly_says_so(output):
    with pytest.raises(OutputError, match="no assembled matrix"):
        open_distances(output.path)


def test_compact_keeps_latest_records(output, records):
    output.append(records(row(REPS[0], REPS[1], 1.0)))
    output.append(records(row(REPS[0], REPS[1], 1.0), row(REPS[0], REPS[2], 2.0)))
    before = output.read().records.latest()
    output.ledger.compact(before, replaces=output.ledger.part_names())
    assert len(output.ledger.part_names()) == 1
    after = output.read().records
    assert values(after) == values(before) and after.reps == before.reps


def test_ledger_order_does_not_depend_on_the_clock(output, records, monkeypatch):
    """A clock that steps back (or a node whose clock runs ahead) must not let an older
    failure supersede a newer success."""
    import time

    clock = iter([2_000_000_000_000_000_000, 1_000_000_000_000_000_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock, 1_500_000_000_000_000_000))
    output.append(records(row(REPS[0], REPS[1], float("nan"), error="SolverError: boom")))
    output.append(records(row(REPS[0], REPS[1], 3.0)))
    monkeypatch.undo()
    latest = output.read().records.latest()
    assert values(latest) == [3.0] and latest.ok.all()
    output.ledger.compact(latest, replaces=output.ledger.part_names())
    output.append(records(row(REPS[0], REPS[2], 4.0)))
    assert sorted(values(output.read().records.latest())) == [3.0, 4.0]


def test_quarantined_part_numbers_are_never_reused(output, records):
    output.append(records(row(REPS[0], REPS[1], 1.0)))
    name = output.append(records(row(REPS[0], REPS[2], 2.0)))
    Ledger(output.path)._quarantine(name)
    again = output.append(records(row(REPS[0], REPS[2], 2.0)))
    assert again.split("-")[0] > name.split("-")[0]


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


def test_a_transient_read_error_is_retried_not_quarantined(output, records, monkeypatch):
    output.append(records(row(REPS[0], REPS[1], 1.0)))
    calls = _flaky_chunk_reads(monkeypatch, failures=1)
    read = output.read(on_corrupt="quarantine")
    assert calls["failed"] == 1
    assert read.corrupt == () and values(read.records) == [1.0]
    assert not (output.path / "quarantine").exists()


def test_a_lasting_read_error_stops_the_read_and_quarantines_nothing(output, records,
                                                                     monkeypatch):
    name = output.append(records(row(REPS[0], REPS[1], 1.0)))
    monkeypatch.setattr("smd_dist.engine.ledger._RETRY_SECONDS", (0.0, 0.0))
    _flaky_chunk_reads(monkeypatch, failures=10**6)
    with pytest.raises(OutputError, match="Stale file handle.*nothing was quarantined"):
        output.read(on_corrupt="quarantine")
    assert output.ledger.part_names() == [name]


def test_a_url_output_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/x.zarr", "memory://x.zarr"):
        with pytest.raises(OutputError, match="URL"):
            ResultsOutput(url).initialise(HEADER)
    assert list(tmp_path.iterdir()) == []
