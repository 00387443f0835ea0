"""The ledger: an output's pair results, appended one checksummed columnar part per flush.

A run appends what finished every ``flush-seconds`` as one *part*, a zarr group
``ledger/p<sequence>-<pid>`` of three arrays, never one object per pair:

``codes`` (int32, ``n × 6``)
    per record: ``rep_a``, ``rep_b`` (rows of the part's rep table, ``rep_a``'s id before
    ``rep_b``'s), ``metric``, ``solver``, ``error`` (-1: none) and ``worker`` (entries of
    the part's text tables);
``num`` (float64, ``n × 6``)
    ``value``, ``max_violation``, ``gap``, ``seconds``, ``lower``, ``upper``;
``text`` (str)
    the part's tables one after another: rep ids, their content hashes, metric names,
    solvers, error messages, workers (their sizes in the attribute ``tables``).

Each chunk is checksummed (CRC32C), and a SHA-256 of the three arrays and the tables'
sizes is written last, with ``complete: true``: a part a crash interrupted is never
complete and is ignored, a damaged one fails its checksum and is reported (and moved to
``quarantine/`` by a run, which computes its pairs anew), never read as data. Parts are
numbered one past the largest number ever used here (the run that writes holds the
output's lock), never by the clock. Later parts supersede earlier ones for the same key
``(metric, rep_a, hash_a, rep_b, hash_b)``: a rep whose content changed (a new hash) is a
new key. A read that fails with a transient file-system error (``ESTALE`` on NFS,
``EIO``) is tried again, never taken for damage.

Parts written before this layout (format 1: a ``num`` array of 4 or 6 columns and a
``txt`` array of strings per record) are read as they are; the next run that writes to
the output rewrites its ledger in this layout (see :meth:`Ledger.compact`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.dtype import VariableLengthUTF8

__all__ = [
    "CODE_FIELDS",
    "CorruptOutputError",
    "Ledger",
    "LedgerRead",
    "NUM_FIELDS",
    "OutputError",
    "Records",
    "TABLES",
]

LEDGER = "ledger"
QUARANTINE = "quarantine"
NUM_FIELDS = ("value", "max_violation", "gap", "seconds", "lower", "upper")
CODE_FIELDS = ("rep_a", "rep_b", "metric", "solver", "error", "worker")
TABLES = ("reps", "hashes", "metrics", "solvers", "errors", "workers")
#: The table each column of ``codes`` indexes (``hashes`` go with ``reps``).
_CODE_TABLES = ("reps", "reps", "metrics", "solvers", "errors", "workers")
#: The ``num`` columns of format-1 parts written before ``num_fields`` was recorded.
_NUM_FIELDS_V1 = NUM_FIELDS[:4]
_TXT_FIELDS_V1 = ("metric", "rep_a", "rep_b", "hash_a", "hash_b", "solver", "error", "worker")
#: Compression and a checksum per chunk, for every array an output writes (ledger and matrix).
CODECS = [ZstdCodec(level=3), Crc32cCodec()]
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


@dataclass(frozen=True, eq=False)
class Records:
    """Pair results, one row per metric and pair, held as arrays.

    Row ``k`` is metric ``metrics[codes[k, 2]]`` on rep ``reps[codes[k, 0]]`` (content hash
    ``hashes[codes[k, 0]]``) against ``reps[codes[k, 1]]``, with the numbers ``num[k]``
    (:data:`NUM_FIELDS`), the solver ``solvers[codes[k, 3]]``, the error
    ``errors[codes[k, 4]]`` (none where the code is -1: the value is then the metric's)
    and the worker ``workers[codes[k, 5]]``. A pair's first rep is the one whose id sorts
    first. The tables are tuples of strings, each entry once (a rep is its id and hash).
    """

    reps: tuple[str, ...]
    hashes: tuple[str, ...]
    metrics: tuple[str, ...]
    solvers: tuple[str, ...]
    errors: tuple[str, ...]
    workers: tuple[str, ...]
    codes: np.ndarray
    num: np.ndarray

    def __post_init__(self) -> None:
        codes = np.ascontiguousarray(self.codes, dtype=np.int32).reshape(-1, len(CODE_FIELDS))
        num = np.ascontiguousarray(self.num, dtype=np.float64).reshape(-1, len(NUM_FIELDS))
        if codes.shape[0] != num.shape[0] or len(self.reps) != len(self.hashes):
            raise ValueError(
                f"records: {codes.shape[0]} rows of codes, {num.shape[0]} of numbers, "
                f"{len(self.reps)} reps and {len(self.hashes)} hashes"
            )
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "num", num)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @classmethod
    def empty(cls) -> Records:
        return cls((), (), (), (), (), (), np.empty((0, 6), np.int32), np.empty((0, 6)))

    def column(self, name: str) -> np.ndarray:
        """One column by its name in :data:`CODE_FIELDS` or :data:`NUM_FIELDS`."""
        if name in CODE_FIELDS:
            return self.codes[:, CODE_FIELDS.index(name)]
        return self.num[:, NUM_FIELDS.index(name)]

    @property
    def ok(self) -> np.ndarray:
        """Per row: whether the metric gave its value (no error)."""
        return self.codes[:, 4] < 0

    def tables(self) -> dict[str, tuple[str, ...]]:
        return {name: getattr(self, name) for name in TABLES}

    def take(self, rows) -> Records:
        """The rows ``rows`` (indices or a mask), with the same tables."""
        return Records(
            **self.tables(), codes=self.codes[rows], num=self.num[rows]
        )

    def pruned(self) -> Records:
        """The same rows with only the table entries they use."""
        codes = self.codes.copy()
        tables = {}
        for name in dict.fromkeys(_CODE_TABLES):
            columns = [c for c, table in enumerate(_CODE_TABLES) if table == name]
            used_codes = np.concatenate([codes[:, c] for c in columns])
            used = np.unique(used_codes[used_codes >= 0])
            table = getattr(self, name)
            tables[name] = tuple(table[k] for k in used)
            if name == "reps":
                tables["hashes"] = tuple(self.hashes[k] for k in used)
            remap = np.full(len(table) + 1, -1, dtype=np.int32)
            remap[used] = np.arange(used.size, dtype=np.int32)
            for c in columns:
                codes[:, c] = remap[codes[:, c]]  # -1 stays -1 (the last entry)
        return Records(**tables, codes=codes, num=self.num)

    @staticmethod
    def concat(parts: Sequence[Records]) -> Records:
        """All rows of ``parts`` in order, over merged tables (each entry once)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Records.empty()
        if len(parts) == 1:
            return parts[0]
        merged: dict[str, dict] = {name: {} for name in TABLES if name != "hashes"}
        codes = []
        for part in parts:
            remaps = {}
            for name in merged:
                entries = (
                    list(zip(part.reps, part.hashes, strict=True)) if name == "reps"
                    else getattr(part, name)
                )
                index = merged[name]
                remap = np.empty(len(entries) + 1, dtype=np.int32)
                for k, entry in enumerate(entries):
                    remap[k] = index.setdefault(entry, len(index))
                remap[-1] = -1
                remaps[name] = remap
            part_codes = part.codes.copy()
            for c, name in enumerate(_CODE_TABLES):
                part_codes[:, c] = remaps[name][part.codes[:, c]]
            codes.append(part_codes)
        reps = list(merged["reps"])
        return Records(
            reps=tuple(r for r, _ in reps),
            hashes=tuple(h for _, h in reps),
            metrics=tuple(merged["metrics"]),
            solvers=tuple(merged["solvers"]),
            errors=tuple(merged["errors"]),
            workers=tuple(merged["workers"]),
            codes=np.concatenate(codes),
            num=np.concatenate([p.num for p in parts]),
        )

    def latest(self) -> Records:
        """The last row of each key (metric, rep_a with its hash, rep_b with its hash), in
        the order those rows had: a later result supersedes an earlier one."""
        if len(self) < 2:
            return self
        n_reps, n_metrics = max(len(self.reps), 1), max(len(self.metrics), 1)
        key = (
            self.codes[:, 0].astype(np.int64) * n_reps + self.codes[:, 1]
        ) * n_metrics + self.codes[:, 2]
        _, first_from_end = np.unique(key[::-1], return_index=True)
        keep = np.sort(len(self) - 1 - first_from_end)
        return self if keep.size == len(self) else self.take(keep)

    def failures(self) -> list[str]:
        """``"rep_a vs rep_b (metric): error"`` for each row with an error."""
        rows = np.flatnonzero(~self.ok)
        return [
            f"{self.reps[a]} vs {self.reps[b]} ({self.metrics[m]}): {self.errors[e]}"
            for a, b, m, e in self.codes[rows][:, [0, 1, 2, 4]].tolist()
        ]

    def checksum(self) -> str:
        """SHA-256 of the arrays, the tables and the column names."""
        digest = hashlib.sha256()
        digest.update(self.codes.astype("<i4").tobytes())
        digest.update(self.num.astype("<f8").tobytes())
        digest.update("\x1f".join(self._text()).encode("utf-8"))
        layout = {"codes": CODE_FIELDS, "num": NUM_FIELDS, "tables": self._sizes()}
        digest.update(json.dumps(layout, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()

    def _text(self) -> list[str]:
        return [s for name in TABLES for s in getattr(self, name)]

    def _sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in TABLES}


@dataclass(frozen=True)
class LedgerRead:
    """What a read of the ledger found.

    Attributes
    ----------
    records : Records
        Every complete part's rows, oldest part first (:meth:`Records.latest` keeps each
        key's last).
    parts : tuple of str
        The parts read, complete or not (what :meth:`Ledger.compact` replaces).
    incomplete : tuple of str
        Parts a crash left unfinished (ignored).
    corrupt : tuple of str
        Messages for the damaged parts (quarantined or skipped, as asked).
    old_layout : bool
        Whether a part was written in the format-1 layout.
    """

    records: Records
    parts: tuple[str, ...]
    incomplete: tuple[str, ...]
    corrupt: tuple[str, ...]
    old_layout: bool


class Ledger:
    """The ledger of the output at ``root`` (its parts under ``root/ledger``).

    Parameters
    ----------
    root : path
        The output folder.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.folder = self.root / LEDGER

    def part_names(self) -> list[str]:
        """The ledger's parts, oldest first (by sequence number)."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("p")
        )

    def _last_sequence(self) -> int:
        """The largest part number ever used here, quarantined parts included."""
        numbers = [0]
        for folder in (self.folder, self.root / QUARANTINE):
            if folder.is_dir():
                numbers += [int(m.group(1)) for p in folder.iterdir()
                            if (m := _PART.fullmatch(p.name))]
        return max(numbers)

    def append(self, records: Records) -> str | None:
        """Write ``records`` as one new part; return its name (``None`` for no rows).

        The part is marked complete only after its arrays are on disk, so a crash during
        the write leaves an incomplete part that readers ignore.
        """
        if not len(records):
            return None
        records = records.pruned()
        text = np.array(records._text(), dtype=object)
        name = f"p{self._last_sequence() + 1:020d}-{os.getpid()}"
        ledger = zarr.open_group(self.folder, mode="a", use_consolidated=False)
        part = ledger.create_group(name, attributes={"complete": False})
        for key, data in (("codes", records.codes), ("num", records.num)):
            part.create_array(key, data=data, chunks=data.shape, compressors=CODECS)
        strings = part.create_array(
            "text",
            shape=text.shape,
            dtype=VariableLengthUTF8(),
            chunks=(max(text.size, 1),),
            compressors=CODECS,
        )
        strings[...] = text
        # zarr writes attributes one key at a time: the completion mark must come last.
        part.attrs.update(
            {
                "n": len(records),
                "codes_fields": list(CODE_FIELDS),
                "num_fields": list(NUM_FIELDS),
                "tables": records._sizes(),
                "sha256": records.checksum(),
            }
        )
        part.attrs["complete"] = True
        return name

    def read_part(self, name: str) -> Records | None:
        """One part's records; ``None`` if the part was never completed.

        Raises
        ------
        CorruptOutputError
            The part fails its checksum or a chunk cannot be decoded; the message names
            the pairs where they can still be read.
        """
        return self._read(name)[0]

    def _read(self, name: str) -> tuple[Records | None, bool]:
        """:meth:`read_part`, and whether the part has this layout (not format 1)."""
        where = f"output {str(self.root)!r}, ledger part {name!r}"
        try:
            part = zarr.open_group(self.folder / name, mode="r", use_consolidated=False)
            attrs = dict(part.attrs)
        except Exception as err:
            _raise_if_transient(err)
            raise CorruptOutputError(f"{where}: unreadable header ({err})") from err
        columnar = "tables" in attrs
        if not attrs.get("complete"):
            return None, columnar
        if columnar:
            return _read_columnar(part, attrs, where), True
        return _read_rows(part, attrs, where), False

    def read(self, *, on_corrupt: str = "raise") -> LedgerRead:
        """Every complete part, oldest first, and what was skipped.

        Parameters
        ----------
        on_corrupt : {"raise", "quarantine", "skip"}
            ``"quarantine"`` moves a damaged part to ``quarantine/`` (kept for
            inspection, never read again) and reports it; its pairs are then missing and
            a resumed run computes them anew. ``"skip"`` reports it and leaves it where
            it is (nothing is written).

        Raises
        ------
        CorruptOutputError
            A damaged part, with ``on_corrupt="raise"``.
        OutputError
            The file system kept failing on a part (nothing is quarantined).
        """
        if on_corrupt not in ("raise", "quarantine", "skip"):
            raise ValueError(f"on_corrupt must be raise, quarantine or skip, got {on_corrupt!r}")
        found, incomplete, corrupt, names = [], [], [], []
        old_layout = False
        for name in self.part_names():
            try:
                part, columnar = self._read_part_patiently(name)
            except CorruptOutputError as err:
                if on_corrupt == "raise":
                    raise
                if on_corrupt == "quarantine":
                    self._quarantine(name)
                corrupt.append(str(err))
                continue
            names.append(name)
            if part is None:
                incomplete.append(name)
                continue
            old_layout |= not columnar
            found.append(part)
        return LedgerRead(
            records=Records.concat(found),
            parts=tuple(names),
            incomplete=tuple(incomplete),
            corrupt=tuple(corrupt),
            old_layout=old_layout,
        )

    def _read_part_patiently(self, name: str) -> tuple[Records | None, bool]:
        """:meth:`_read`, tried again after a transient file-system error, so that
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
                return self._read(name)
            except OSError as err:
                if pause is None:
                    raise OutputError(
                        f"output {str(self.root)!r}, ledger part {name!r}: cannot be read "
                        f"({err}), {len(_RETRY_SECONDS) + 1} tries; nothing was quarantined: "
                        "rerun when the file system answers again"
                    ) from err
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _quarantine(self, name: str) -> None:
        target = self.root / QUARANTINE
        target.mkdir(exist_ok=True)
        shutil.move(str(self.folder / name), str(target / name))

    def compact(self, records: Records, replaces: Sequence[str]) -> str | None:
        """Write ``records`` (the latest of every key) as one part, then remove the parts
        ``replaces``.

        The new part is complete before any old one goes, so a crash in between leaves
        duplicates (harmless: identical records, the later ones win), never a loss.
        """
        name = self.append(records)
        for old in replaces:
            if old != name:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        return name


def _read_columnar(part, attrs: dict, where: str) -> Records:
    text = codes = None
    try:
        text = np.asarray(part["text"][...], dtype=object)
        codes = np.asarray(part["codes"][...], dtype=np.int32)
        num = np.asarray(part["num"][...], dtype=np.float64)
    except Exception as err:
        _raise_if_transient(err)
        hint = _columnar_hint(text, codes, attrs.get("tables"))
        raise CorruptOutputError(f"{where}: a chunk failed to decode ({err}){hint}") from err
    sizes = attrs.get("tables")
    try:
        if (
            list(attrs.get("codes_fields", [])) != list(CODE_FIELDS)
            or list(attrs.get("num_fields", [])) != list(NUM_FIELDS)
            or not isinstance(sizes, dict)
            or set(sizes) != set(TABLES)
            or sum(sizes.values()) != text.size
        ):
            raise ValueError("layout")
        tables = _split_tables(text, sizes)
        records = Records(**tables, codes=codes, num=num)
        if len(records) != attrs.get("n") or records.checksum() != attrs.get("sha256"):
            raise ValueError("checksum")
        _check_codes(records)
    except (ValueError, TypeError) as err:
        raise CorruptOutputError(
            f"{where}: checksum mismatch{_columnar_hint(text, codes, sizes)}"
        ) from err
    return records


def _split_tables(text: np.ndarray, sizes: dict) -> dict[str, tuple[str, ...]]:
    out, start = {}, 0
    for name in TABLES:
        stop = start + int(sizes[name])
        out[name] = tuple(str(s) for s in text[start:stop])
        start = stop
    return out


def _check_codes(records: Records) -> None:
    """Every code within its table (a part that passed its checksum always is)."""
    limits = [len(getattr(records, name)) for name in _CODE_TABLES]
    low = np.array([0, 0, 0, 0, -1, 0])
    if len(records) and (
        (records.codes < low).any() or (records.codes >= np.array(limits)).any()
    ):
        raise ValueError("codes out of range")


def _columnar_hint(text, codes, sizes) -> str:
    """The pairs of a damaged part, where its text and codes still decode."""
    if text is None or codes is None or not isinstance(sizes, dict):
        return ""
    try:
        tables = _split_tables(text, sizes)
        reps, metrics = tables["reps"], tables["metrics"]
        pairs = {f"{reps[a]} vs {reps[b]} ({metrics[m]})" for a, b, m in codes[:, :3].tolist()}
    except (KeyError, IndexError, TypeError, ValueError):
        return ""
    return _pairs_text(pairs)


def _read_rows(part, attrs: dict, where: str) -> Records:
    """A format-1 part (one row of strings and one of numbers per record) as records."""
    txt = None
    try:
        txt = np.asarray(part["txt"][...], dtype=object)
        num = np.asarray(part["num"][...], dtype="f8")
    except Exception as err:
        _raise_if_transient(err)
        raise CorruptOutputError(
            f"{where}: a chunk failed to decode ({err}){_rows_hint(txt)}"
        ) from err
    recorded = attrs.get("num_fields")
    fields = _NUM_FIELDS_V1 if recorded is None else tuple(map(str, recorded))
    if (
        not set(fields) <= set(NUM_FIELDS)
        or txt.ndim != 2
        or txt.shape[1] != len(_TXT_FIELDS_V1)
        or num.shape != (attrs.get("n"), len(fields))
        or _rows_checksum(num, txt, None if recorded is None else fields) != attrs.get("sha256")
    ):
        raise CorruptOutputError(f"{where}: checksum mismatch{_rows_hint(txt)}")
    column = {name: txt[:, k].astype(str) for k, name in enumerate(_TXT_FIELDS_V1)}
    reps, inverse = np.unique(
        np.concatenate([
            np.char.add(np.char.add(column["rep_a"], "\x1f"), column["hash_a"]),
            np.char.add(np.char.add(column["rep_b"], "\x1f"), column["hash_b"]),
        ]),
        return_inverse=True,
    )
    n = txt.shape[0]
    codes = np.empty((n, len(CODE_FIELDS)), dtype=np.int32)
    codes[:, 0], codes[:, 1] = inverse[:n], inverse[n:]
    tables = {}
    for c, name, source in ((2, "metrics", "metric"), (3, "solvers", "solver"),
                            (4, "errors", "error"), (5, "workers", "worker")):
        entries, codes[:, c] = np.unique(column[source], return_inverse=True)
        tables[name] = tuple(str(e) for e in entries)
    if "" in tables["errors"]:  # no error: code -1, and "" is no entry
        empty = tables["errors"].index("")
        codes[:, 4] = np.where(codes[:, 4] == empty, -1, codes[:, 4] - (codes[:, 4] > empty))
        tables["errors"] = tuple(e for e in tables["errors"] if e)
    full = np.full((n, len(NUM_FIELDS)), np.nan)
    for k, name in enumerate(fields):
        full[:, NUM_FIELDS.index(name)] = num[:, k]
    split = [str(r).split("\x1f") for r in reps]
    return Records(
        reps=tuple(r for r, _ in split),
        hashes=tuple(h for _, h in split),
        **tables,
        codes=codes,
        num=full,
    )


def _rows_checksum(num: np.ndarray, txt: np.ndarray, fields=None) -> str:
    """SHA-256 of a format-1 part's arrays, and of its ``num`` column names when it
    records them."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(num, dtype="<f8").tobytes())
    digest.update("\x1f".join(str(t) for t in txt.ravel()).encode("utf-8"))
    if fields is not None:
        digest.update("\x1f".join(fields).encode("utf-8"))
    return digest.hexdigest()


def _rows_hint(txt: np.ndarray | None) -> str:
    if txt is None or txt.ndim != 2 or txt.shape[1] != len(_TXT_FIELDS_V1):
        return ""
    return _pairs_text({f"{row[1]} vs {row[2]} ({row[0]})" for row in txt})


def _pairs_text(pairs: set[str]) -> str:
    pairs = sorted(pairs)
    shown = ", ".join(pairs[:5]) + (f", and {len(pairs) - 5} more" if len(pairs) > 5 else "")
    return f"; pairs affected: {shown}"


def _raise_if_transient(err: BaseException) -> None:
    """Re-raise ``err`` (or the OS error under it) when it is a file system's passing
    failure rather than damage."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _TRANSIENT_ERRNOS:
            raise cause
        cause = cause.__cause__ or cause.__context__
    return None
