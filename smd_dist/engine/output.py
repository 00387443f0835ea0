"""The results output: an append-only ledger of pair results and the labeled matrix.

An output is a zarr group on a local path with two parts:

* ``ledger/`` — one subgroup ("part") per flush of finished pairs. A part holds two
  arrays, ``num`` (value, max_violation, gap, seconds, lower, upper: the columns its
  ``num_fields`` attribute names; parts without it hold the first four) and ``txt``
  (metric, rep ids, content hashes, solver, error, worker), each chunk checksummed
  (CRC32C), and a SHA-256 of the whole part in its attributes, written last together with
  ``complete: true``.
  A part interrupted mid-write is therefore never complete and is ignored; a corrupted
  one fails its checksum and is reported, never read as data. The ledger is the source
  of truth; later parts supersede earlier ones for the same key. Parts are named by a
  sequence number, one more than the largest in the ledger (the run that writes holds
  the output's lock), never by the clock, which may differ between nodes or step back.
  A read that fails with a transient file-system error (``ESTALE`` on NFS, ``EIO``) is
  tried again, and never taken for corruption.
* the root arrays — the assembled :class:`xarray.Dataset` (one DataArray per metric,
  dims ``rep_a``/``rep_b``), rebuilt from the ledger after every run and opened with
  plain :func:`xarray.open_zarr` or :func:`open_distances`.

A pair's key is ``(metric, rep_a, hash_a, rep_b, hash_b)`` with ``rep_a < rep_b``: a rep
whose content changed in the store (new hash) is compared anew.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.dtype import VariableLengthUTF8

OUTPUT_FORMAT = 1
LEDGER = "ledger"
QUARANTINE = "quarantine"
_NUM_FIELDS = ("value", "max_violation", "gap", "seconds", "lower", "upper")
#: The ``num`` columns of parts written before ``num_fields`` was recorded.
_NUM_FIELDS_V1 = _NUM_FIELDS[:4]
_TXT_FIELDS = ("metric", "rep_a", "rep_b", "hash_a", "hash_b", "solver", "error", "worker")
_CODECS = [ZstdCodec(level=3), Crc32cCodec()]
_PART = re.compile(r"p(\d+)-\d+")
#: Errors of a file system that may pass (NFS handles gone stale, I/O hiccups).
_TRANSIENT_ERRNOS = frozenset(
    {errno.ESTALE, errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY}
)
#: Pauses before reading a ledger part again after a transient file-system error.
_RETRY_SECONDS = (0.2, 1.0, 3.0)


class OutputError(ValueError):
    """An output folder that cannot be used as asked."""


class CorruptOutputError(OutputError):
    """Part of an output failed its checksum or could not be read."""


class IncompatibleOutputError(OutputError):
    """An output written by a different configuration or package version."""


@dataclass(frozen=True)
class PairRecord:
    """The result of one metric on one pair of representations.

    ``rep_a < rep_b`` always (see :func:`canonical_pair`). ``error`` is empty when the
    computation succeeded; otherwise ``value`` is NaN and ``error`` says why. ``lower``
    and ``upper`` hold a certified interval on the value when the metric gave one.
    """

    metric: str
    rep_a: str
    rep_b: str
    hash_a: str
    hash_b: str
    value: float
    solver: str = ""
    max_violation: float = float("nan")
    gap: float = float("nan")
    seconds: float = float("nan")
    error: str = ""
    worker: str = ""
    lower: float = float("nan")
    upper: float = float("nan")

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.metric, self.rep_a, self.hash_a, self.rep_b, self.hash_b)

    @property
    def ok(self) -> bool:
        return not self.error


def canonical_pair(a: str, b: str) -> tuple[str, str]:
    """Order two rep ids so that each unordered pair has one key."""
    return (a, b) if a <= b else (b, a)


def _part_checksum(num: np.ndarray, txt: np.ndarray, fields=None) -> str:
    """SHA-256 of a part's arrays, and of its ``num`` column names when it records them."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(num, dtype="<f8").tobytes())
    digest.update("\x1f".join(str(t) for t in txt.ravel()).encode("utf-8"))
    if fields is not None:
        digest.update("\x1f".join(fields).encode("utf-8"))
    return digest.hexdigest()


def _array_checksum(values: np.ndarray) -> str:
    if values.dtype.kind in "OUST":
        payload = "\x1f".join(str(v) for v in values.ravel()).encode("utf-8")
    else:
        payload = np.ascontiguousarray(values, dtype="<f8").tobytes()
    return hashlib.sha256(payload).hexdigest()


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

    def incompatibility(self, header: dict) -> str | None:
        """Why a run with ``header`` cannot add to this output, or ``None`` if it can.

        Compatible means the same output format, the same preprocessing and the same
        ``major.minor`` package version: values must compare bit for bit across runs.
        A path that holds nothing yet is compatible with any run.

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
        for field in ("format", "preprocessing", "version_series"):
            if old.get(field) != header.get(field):
                return (
                    f"output {str(self.path)!r} was written with {field}="
                    f"{json.dumps(old.get(field))}, this run asks {field}="
                    f"{json.dumps(header.get(field))}"
                )
        return None

    def holds_results(self) -> bool:
        """Whether any complete ledger part (or quarantined one) holds a pair result."""
        if (self.path / QUARANTINE).is_dir() and any((self.path / QUARANTINE).iterdir()):
            return True
        for name in self.part_names():
            try:
                if self.read_part(name):
                    return True
            except CorruptOutputError:
                return True
        return False

    def initialise(self, header: dict) -> None:
        """Create the output, or check that an existing one is compatible.

        An existing output written with other settings (:meth:`incompatibility`) is
        refused when it holds results; one that holds none (its first run stopped before
        any pair) simply takes this run's settings.

        Raises
        ------
        IncompatibleOutputError
            Naming each differing field with both values.
        OutputError
            The path exists, is not empty and is not an smd-dist output.
        """
        problem = self.incompatibility(header)
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
            self._write_header({**old, **{k: v for k, v in header.items() if k != "created"}})
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.path, mode="w")
        group.require_group(LEDGER)
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
    def append(self, records: Sequence[PairRecord]) -> str | None:
        """Write ``records`` as one new ledger part; return its name.

        The part is marked complete only after both arrays are on disk, so a crash
        during the write leaves an incomplete part that readers ignore.
        """
        if not records:
            return None
        num = np.array([[getattr(r, f) for f in _NUM_FIELDS] for r in records], dtype="f8")
        txt = np.array([[getattr(r, f) for f in _TXT_FIELDS] for r in records], dtype=object)
        name = f"p{self._last_sequence() + 1:020d}-{os.getpid()}"
        ledger = zarr.open_group(self.path / LEDGER, mode="a", use_consolidated=False)
        part = ledger.create_group(name, attributes={"complete": False})
        part.create_array("num", data=num, chunks=num.shape, compressors=_CODECS)
        text = part.create_array(
            "txt",
            shape=txt.shape,
            dtype=VariableLengthUTF8(),
            chunks=txt.shape,
            compressors=_CODECS,
        )
        text[...] = txt
        # zarr writes attributes one key at a time: the completion mark must come last.
        part.attrs.update(
            {
                "n": len(records),
                "num_fields": list(_NUM_FIELDS),
                "sha256": _part_checksum(num, txt, _NUM_FIELDS),
            }
        )
        part.attrs["complete"] = True
        return name

    def part_names(self) -> list[str]:
        """The ledger's parts, oldest first (by sequence number)."""
        ledger = self.path / LEDGER
        if not ledger.is_dir():
            return []
        return sorted(p.name for p in ledger.iterdir() if p.is_dir() and p.name.startswith("p"))

    def _last_sequence(self) -> int:
        """The largest part number ever used here, quarantined parts included."""
        numbers = [0]
        for folder in (self.path / LEDGER, self.path / QUARANTINE):
            if folder.is_dir():
                numbers += [int(m.group(1)) for p in folder.iterdir()
                            if (m := _PART.fullmatch(p.name))]
        return max(numbers)

    def read_part(self, name: str) -> list[PairRecord] | None:
        """Records of one part; ``None`` if the part was never completed.

        Raises
        ------
        CorruptOutputError
            The part fails its checksum or a chunk cannot be decoded; the message names
            the pairs where they can still be read.
        """
        where = f"output {str(self.path)!r}, ledger part {name!r}"
        try:
            part = zarr.open_group(self.path / LEDGER / name, mode="r", use_consolidated=False)
            attrs = dict(part.attrs)
        except Exception as err:
            _raise_if_transient(err)
            raise CorruptOutputError(f"{where}: unreadable header ({err})") from err
        if not attrs.get("complete"):
            return None
        txt = None
        try:
            txt = np.asarray(part["txt"][...], dtype=object)
            num = np.asarray(part["num"][...], dtype="f8")
        except Exception as err:
            _raise_if_transient(err)
            raise CorruptOutputError(
                f"{where}: a chunk failed to decode ({err}){_pairs_hint(txt)}"
            ) from err
        recorded = attrs.get("num_fields")
        fields = _NUM_FIELDS_V1 if recorded is None else tuple(map(str, recorded))
        if (
            not set(fields) <= set(_NUM_FIELDS)
            or num.shape != (attrs.get("n"), len(fields))
            or _part_checksum(num, txt, None if recorded is None else fields)
            != attrs.get("sha256")
        ):
            raise CorruptOutputError(f"{where}: checksum mismatch{_pairs_hint(txt)}")
        return [
            PairRecord(
                **dict(zip(_TXT_FIELDS, (str(t) for t in row_txt), strict=True)),
                **dict(zip(fields, (float(v) for v in row_num), strict=True)),
            )
            for row_txt, row_num in zip(txt, num, strict=True)
        ]

    def records(self, *, on_corrupt: str = "raise") -> tuple[dict, list[str], list[str]]:
        """The latest record per key, and what was skipped.

        Parameters
        ----------
        on_corrupt : {"raise", "quarantine", "skip"}
            ``"quarantine"`` moves a corrupt part to ``quarantine/`` (kept for
            inspection, never read again) and reports it; its pairs are then missing
            and a resumed run computes them anew. ``"skip"`` reports it and leaves it
            where it is (nothing is written).

        Returns
        -------
        latest : dict
            ``key -> PairRecord``.
        incomplete : list of str
            Parts a crash left unfinished (ignored).
        corrupt : list of str
            Messages for quarantined parts.
        """
        latest: dict = {}
        incomplete: list[str] = []
        corrupt: list[str] = []
        for name in self.part_names():
            try:
                part = self._read_part_patiently(name)
            except CorruptOutputError as err:
                if on_corrupt not in ("quarantine", "skip"):
                    raise
                if on_corrupt == "quarantine":
                    self._quarantine(name)
                corrupt.append(str(err))
                continue
            if part is None:
                incomplete.append(name)
                continue
            for record in part:
                latest[record.key] = record
        return latest, incomplete, corrupt

    def _read_part_patiently(self, name: str) -> list[PairRecord] | None:
        """:meth:`read_part`, tried again after a transient file-system error, so that
        only damage is quarantined.

        Raises
        ------
        OutputError
            The file system kept failing: nothing is quarantined, the run stops.
        CorruptOutputError
            The part fails its checksum.
        """
        for pause in (*_RETRY_SECONDS, None):
            try:
                return self.read_part(name)
            except OSError as err:
                if pause is None:
                    raise OutputError(
                        f"output {str(self.path)!r}, ledger part {name!r}: cannot be read "
                        f"({err}), {len(_RETRY_SECONDS) + 1} tries; nothing was quarantined: "
                        "rerun when the file system answers again"
                    ) from err
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _quarantine(self, name: str) -> None:
        target = self.path / QUARANTINE
        target.mkdir(exist_ok=True)
        shutil.move(str(self.path / LEDGER / name), str(target / name))

    def compact(self) -> None:
        """Rewrite the ledger as one part holding the latest record per key.

        The merged part is written and completed before the old parts are removed, so
        a crash in between leaves duplicates (harmless: identical records), never a loss.
        """
        names = self.part_names()
        if len(names) <= 1:
            return
        latest, _, _ = self.records(on_corrupt="raise")
        self.append(list(latest.values()))
        for name in names:
            shutil.rmtree(self.path / LEDGER / name)

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
        encoding = {name: {"compressors": _CODECS} for name in ds.variables}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            ds.to_zarr(self.path, mode="a", consolidated=False, encoding=encoding)
        self._write_header({**header, "assembled": True})

    def consolidate(self) -> None:
        """Write the consolidated metadata plain :func:`xarray.open_zarr` reads first (it
        warns without it). Last thing a run does, after :meth:`compact`: any later write
        to the root drops it. smd-dist itself reads each node's own metadata."""
        with warnings.catch_warnings():  # "not part of the format 3 specification" yet
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.path, zarr_format=3)


def _raise_if_transient(err: BaseException) -> None:
    """Re-raise ``err`` (or the OS error under it) when it is a file system's passing
    failure rather than damage."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _TRANSIENT_ERRNOS:
            raise cause
        cause = cause.__cause__ or cause.__context__
    return None


def _pairs_hint(txt: np.ndarray | None) -> str:
    if txt is None or txt.ndim != 2 or txt.shape[1] != len(_TXT_FIELDS):
        return ""
    pairs = sorted({f"{row[1]} vs {row[2]} ({row[0]})" for row in txt})
    shown = ", ".join(pairs[:5]) + (f", and {len(pairs) - 5} more" if len(pairs) > 5 else "")
    return f"; pairs affected: {shown}"


def assemble(
    records: dict,
    reps: Sequence,
    metrics: Sequence,
    *,
    attrs: dict | None = None,
    layer_index: dict | None = None,
    constant_dropped: dict | None = None,
) -> xr.Dataset:
    """Build the labeled distance matrices from pair records.

    Parameters
    ----------
    records : dict
        ``key -> PairRecord`` as returned by :meth:`ResultsOutput.records`.
    reps : sequence
        The representations, in matrix order (the store's: models in the order they were
        written, each model's layers in depth order); each has ``rep_id``, ``model``,
        ``layer``, ``n_neurons`` and ``content_hash``.
    metrics : sequence
        :class:`smd_dist.metrics.Metric` objects (their ``name`` and ``kind``).
    layer_index : dict, optional
        ``rep_id -> position of the layer in its model`` (0 for the first layer written);
        by default, the position among ``reps``.
    constant_dropped : dict, optional
        ``rep_id -> neurons left out as constant`` (runs with ``constant_neurons="drop"``);
        becomes the coordinates ``n_constant_dropped_a``/``_b`` (-1 where unknown).

    Returns
    -------
    xarray.Dataset
        Per metric ``m``: ``m`` (rep_a, rep_b) float64, symmetric, with the identity value
        on the diagonal (0 for distances, 1 for similarities); ``m_solver``, ``m_error``
        (str), ``m_seconds``, ``m_max_violation``, ``m_gap`` (float64); for a metric with
        certified intervals (``metric.interval``) also ``m_lower`` and ``m_upper`` (NaN
        where the pair was solved exactly; the identity value on the diagonal). Missing
        pairs are NaN with the error ``"not computed"``. Coords on each axis ``s`` (``a``,
        ``b``): ``model_s``, ``layer_s``, ``layer_index_s``, ``n_neurons_s``, and with
        ``constant_dropped`` ``n_constant_dropped_s``.
    """
    ids = np.array([r.rep_id for r in reps], dtype=object)
    if layer_index is None:
        seen: dict[str, int] = {}
        layer_index = {}
        for r in reps:
            layer_index[r.rep_id] = seen.get(r.model, 0)
            seen[r.model] = layer_index[r.rep_id] + 1
    n = len(reps)
    data_vars = {}
    for metric in metrics:
        value = np.full((n, n), np.nan)
        solver = np.full((n, n), "", dtype=object)
        error = np.full((n, n), "not computed", dtype=object)
        diag = {name: np.full((n, n), np.nan) for name in ("seconds", "max_violation", "gap")}
        bounds = ("lower", "upper") if getattr(metric, "interval", False) else ()
        diag.update({name: np.full((n, n), np.nan) for name in bounds})
        identity = 0.0 if metric.kind == "distance" else 1.0
        for i in range(n):
            value[i, i] = identity
            solver[i, i], error[i, i] = "identity", ""
            for name, arr in diag.items():
                arr[i, i] = identity if name in bounds else 0.0
        for i in range(n):
            for j in range(i + 1, n):
                a, b = reps[i], reps[j]
                (ra, ha), (rb, hb) = sorted(
                    [(a.rep_id, a.content_hash), (b.rep_id, b.content_hash)]
                )
                record = records.get((metric.name, ra, ha, rb, hb))
                if record is None:
                    continue
                for x, y in ((i, j), (j, i)):
                    value[x, y] = record.value
                    solver[x, y] = record.solver
                    error[x, y] = record.error
                    for name, arr in diag.items():
                        arr[x, y] = getattr(record, name)
        dims = ("rep_a", "rep_b")
        data_vars[metric.name] = xr.Variable(
            dims, value, attrs={"kind": metric.kind, "long_name": metric.description}
        )
        data_vars[f"{metric.name}_solver"] = xr.Variable(dims, solver)
        data_vars[f"{metric.name}_error"] = xr.Variable(dims, error)
        for name, arr in diag.items():
            data_vars[f"{metric.name}_{name}"] = xr.Variable(dims, arr)
    coords = {"rep_a": ids, "rep_b": ids}
    for side in ("a", "b"):
        coords[f"model_{side}"] = (f"rep_{side}", np.array([r.model for r in reps], dtype=object))
        coords[f"layer_{side}"] = (f"rep_{side}", np.array([r.layer for r in reps], dtype=object))
        coords[f"layer_index_{side}"] = (
            f"rep_{side}",
            np.array([layer_index[r.rep_id] for r in reps], dtype="i8"),
        )
        coords[f"n_neurons_{side}"] = (
            f"rep_{side}",
            np.array([r.n_neurons for r in reps], dtype="i8"),
        )
        if constant_dropped is not None:
            coords[f"n_constant_dropped_{side}"] = (
                f"rep_{side}",
                np.array([constant_dropped.get(r.rep_id, -1) for r in reps], dtype="i8"),
            )
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))


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
        One DataArray per metric with dims ``(rep_a, rep_b)``; see :func:`assemble`.
    """
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
    metric = name.split("_solver")[0]
    if metric not in ds.data_vars or ds[metric].dims != ("rep_a", "rep_b"):
        return ""
    try:
        latest, _, _ = output.records(on_corrupt="raise")
    except OutputError:
        return ""
    by_pair = {(k[0], k[1], k[3]): r.value for k, r in latest.items()}
    bad = []
    values = ds[metric].values
    ids = [str(x) for x in ds.rep_a.values]
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            if i < j:
                ra, rb = canonical_pair(a, b)
                want = by_pair.get((metric, ra, rb))
                if want is not None and not np.array_equal(want, values[i, j], equal_nan=True):
                    bad.append(f"{a} vs {b}")
    if not bad:
        return ""
    return (
        "; pairs affected: "
        + ", ".join(bad[:5])
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    )


def summarize(records: Iterable[PairRecord]) -> dict:
    """Counts of finished and failed records, and the failures' messages."""
    records = list(records)
    failed = [r for r in records if not r.ok]
    return {
        "n_records": len(records),
        "n_failed": len(failed),
        "failed": [f"{r.rep_a} vs {r.rep_b} ({r.metric}): {r.error}" for r in failed],
    }
