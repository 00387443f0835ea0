"""The results output: a header, the ledger of pair results, and the labeled matrix.

An output is a zarr group on a local path:

* its attributes hold the header (``smd_dist_output``, JSON): the output format, the
  preprocessing, each metric's options, the package's ``major.minor`` version, the reps
  of the last run, and whether the matrix is assembled; an output of a rectangular run
  also holds ``against``: its second store (``null``: the run's own), the last run's
  second selection and its number of pairs;
* ``ledger/`` — the pair results, one checksummed columnar part per flush
  (:mod:`smd_dist.engine.ledger`); the source of truth;
* the root arrays — the assembled :class:`xarray.Dataset` (one DataArray per metric,
  dims ``rep_a``/``rep_b``; :mod:`smd_dist.engine.assembly`), rebuilt from the ledger
  after every run that changed it and opened with plain :func:`xarray.open_zarr` or
  :func:`open_distances`.

Format 2 (this version) writes ledger parts as arrays; format-1 outputs (one row of
strings per record) are read as they are and their ledger is rewritten in format 2 by
the next run that writes to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import zarr

from smd_dist.engine.ledger import (
    CODECS,
    QUARANTINE,
    CorruptOutputError,
    Ledger,
    LedgerRead,
    OutputError,
    Records,
)

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "OUTPUT_FORMAT",
    "CorruptOutputError",
    "IncompatibleOutputError",
    "OutputError",
    "ResultsOutput",
    "open_distances",
    "resolved_path",
]

#: The format this version writes.
OUTPUT_FORMAT = 2
#: Formats this version reads and resumes (format 1's ledger is rewritten as format 2).
READABLE_FORMATS = (1, 2)


class IncompatibleOutputError(OutputError):
    """An output written by a different configuration or package version."""


def _array_checksum(values: np.ndarray) -> str:
    if values.dtype.kind in "OUST":
        payload = "\x1f".join(map(str, values.ravel().tolist())).encode("utf-8")
    else:
        payload = np.ascontiguousarray(values, dtype="<f8").tobytes()
    return hashlib.sha256(payload).hexdigest()


def resolved_path(output: str | os.PathLike) -> Path:
    """The output's real path: every alias of a folder (symbolic links, ``..``) shares
    one lock.

    Raises
    ------
    OutputError
        ``output`` is a URL (``s3://``, ``memory://``): refused before any compute.
    """
    if "://" in str(output):
        ResultsOutput(str(output))  # raises, naming the URL
    return Path(output).expanduser().resolve()


class ResultsOutput:
    """A results folder: header, ledger of pair records, assembled matrix.

    Parameters
    ----------
    path : str or path-like
        A local folder (it is locked with a sibling ``<path>.lock`` file while a run
        writes to it).
    """

    def __init__(self, path: str | os.PathLike):
        if "://" in str(path):
            raise OutputError(
                f"output {str(path)!r} is a URL: an output is a folder on a file system "
                "(local or network), which a run locks and appends to; write it there "
                "and copy it where it should live"
            )
        self.path = Path(path)

    # -- header ---------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def header(self) -> dict:
        """The output's identity: format, preprocessing, package version, totals."""
        if not self.exists():
            raise OutputError(f"no smd-dist output at {str(self.path)!r}")
        try:
            group = zarr.open_group(self.path, mode="r", use_consolidated=False)
            attrs = dict(group.attrs)
        except Exception as err:  # zarr raises many types for a damaged zarr.json
            raise CorruptOutputError(
                f"output {str(self.path)!r}: cannot read its header ({err})"
            ) from err
        try:
            header = json.loads(attrs.get("smd_dist_output", "null"))
        except (TypeError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise OutputError(
                f"{str(self.path)!r} is a zarr group but not an smd-dist output "
                "(no 'smd_dist_output' attribute); choose another output path"
            )
        return header

    def incompatibility(self, header: dict, *, defaults: dict | None = None) -> str | None:
        """Why a run with ``header`` cannot add to this output, or ``None`` if it can.

        Compatible means a format this version reads (:data:`READABLE_FORMATS`), the same
        preprocessing, the same options (``header["metric_options"]``) for every metric
        both ran, and the same ``major.minor`` package version: values must compare bit
        for bit across runs. A rectangular run's output takes only rectangular runs
        against the same store (their selections may change, as ``reps`` may), and an
        all-pairs run's output only all-pairs runs. An output written before options were
        recorded is taken to have run its last run's metrics with ``defaults``
        (``name -> options``). A path that holds nothing yet is compatible with any run.

        Raises
        ------
        OutputError
            The path exists, is not empty and is not an smd-dist output.
        """
        if not self.exists():
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise OutputError(
                    f"output path {str(self.path)!r} exists, is not empty and is not an "
                    "smd-dist output; refusing to write into it"
                )
            return None
        old = self.header()
        where = f"output {str(self.path)!r}"
        if old.get("format") not in READABLE_FORMATS:
            return (
                f"{where} was written in format {json.dumps(old.get('format'))} (by a newer "
                f"smd-dist?); this version reads formats {READABLE_FORMATS[0]} to "
                f"{READABLE_FORMATS[-1]}"
            )
        for field in ("preprocessing", "version_series"):
            if old.get(field) != header.get(field):
                return (
                    f"{where} was written with {field}={json.dumps(old.get(field))}, this run "
                    f"asks {field}={json.dumps(header.get(field))}"
                )
        if _against_store(old) != _against_store(header):
            return (
                f"{where} was written by {_against_text(old)}, this run is "
                f"{_against_text(header)}"
            )
        if "metric_options" in old:
            recorded = old["metric_options"]
        else:
            ran = old.get("metrics") or []
            recorded = {k: v for k, v in (defaults or {}).items() if k in ran}
        for name, options in sorted(header.get("metric_options", {}).items()):
            if name in recorded and recorded[name] != options:
                return (
                    f"{where} computed {name} with options {json.dumps(recorded[name])}, "
                    f"this run asks {json.dumps(options)}"
                )
        return None

    def holds_results(self) -> bool:
        """Whether any complete ledger part (or quarantined one) holds a pair result."""
        if (self.path / QUARANTINE).is_dir() and any((self.path / QUARANTINE).iterdir()):
            return True
        for name in self.ledger.part_names():
            try:
                if self.ledger.read_part(name):
                    return True
            except CorruptOutputError:
                return True
        return False

    def initialise(self, header: dict, *, defaults: dict | None = None) -> None:
        """Create the output, or check that an existing one is compatible.

        An existing output written with other settings (:meth:`incompatibility`) is
        refused when it holds results; one that holds none (its first run stopped before
        any pair) simply takes this run's settings. The header keeps the options of every
        metric ever run here (``metric_options``) and takes this run's format and reps;
        ``defaults`` as in :meth:`incompatibility`.

        Raises
        ------
        IncompatibleOutputError
            Naming each differing field with both values.
        OutputError
            The path exists, is not empty and is not an smd-dist output.
        """
        problem = self.incompatibility(header, defaults=defaults)
        if self.exists():
            if problem is not None:
                if self.holds_results():
                    raise IncompatibleOutputError(
                        f"{problem}; rerun with the original settings, choose another output "
                        "path, or discard its results with --fresh (fresh=True)"
                    )
                self._write_header(header)  # nothing was computed: take this run's settings
                return
            old = self.header()
            options = {**old.get("metric_options", {}), **header.get("metric_options", {})}
            self._write_header({
                **old,
                **{k: v for k, v in header.items() if k != "created"},
                "metric_options": options,
            })
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.path, mode="w")
        group.require_group(self.ledger.folder.name)
        self._write_header(header)

    def discard(self) -> None:
        """Delete this output, results and all, so a run starts it afresh.

        Raises
        ------
        OutputError
            The path holds something other than an smd-dist output (never deleted).
        """
        if self.exists():
            self.header()  # refuses a zarr group that is not an smd-dist output
            shutil.rmtree(self.path)
            return
        self.incompatibility({})  # refuses a non-empty folder that is not an output

    def _write_header(self, header: dict) -> None:
        group = zarr.open_group(self.path, mode="a", use_consolidated=False)
        # Attributes stay flat strings so the matrix exports to netCDF as it is.
        group.attrs["smd_dist_output"] = json.dumps(header, sort_keys=True)

    # -- ledger ---------------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        """The output's ledger of pair results."""
        return Ledger(self.path)

    def append(self, records: Records) -> str | None:
        """Write ``records`` as one new ledger part; return its name."""
        return self.ledger.append(records)

    def read(self, *, on_corrupt: str = "raise") -> LedgerRead:
        """The ledger's records and what was skipped (:meth:`Ledger.read`)."""
        return self.ledger.read(on_corrupt=on_corrupt)

    # -- assembled matrix -----------------------------------------------------------
    def write_dataset(self, ds: xr.Dataset) -> None:
        """Replace the root arrays with ``ds``; record a checksum per variable."""
        header = self.header()
        group = zarr.open_group(self.path, mode="a", use_consolidated=False)
        for name in list(group.array_keys()):
            del group[name]
        checksums = {
            name: _array_checksum(np.asarray(var.values)) for name, var in ds.variables.items()
        }
        ds = ds.copy()
        ds.attrs = {**ds.attrs, "checksums": json.dumps(checksums, sort_keys=True)}
        encoding = {name: {"compressors": CODECS} for name in ds.variables}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            ds.to_zarr(self.path, mode="a", consolidated=False, encoding=encoding)
        self._write_header({**header, "assembled": True})

    def consolidate(self) -> None:
        """Write the consolidated metadata plain :func:`xarray.open_zarr` reads first (it
        warns without it). Last thing a run does, after the ledger's compaction: any later
        write to the root drops it. smd-dist itself reads each node's own metadata."""
        with warnings.catch_warnings():  # "not part of the format 3 specification" yet
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.path, zarr_format=3)


def _against_store(header: dict) -> tuple:
    """The kind of run a header records: ``("all pairs",)`` or ``("against", store)``
    (``store`` None: the run's own)."""
    against = header.get("against")
    return ("all pairs",) if against is None else ("against", against.get("store"))


def _against_text(header: dict) -> str:
    kind = _against_store(header)
    if kind == ("all pairs",):
        return "an all-pairs run"
    if kind[1] is None:
        return "a run against reps of its own store"
    return f"a run against the store {kind[1]!r}"


def open_distances(path: str | os.PathLike, *, verify: bool = True) -> xr.Dataset:
    """Open a results output as a labeled :class:`xarray.Dataset` (loaded in memory).

    Parameters
    ----------
    path : str or path-like
        The ``output`` of a run.
    verify : bool
        Check every variable against the checksum written with it; a corrupted or
        deleted chunk raises :class:`CorruptOutputError` naming the variable and, where
        the ledger can tell, the pairs whose values differ.

    Returns
    -------
    xarray.Dataset
        One DataArray per metric with dims ``(rep_a, rep_b)``; see
        :func:`smd_dist.engine.assembly.assemble`.
    """
    import xarray as xr

    output = ResultsOutput(path)
    header = output.header()
    if not header.get("assembled"):
        raise OutputError(
            f"output {str(path)!r} holds no assembled matrix yet "
            "(its run has not finished); `smd-dist status` shows its progress"
        )
    try:
        ds = xr.open_zarr(output.path, consolidated=False).load()
    except Exception as err:
        raise CorruptOutputError(f"output {str(path)!r}: cannot read the matrix ({err})") from err
    if verify:
        checksums = json.loads(ds.attrs.get("checksums", "{}"))
        for name, var in ds.variables.items():
            expected = checksums.get(name)
            if expected is None or _array_checksum(np.asarray(var.values)) != expected:
                raise CorruptOutputError(
                    f"output {str(path)!r}: variable {name!r} fails its checksum "
                    f"(a chunk was changed or deleted on disk){_matrix_hint(output, ds, name)}; "
                    "rerun the same config to rebuild the matrix from the ledger"
                )
    return ds


def _matrix_hint(output: ResultsOutput, ds: xr.Dataset, name: str) -> str:
    """The pairs whose value in ``ds`` differs from the ledger's, where it can tell."""
    from smd_dist.engine.assembly import positions

    metric = name.split("_solver")[0]
    if metric not in ds.data_vars or ds[metric].dims != ("rep_a", "rep_b"):
        return ""
    try:
        records = output.read(on_corrupt="raise").records.latest()
        # The run's hashes, else each rep's latest in the ledger.
        hashes = dict(zip(records.reps, records.hashes, strict=True))
        hashes_a = {**hashes, **json.loads(ds.attrs.get("store_hashes", "{}"))}
        hashes_b = {**hashes_a, **json.loads(ds.attrs.get("against_hashes", "{}"))}
    except (OutputError, ValueError):
        return ""
    ids_a = [str(x) for x in ds.rep_a.values]
    ids_b = [str(x) for x in ds.rep_b.values]
    # The matrix's rows, then its columns, as the run's reps (each rep once).
    keys = list(dict.fromkeys(
        [(rep, hashes_a.get(rep, "")) for rep in ids_a]
        + [(rep, hashes_b.get(rep, "")) for rep in ids_b]
    ))
    index = {key: k for k, key in enumerate(keys)}
    reps = [SimpleNamespace(rep_id=rep, content_hash=content) for rep, content in keys]
    row_at = np.full(len(keys) + 1, -1)
    col_at = np.full(len(keys) + 1, -1)
    row_at[[index[(rep, hashes_a.get(rep, ""))] for rep in ids_a]] = np.arange(len(ids_a))
    col_at[[index[(rep, hashes_b.get(rep, ""))] for rep in ids_b]] = np.arange(len(ids_b))
    i, j, m = positions(records, reps, [metric])
    values = ds[metric].values
    bad = set()
    for u, v in ((i, j), (j, i)):
        r, c = row_at[u], col_at[v]
        rows = np.flatnonzero((m == 0) & (r >= 0) & (c >= 0))
        want = records.num[rows, 0]
        got = values[r[rows], c[rows]]
        differ = ~((want == got) | (np.isnan(want) & np.isnan(got)))
        bad |= {(min(a, b), max(a, b))
                for a, b in zip(u[rows][differ].tolist(), v[rows][differ].tolist(), strict=True)}
    if not bad:
        return ""
    bad = sorted(bad)
    shown = [f"{reps[a].rep_id} vs {reps[b].rep_id}" for a, b in bad[:5]]
    return (
        "; pairs affected: " + ", ".join(shown)
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    )
