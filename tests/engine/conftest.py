"""Helpers for the engine's tests: ledger records from rows, format-1 ledger parts, and an
in-process Dask client shared by a module's runs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from smd_dist.engine.ledger import CODE_FIELDS, NUM_FIELDS, Records

#: A format-1 record's strings, in the order of its ``txt`` columns.
V1_TEXT = ("metric", "rep_a", "rep_b", "hash_a", "hash_b", "solver", "error", "worker")


def rows_to_records(rows) -> Records:
    """Records from dicts with the keys of :data:`V1_TEXT` and :data:`NUM_FIELDS` (missing
    numbers are NaN, missing strings empty); ``rep_a`` must sort before ``rep_b``."""
    tables = {name: {} for name in ("reps", "metrics", "solvers", "errors", "workers")}

    def code(table, entry):
        return tables[table].setdefault(entry, len(tables[table]))

    codes, num = [], []
    for row in rows:
        assert row["rep_a"] <= row["rep_b"], row
        error = row.get("error", "")
        codes.append([
            code("reps", (row["rep_a"], row.get("hash_a", ""))),
            code("reps", (row["rep_b"], row.get("hash_b", ""))),
            code("metrics", row.get("metric", "soft_matching")),
            code("solvers", row.get("solver", "")),
            code("errors", error) if error else -1,
            code("workers", row.get("worker", "")),
        ])
        num.append([row.get(name, np.nan) for name in NUM_FIELDS])
    reps = list(tables.pop("reps"))
    return Records(
        reps=tuple(r for r, _ in reps),
        hashes=tuple(h for _, h in reps),
        **{name: tuple(entries) for name, entries in tables.items()},
        codes=np.array(codes, dtype=np.int32).reshape(-1, len(CODE_FIELDS)),
        num=np.array(num, dtype=np.float64).reshape(-1, len(NUM_FIELDS)),
    )


def records_to_rows(records: Records) -> list[dict]:
    """The inverse of :func:`rows_to_records` (tests only: one dict per record)."""
    out = []
    for codes, num in zip(records.codes.tolist(), records.num.tolist(), strict=True):
        a, b, m, s, e, w = codes
        out.append({
            "metric": records.metrics[m],
            "rep_a": records.reps[a], "hash_a": records.hashes[a],
            "rep_b": records.reps[b], "hash_b": records.hashes[b],
            "solver": records.solvers[s], "error": records.errors[e] if e >= 0 else "",
            "worker": records.workers[w],
            **dict(zip(NUM_FIELDS, num, strict=True)),
        })
    return out


def write_format1_part(output: Path, rows, *, number: int = 1, num_fields: bool = True) -> str:
    """A ledger part as smd-dist wrote it before the columnar layout (format 1): a ``txt``
    row of strings and a ``num`` row of numbers per record; without ``num_fields``, as
    written before the interval fields (four numbers, no field names)."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec
    from zarr.dtype import VariableLengthUTF8

    fields = NUM_FIELDS if num_fields else NUM_FIELDS[:4]
    num = np.array([[row.get(f, np.nan) for f in fields] for row in rows], dtype="f8")
    txt = np.array([[row.get(f, "") for f in V1_TEXT] for row in rows], dtype=object)
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(num, dtype="<f8").tobytes())
    digest.update("\x1f".join(str(t) for t in txt.ravel()).encode("utf-8"))
    if num_fields:
        digest.update("\x1f".join(fields).encode("utf-8"))
    name = f"p{number:020d}-1"
    codecs = [ZstdCodec(level=3), Crc32cCodec()]
    ledger = zarr.open_group(Path(output) / "ledger", mode="a", use_consolidated=False)
    part = ledger.create_group(name, attributes={"complete": False})
    part.create_array("num", data=num, chunks=num.shape, compressors=codecs)
    text = part.create_array("txt", shape=txt.shape, dtype=VariableLengthUTF8(),
                             chunks=txt.shape, compressors=codecs)
    text[...] = txt
    attrs = {"n": len(rows), "sha256": digest.hexdigest()}
    if num_fields:
        attrs["num_fields"] = list(fields)
    part.attrs.update(attrs)
    part.attrs["complete"] = True
    return name


@pytest.fixture
def ledger_helpers():
    """``.records(rows)``, ``.rows(records)``, ``.write_format1(output, rows, ...)``."""
    return SimpleNamespace(
        records=rows_to_records, rows=records_to_rows, write_format1=write_format1_part
    )


@pytest.fixture(scope="module")
def client():
    """One in-process worker with two task threads, shared by a test module's runs."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c
