"""The activation store: one zarr (format 3) group holding every representation.

A representation ("rep") is the activation matrix of one layer of one model, shape
(stimuli ``M``, neurons ``N``): a neuron's tuning curve is a column. A store holds one
stimulus set; every rep in it has the same ``M`` rows in the same order.

Layout on disk::

    <root>/                       group, attrs: format tag + version, n_stimuli, stimuli_hash
    <root>/stimuli                1-D string array of stimulus ids (optional)
    <root>/reps/<model>/<layer>/  group per rep, attrs: model, layer, current -> node name
    <root>/reps/<model>/<layer>/<node>
                                  2-D float32 array (M, N), attrs: the rep's record

``<root>/.smd-dist-locks/``     lock files (not part of the zarr hierarchy)

``<model>`` and ``<layer>`` are percent-encoded (:func:`encode_name`) so free-text names
with slashes and other characters (``features/6`` becomes ``features%2F6``) map to single,
safe zarr node names; dots are kept (``encoder.layer.3``). The real names live in attrs.

Writes never damage what is already stored: a rep is written into a fresh node, hashed,
marked complete, and only then does the rep group's ``current`` pointer move to it (the
old node is deleted afterwards). A write that fails, or a process that dies mid-write,
leaves at most an unreferenced node that :meth:`ActivationStore.list` ignores and
:meth:`ActivationStore.verify` reports as incomplete.

Several processes may write one store at once (:mod:`smd_dist.store.locking`). The
pointer moves under an OS lock per rep id, taken only for the commit, and the checks a
commit depends on (the rep exists, its id is taken by another model/layer split, the
store's stimulus count) are made under it from what is on disk, never from what this
process read earlier. So of two concurrent writes of one rep, one lands and the other is
refused (``overwrite=False``) or lands after it; a reader that loses the node it was
reading to a newer write reads the pointer again.

Every chunk carries a CRC32C checksum, so a chunk damaged on disk fails on read; each rep
also carries a SHA-256 content hash over its values and shape, checked on
:meth:`ActivationStore.read`, which also catches a deleted chunk (zarr would silently
fill it).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from smd_dist.store import locking

FORMAT_TAG = "smd-dist-activation-store"
#: Folder of the store's lock files, beside ``reps/``: zarr ignores it when listing reps.
LOCK_DIR = ".smd-dist-locks"
#: Entries of a store folder that belong to the store; ``mode="w"`` replaces only these.
STORE_ENTRIES = ("zarr.json", "reps", "stimuli", LOCK_DIR)
#: Reads of one rep, when newer writes replace it meanwhile, before giving up.
_READ_ATTEMPTS = 4
#: Seconds a commit waits for another process's commit of the same rep id.
LOCK_TIMEOUT = 120.0
FORMAT_VERSION = 1
STORED_DTYPE = np.dtype("<f4")
# Target uncompressed chunk size; columns are capped so a row band stays modest in memory.
CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_COLUMNS = 4096
# Attrs the store owns on each rep array; user attrs may not override them.
RESERVED_ATTRS = (
    "model",
    "layer",
    "n_neurons",
    "n_stimuli",
    "dtype",
    "content_hash",
    "created",
    "smd_dist_version",
    "complete",
    "chunks",
)
# Attr of a rep's group: when the rep was first written (ns since the epoch, strictly
# increasing within a process); list() returns reps in this order.
ORDER_ATTR = "first_written_ns"
_LAST_ORDER = [0]
# Zarr's portable node-name characters; "." and "_" are encoded when leading ("..",
# hidden files, zarr's reserved "__" prefix).
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


class StoreError(ValueError):
    """An activation store that cannot be opened, read or written as asked."""


class CorruptStoreError(StoreError):
    """Stored data that fails its checksum or content hash."""


class RepChangedError(StoreError):
    """A rep replaced by another write since the caller read its record."""


# --- names ---------------------------------------------------------------------------------


def encode_name(name: str) -> str:
    """Map a free-text model or layer name to one safe zarr node name, reversibly.

    Letters, digits, ``-``, ``_`` and ``.`` are kept; every other byte of the UTF-8
    encoding (``/``, ``%``, spaces, ...) becomes ``%XX``. A leading ``.`` or ``_`` is
    encoded too: ``.`` and ``..`` are not node names, and zarr reserves ``__``.

    Examples
    --------
    >>> encode_name("encoder.layer.3")
    'encoder.layer.3'
    >>> encode_name("features/6")
    'features%2F6'
    >>> decode_name(encode_name(".."))
    '..'
    """
    if not isinstance(name, str) or not name:
        raise StoreError(f"model and layer names must be non-empty strings, got {name!r}")
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE_CHARS and not (i == 0 and ch in "._"):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    encoded = "".join(out)
    if len(encoded) > 240:  # file systems cap a path component at 255 bytes
        raise StoreError(f"name {name!r} is too long to store ({len(encoded)} encoded characters)")
    return encoded


def decode_name(encoded: str) -> str:
    """Inverse of :func:`encode_name`."""
    from urllib.parse import unquote

    return unquote(encoded, errors="strict")


def rep_id(model: str, layer: str) -> str:
    """The rep's label ``"model/layer"`` used in results."""
    return f"{model}/{layer}"


# --- hashing -------------------------------------------------------------------------------


class _Hasher:
    """Incremental SHA-256 over C-ordered little-endian float32 rows, then the shape."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"smd-dist/content/float32-le/v1\0")

    def update(self, rows: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(rows, dtype=STORED_DTYPE).data)

    def hexdigest(self, shape: tuple[int, int]) -> str:
        h = self._h.copy()
        h.update(f"\0shape={int(shape[0])}x{int(shape[1])}".encode())
        return "sha256:" + h.hexdigest()


def content_hash(array: np.ndarray) -> str:
    """SHA-256 of a (stimuli, neurons) array as stored: float32 values in C order + shape.

    .. math::

        h = \\mathrm{SHA256}(\\text{tag} \\,\\|\\, \\mathrm{bytes}_{f32,LE}(X) \\,\\|\\,
        \\text{"shape=}M\\text{x}N\\text{"})

    Two arrays that are equal after casting to float32 have the same hash; changing any
    one value (or the shape) changes it.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise StoreError(f"content_hash expects a 2-D (stimuli, neurons) array, got {array.shape}")
    hasher = _Hasher()
    hasher.update(array)
    return hasher.hexdigest(array.shape)


def _stimuli_hash(ids: Sequence[str]) -> str:
    payload = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def default_chunks(n_stimuli: int | None, n_neurons: int) -> tuple[int, int]:
    """Chunk shape (rows, columns) of about :data:`CHUNK_BYTES` uncompressed.

    Columns are capped at :data:`MAX_CHUNK_COLUMNS` so one band of rows (what the
    streaming writer buffers) stays small even for wide flattened conv layers.
    """
    cols = max(1, min(int(n_neurons), MAX_CHUNK_COLUMNS))
    rows = max(1, CHUNK_BYTES // (STORED_DTYPE.itemsize * cols))
    if n_stimuli:
        rows = min(rows, int(n_stimuli))
    else:  # unknown length: keep edge chunks (padded on disk) from dwarfing short reps
        rows = min(rows, 4096)
    return int(rows), int(cols)


def _write_order() -> int:
    """A stamp for :data:`ORDER_ATTR`: wall-clock ns, bumped past the last one given here, so
    reps written back to back in one process never tie."""
    stamp = max(time.time_ns(), _LAST_ORDER[0] + 1)
    _LAST_ORDER[0] = stamp
    return stamp


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _package_version() -> str:
    from smd_dist import __version__

    return __version__


def _check_json(attrs: dict, *, where: str) -> dict:
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise StoreError(
            f"attrs for {where} must be JSON-safe (no NaN, no objects): {err}"
        ) from err


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepRecord:
    """One complete representation in a store.

    Attributes
    ----------
    model, layer : str
        The free-text names given at write time.
    n_neurons, n_stimuli : int
        Columns and rows of the (stimuli, neurons) array.
    content_hash : str
        ``"sha256:..."`` over the float32 values and shape (:func:`content_hash`).
    rep_id : str
        ``"model/layer"``.
    attrs : dict
        Every JSON attr of the array: the fields above plus dtype, created,
        smd_dist_version, chunks and whatever the writer added (module, pooling, ...).
    """

    model: str
    layer: str
    n_neurons: int
    n_stimuli: int
    content_hash: str
    rep_id: str
    attrs: dict = field(hash=False, compare=False, repr=False)


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ActivationStore.verify` found.

    Attributes
    ----------
    n_reps : int
        Complete reps checked.
    missing_chunks : tuple of (rep_id, chunk_key)
        Chunks absent from storage (zarr would silently fill them).
    corrupt_chunks : tuple of (rep_id, chunk_key, reason)
        Chunks that fail their CRC32C checksum or cannot be decoded.
    hash_mismatches : tuple of rep_id
        Reps whose recomputed content hash differs from the stored one.
    stimuli_problems : tuple of str
        Problems with the stored stimulus ids.
    incomplete : tuple of str
        Leftovers of writes that never finished; invisible to ``list()`` and harmless,
        reported so they can be cleaned up. They do not make the report fail.
    rep_problems : tuple of str
        Reps that do not fit the store: a stimulus count other than the store's, or an id
        ``"model/layer"`` that another model/layer split also has.
    """

    n_reps: int
    missing_chunks: tuple[tuple[str, str], ...] = ()
    corrupt_chunks: tuple[tuple[str, str, str], ...] = ()
    hash_mismatches: tuple[str, ...] = ()
    stimuli_problems: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()
    rep_problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no stored data is missing, corrupt, altered or inconsistent."""
        return not (
            self.missing_chunks or self.corrupt_chunks or self.hash_mismatches
            or self.stimuli_problems or self.rep_problems
        )

    def __str__(self) -> str:
        lines = [f"{self.n_reps} reps checked: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        lines += [f"  missing chunk {key} in {rid}" for rid, key in self.missing_chunks]
        lines += [f"  corrupt chunk {k} in {rid}: {why}" for rid, k, why in self.corrupt_chunks]
        lines += [f"  content hash mismatch in {rid}" for rid in self.hash_mismatches]
        lines += [f"  stimuli: {p}" for p in self.stimuli_problems]
        lines += [f"  {p}" for p in self.rep_problems]
        lines += [f"  incomplete write (ignored): {p}" for p in self.incomplete]
        return "\n".join(lines)


# --- the store -----------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path


class ActivationStore:
    """A zarr (format 3) cache of activation matrices, one per (model, layer).

    Parameters
    ----------
    path : str or os.PathLike
        A local (or network) folder; or, read-only, any URL zarr/fsspec accepts (with the
        matching extra installed). Writing needs a file system that takes OS locks, so a
        URL with mode ``"a"`` or ``"w"`` raises :class:`StoreError`.
    mode : {"a", "r", "w"}
        ``"r"`` read-only (must exist); ``"a"`` read/write, creating the store if absent;
        ``"w"`` create, replacing an existing smd-dist store. A folder that exists and is
        not an smd-dist store is never modified, nor is a store folder that also holds
        other files: both raise :class:`StoreError`.
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Notes
    -----
    The object pickles to its path and mode only (``"w"`` becomes ``"a"``), so Dask
    workers reopen the store cheaply and never wipe it.

    Arrays are (stimuli, neurons): a neuron's tuning curve is a column.

    References
    ----------
    .. [1] Zarr core specification, version 3.
       https://zarr-specs.readthedocs.io/en/latest/v3/core/index.html
    .. [2] Zarr v3 ``crc32c`` codec (CRC-32C, Castagnoli polynomial, as in RFC 3720).
       https://zarr-specs.readthedocs.io/en/latest/v3/codecs/crc32c/index.html
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mode: str = "a",
        storage_options: dict | None = None,
    ) -> None:
        if mode not in ("r", "a", "w"):
            raise StoreError(f"mode must be 'r', 'a' or 'w', got {mode!r}")
        path = os.fspath(path)
        if not _is_url(path):
            path = os.path.abspath(os.path.expanduser(path))
        elif mode != "r":
            raise StoreError(
                f"{path!r} is a URL: smd-dist writes stores only on a file system (local "
                "or network), where concurrent writers can lock; write the store there and "
                "copy it, or open this one with mode='r'"
            )
        self.path: str = path
        self.mode = mode
        self.storage_options = storage_options
        self._group = self._open_root(mode)

    # pickling: by path, reopened lazily on first use
    def __getstate__(self) -> dict:
        return {
            "path": self.path,
            "mode": "r" if self.mode == "r" else "a",
            "storage_options": self.storage_options,
        }

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.mode = state["mode"]
        self.storage_options = state["storage_options"]
        self._group = None

    def __repr__(self) -> str:
        return f"ActivationStore({self.path!r}, mode={self.mode!r})"

    @property
    def root(self) -> zarr.Group:
        if self._group is None:
            self._group = self._open_root(self.mode)
        return self._group

    def _zarr_kwargs(self) -> dict:
        return {"storage_options": self.storage_options} if _is_url(self.path) else {}

    def _open_root(self, mode: str) -> zarr.Group:
        path = self.path
        if not _is_url(path) and os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"{path!r} is a file, not an activation store folder")
        existing = self._try_open(path)
        if existing is not None:
            self._check_format(existing)
            if mode == "w":
                return self._replace(path)
            if mode == "a" and existing.read_only:
                existing = zarr.open_group(path, mode="r+", zarr_format=3, **self._zarr_kwargs())
            return existing
        if not _is_url(path) and os.path.isdir(path) and set(os.listdir(path)) - {LOCK_DIR}:
            raise StoreError(
                f"{path!r} is a non-empty folder that is not an smd-dist activation store"
                + ("" if mode == "r" else "; refusing to write into it")
            )
        if mode == "r":
            raise StoreError(f"no activation store at {path!r}")
        return self._create(path)

    def _try_open(self, path: str) -> zarr.Group | None:
        if not _is_url(path) and not os.path.exists(os.path.join(path, "zarr.json")):
            if os.path.isdir(path) and (
                os.path.exists(os.path.join(path, ".zgroup"))
                or os.path.exists(os.path.join(path, ".zarray"))
            ):
                raise StoreError(
                    f"{path!r} is a zarr format 2 hierarchy, not an smd-dist activation store"
                )
            return None
        try:
            return zarr.open_group(path, mode="r", zarr_format=3, **self._zarr_kwargs())
        except FileNotFoundError:
            return None
        except Exception as err:  # a zarr.json that zarr cannot parse, an array, ...
            if _is_url(path) and "not found" in str(err).lower():
                return None
            raise StoreError(
                f"{path!r} cannot be opened as an smd-dist activation store: {err}"
            ) from err

    def _check_format(self, group: zarr.Group) -> None:
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT_TAG:
            raise StoreError(
                f"{self.path!r} is a zarr group but not an smd-dist activation store "
                f"(attrs 'format' is {attrs.get('format')!r}, expected {FORMAT_TAG!r})"
            )
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path!r} has store format version {version!r}; this smd-dist reads "
                f"versions up to {FORMAT_VERSION} (upgrade smd-dist)"
            )

    def _replace(self, path: str) -> zarr.Group:
        """Delete the store at ``path`` (its own entries only) and create an empty one."""
        with self._store_lock():
            foreign = sorted(set(os.listdir(path)) - set(STORE_ENTRIES))
            if foreign:
                shown = ", ".join(repr(f) for f in foreign[:5])
                raise StoreError(
                    f"{path!r} holds an activation store and also {len(foreign)} other "
                    f"entries ({shown}{' ...' if len(foreign) > 5 else ''}); mode='w' "
                    "replaces only a folder that holds nothing but the store: move them out"
                )
            for name in ("reps", "stimuli"):
                if os.path.isdir(os.path.join(path, name)):
                    shutil.rmtree(os.path.join(path, name))
            os.remove(os.path.join(path, "zarr.json"))
        return self._create(path)

    def _create(self, path: str) -> zarr.Group:
        group = zarr.open_group(path, mode="a", zarr_format=3, **self._zarr_kwargs())
        group.attrs.update(
            {
                "format": FORMAT_TAG,
                "format_version": FORMAT_VERSION,
                "created": _now(),
                "smd_dist_version": _package_version(),
                "n_stimuli": None,
                "stimuli_hash": None,
            }
        )
        group.require_group("reps")
        return group

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"store {self.path!r} is open read-only (mode='r')")

    # --- locks -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, name: str, what: str) -> Iterator[None]:
        try:
            with locking.held(
                os.path.join(self.path, LOCK_DIR, name), timeout=LOCK_TIMEOUT, what=what
            ):
                yield
        except locking.LockError as err:
            raise StoreError(str(err)) from err

    def _store_lock(self):
        """Held while the store-level attrs (stimulus ids and count) are read and set."""
        return self._lock("store.lock", f"store {self.path!r}")

    def _rep_lock(self, model: str, layer: str):
        """Held while a rep's pointer moves. Keyed by the id, so the splits of one id
        (``a/b`` + ``c``, ``a`` + ``b/c``) share it and cannot both commit."""
        rid = rep_id(model, layer)
        digest = hashlib.sha256(rid.encode("utf-8")).hexdigest()[:32]
        return self._lock(f"rep-{digest}.lock", f"rep {rid!r} of store {self.path!r}")

    def _root_attrs(self) -> dict:
        """The root group's attrs as they are on disk now (another process may have set
        the stimuli since this object opened the store)."""
        return zarr.open_group(
            self.path, mode="r", zarr_format=3, **self._zarr_kwargs()
        ).attrs.asdict()

    def _update_root_attrs(self, attrs: dict) -> None:
        """Merge ``attrs`` into the root attrs on disk; call with the store lock held."""
        group = zarr.open_group(self.path, mode="r+", zarr_format=3, **self._zarr_kwargs())
        group.attrs.update(attrs)
        self._group = group

    # --- stimuli ---------------------------------------------------------------------------

    @property
    def n_stimuli(self) -> int | None:
        """Rows every rep in this store has, or None before the first rep or stimulus set."""
        value = self._root_attrs().get("n_stimuli")
        return None if value is None else int(value)

    @property
    def stimulus_ids(self) -> np.ndarray | None:
        """Stimulus ids (str array, one per row), or None if never set.

        Raises
        ------
        CorruptStoreError
            The stored ids fail their checksum or hash.
        """
        expected = self._root_attrs().get("stimuli_hash")
        if expected is None:
            return None
        try:
            ids = [str(s) for s in self.root["stimuli"][:].tolist()]
        except Exception as err:
            raise CorruptStoreError(
                f"stimulus ids of {self.path!r} cannot be read: {err}"
            ) from err
        if _stimuli_hash(ids) != expected:
            raise CorruptStoreError(f"stimulus ids of {self.path!r} do not match their hash")
        return np.array(ids, dtype=str)

    def set_stimuli(self, ids: Sequence[Any]) -> None:
        """Record the stimulus ids, one per row, once.

        Setting the same ids again is a no-op; different ids, or a count that differs from
        the reps already stored, raise :class:`StoreError`. Ids are stored as strings and
        must be unique.
        """
        self._require_writable()
        ids = [str(s) for s in np.asarray(ids, dtype=object).ravel().tolist()]
        if not ids:
            raise StoreError("stimulus ids must not be empty")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dups = [s for s in ids if s in seen or seen.add(s)]
            raise StoreError(f"stimulus ids must be unique; repeated: {dups[:5]}")
        new_hash = _stimuli_hash(ids)
        with self._store_lock():
            self._set_stimuli(ids, new_hash)

    def _set_stimuli(self, ids: list[str], new_hash: str) -> None:
        old_hash = self._root_attrs().get("stimuli_hash")
        if old_hash is not None:
            if old_hash == new_hash:
                return
            old = self.stimulus_ids
            if len(old) != len(ids):
                raise StoreError(
                    f"store {self.path!r} already has {len(old)} stimulus ids; "
                    f"refusing a different set of {len(ids)}"
                )
            first = next(i for i, (a, b) in enumerate(zip(old, ids, strict=True)) if a != b)
            raise StoreError(
                f"store {self.path!r} already has a different stimulus set: id {first} is "
                f"{old[first]!r} in the store and {ids[first]!r} here"
            )
        n = self.n_stimuli
        if n is not None and n != len(ids):
            raise StoreError(
                f"stimulus count mismatch: the store's reps have {n} stimuli, "
                f"{len(ids)} ids were given"
            )
        arr = self.root.create_array(
            "stimuli",
            shape=(len(ids),),
            dtype=str,
            chunks=(min(len(ids), 65536),),
            compressors=[ZstdCodec(level=3), Crc32cCodec()],
            overwrite=True,
        )
        arr[:] = np.array(ids, dtype=object)
        self._update_root_attrs({"n_stimuli": len(ids), "stimuli_hash": new_hash})

    # --- lookup ----------------------------------------------------------------------------

    def _rep_group_path(self, model: str, layer: str) -> str:
        return f"reps/{encode_name(model)}/{encode_name(layer)}"

    def _current(self, model: str, layer: str) -> zarr.Array | None:
        gpath = self._rep_group_path(model, layer)
        for _ in range(_READ_ATTEMPTS):
            try:
                group = self.root[gpath]
            except KeyError:
                return None
            node = group.attrs.get("current")
            if node is None:
                return None
            try:
                arr = group[node]
                break
            except KeyError:
                # A newer write may have moved the pointer and deleted this node.
                if self._pointer(model, layer) == node:
                    raise CorruptStoreError(
                        f"{rep_id(model, layer)} points to data node {node!r}, which is missing"
                    ) from None
        else:
            raise StoreError(
                f"{rep_id(model, layer)} in {self.path!r} was replaced {_READ_ATTEMPTS} "
                "times while being opened; try again"
            )
        if not arr.attrs.get("complete"):
            raise CorruptStoreError(f"{rep_id(model, layer)} points to an incomplete write")
        return arr

    def _pointer(self, model: str, layer: str) -> str | None:
        """The node a rep group's ``current`` names, read from disk now (None: no rep)."""
        try:
            return self.root[self._rep_group_path(model, layer)].attrs.get("current")
        except KeyError:
            return None

    def _check_free(self, model: str, layer: str, *, overwrite: bool) -> None:
        """Refuse a write that would replace a rep without ``overwrite``, or whose id
        ``"model/layer"`` another model/layer split already has."""
        rid = rep_id(model, layer)
        if not overwrite and self._pointer(model, layer) is not None:
            raise StoreError(
                f"{rid} already exists in {self.path!r}; pass overwrite=True "
                "(--overwrite) to replace it"
            )
        for other_model, other_layer in _id_splits(rid):
            if (other_model, other_layer) == (model, layer):
                continue
            if self._pointer(other_model, other_layer) is not None:
                raise StoreError(
                    f"model {model!r}, layer {layer!r}: its id {rid!r} is that of model "
                    f"{other_model!r}, layer {other_layer!r}, already in {self.path!r}; "
                    "ids label the results, so rename the model or the layer"
                )

    def _get(self, model: str, layer: str) -> zarr.Array:
        arr = self._current(model, layer)
        if arr is None:
            known = [r.rep_id for r in self.list()]
            hint = difflib.get_close_matches(rep_id(model, layer), known, n=3, cutoff=0.5)
            msg = f"no rep {rep_id(model, layer)!r} in store {self.path!r}"
            if hint:
                msg += f" (did you mean {', '.join(repr(h) for h in hint)}?)"
            elif known:
                shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
                msg += f"; stored reps: {shown}"
            else:
                msg += "; the store is empty"
            raise StoreError(msg)
        return arr

    def __contains__(self, key: tuple[str, str]) -> bool:
        model, layer = key
        return self._current(model, layer) is not None

    def list(self) -> list[RepRecord]:
        """One :class:`RepRecord` per complete rep, in the order they were written.

        Models come in the order of their first rep, and each model's layers in the order
        they were first written (:func:`extract` writes them in forward order), so
        ``conv2`` stays before ``conv10`` and ``relu1`` before ``out``. Replacing a rep
        keeps its place. Reps written before smd-dist recorded this order come first, by
        name.
        """
        try:
            reps = self.root["reps"]
        except KeyError:
            return []
        nodes = dict(reps.members(max_depth=None))
        records, written = [], {}
        for path, node in nodes.items():
            if path.count("/") != 1 or not isinstance(node, zarr.Group):
                continue
            current = node.attrs.get("current")
            arr = nodes.get(f"{path}/{current}") if current else None
            if arr is None or not arr.attrs.get("complete"):
                continue
            record = _record(arr.attrs.asdict())
            records.append(record)
            order = node.attrs.get(ORDER_ATTR)
            written[record.rep_id] = order if isinstance(order, int) else 0
        first = {}
        for r in records:
            first[r.model] = min(first.get(r.model, written[r.rep_id]), written[r.rep_id])
        return sorted(
            records,
            key=lambda r: (first[r.model], r.model, written[r.rep_id], r.layer),
        )

    def record(self, model: str, layer: str) -> RepRecord:
        """The :class:`RepRecord` of one rep."""
        return _record(self._get(model, layer).attrs.asdict())

    # --- reading ---------------------------------------------------------------------------

    def read(
        self,
        model: str,
        layer: str,
        *,
        verify: bool = True,
        content_hash: str | None = None,
    ) -> np.ndarray:
        """Load one rep into memory as a float32 (stimuli, neurons) array.

        Parameters
        ----------
        verify : bool
            Recompute the content hash and compare it with the stored one.
        content_hash : str, optional
            The content hash the caller expects (from a :class:`RepRecord` read earlier).
            The array returned is then the one with this hash, checked on the values
            read, or :class:`RepChangedError` is raised: the rep was replaced since.

        Raises
        ------
        StoreError
            No such rep (the message suggests close names).
        RepChangedError
            ``content_hash`` is given and the rep now holds other values.
        CorruptStoreError
            A chunk fails its checksum, or (``verify=True``) the values do not match the
            content hash — which is how a deleted chunk shows up.

        Notes
        -----
        Another process may replace the rep while it is read, and delete the data node
        being read; the pointer is then read again (a few times at most), so a reader
        never takes a newer write's deletion for damage.
        """
        check = verify or content_hash is not None
        for _ in range(_READ_ATTEMPTS):
            arr = self._get(model, layer)
            stored = arr.attrs.get("content_hash")
            if content_hash is not None and stored != content_hash:
                raise RepChangedError(
                    f"{rep_id(model, layer)} changed in {self.path!r}: its content hash is "
                    f"{stored[:19]}..., {content_hash[:19]}... was expected"
                )
            try:
                data = np.asarray(arr[...])
            except Exception as err:
                if self._replaced(model, layer, arr):
                    continue
                raise CorruptStoreError(
                    f"{rep_id(model, layer)} in {self.path!r} cannot be read: {err} "
                    "(run ActivationStore.verify() for the damaged chunks)"
                ) from err
            if not check:
                # Unhashed, a node deleted under the read would come back as fill values.
                if self._replaced(model, layer, arr):
                    continue
                return data
            hasher = _Hasher()
            hasher.update(data)
            got = hasher.hexdigest(data.shape)
            if got == stored:
                return data
            if self._replaced(model, layer, arr):
                continue
            raise CorruptStoreError(
                f"{rep_id(model, layer)} in {self.path!r} fails its content hash "
                f"(stored {stored}, computed {got}): a chunk is missing or altered"
            )
        raise (RepChangedError if content_hash is not None else StoreError)(
            f"{rep_id(model, layer)} in {self.path!r} was replaced by newer writes "
            f"{_READ_ATTEMPTS} times while being read; try again when they are done"
        )

    def _replaced(self, model: str, layer: str, arr: zarr.Array) -> bool:
        """Whether the rep's pointer has moved away from ``arr`` (a newer write landed)."""
        try:
            now = self._current(model, layer)
        except StoreError:
            return True
        return now is None or now.path != arr.path

    def open(self, model: str, layer: str):
        """A lazy :mod:`dask.array` view of one rep, chunked like the store.

        Chunk checksums are checked when chunks are computed; the content hash is not
        (use :meth:`read` or :meth:`verify`).
        """
        import dask.array as da

        arr = self._get(model, layer)
        # Equal content and chunking give the same dask key, whichever rep it is.
        token = arr.attrs.get("content_hash", "").replace("sha256:", "")[:32]
        rows, cols = arr.chunks
        return da.from_zarr(arr, name=f"smd-dist-rep-{token}-{rows}x{cols}", inline_array=False)

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(
        self,
        model: str,
        layer: str,
        n_neurons: int,
        *,
        overwrite: bool = False,
        attrs: dict | None = None,
        chunks: tuple[int, int] | None = None,
    ) -> Iterator[RepWriter]:
        """Stream one rep in, batch of stimuli by batch, without holding it in memory.

        >>> with store.writer("cnn", "conv1", 512) as w:      # doctest: +SKIP
        ...     for batch in batches:
        ...         w.append(batch)                           # (batch_stimuli, 512)

        The rep becomes visible only when the block exits without an exception; any error
        inside the block discards what was appended and leaves the store as it was.
        """
        self._require_writable()
        w = RepWriter(self, model, layer, n_neurons, overwrite=overwrite, attrs=attrs,
                      chunks=chunks)
        try:
            yield w
            w._commit()
        except BaseException:
            w._abort()
            raise

    def write(
        self,
        model: str,
        layer: str,
        array: np.ndarray,
        *,
        overwrite: bool = False,
        attrs: dict | None = None,
    ) -> RepRecord:
        """Store one (stimuli, neurons) array as float32.

        Raises
        ------
        StoreError
            The rep exists and ``overwrite`` is False; the array is not 2-D, has non-finite
            values, or a stimulus count different from the store's; attrs are not JSON-safe.
        """
        array = np.asarray(array)
        if array.ndim != 2:
            raise StoreError(
                f"{rep_id(model, layer)}: expected a 2-D (stimuli, neurons) array, "
                f"got shape {array.shape}"
            )
        chunks = default_chunks(array.shape[0], array.shape[1]) if array.shape[1] else None
        with self.writer(
            model, layer, array.shape[1], overwrite=overwrite, attrs=attrs, chunks=chunks
        ) as w:
            w.append(array)
        return w.record

    def remove(self, model: str, layer: str) -> None:
        """Delete one rep (raises :class:`StoreError` if absent)."""
        self._require_writable()
        self._get(model, layer)
        gpath = self._rep_group_path(model, layer)
        with self._rep_lock(model, layer):
            node = self._pointer(model, layer)
            if node is None:
                raise StoreError(f"no rep {rep_id(model, layer)!r} in store {self.path!r} "
                                 "(removed by another process meanwhile)")
            group = self.root[gpath]
            group.attrs["current"] = None
            with contextlib.suppress(KeyError):
                del group[node]
            # A write of this rep in progress keeps its node, and the group for it.
            if not list(group.array_keys()):
                del self.root[gpath]

    # --- checking --------------------------------------------------------------------------

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Read every chunk of every rep, recompute every content hash, report problems.

        Reads one band of chunk rows at a time, so memory stays at one band.
        """
        from zarr.core.sync import sync

        missing, corrupt, mismatched, stim, incomplete = [], [], [], [], []
        try:
            _ = self.stimulus_ids
        except CorruptStoreError as err:
            stim.append(str(err))
        records = self.list()
        try:
            nodes = dict(self.root["reps"].members(max_depth=None))
        except KeyError:
            nodes = {}
        for path, node in nodes.items():
            if path.count("/") == 2 and isinstance(node, zarr.Array):
                parent = nodes.get(path.rsplit("/", 1)[0])
                if not node.attrs.get("complete") or parent.attrs.get("current") != path.rsplit(
                    "/", 1
                )[1]:
                    a = node.attrs.asdict()
                    incomplete.append(f"{a.get('model')}/{a.get('layer')} (node {path})")
        incomplete += self._leftover_folders(nodes)
        problems = self._rep_problems(records)
        iterator = records
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(records, desc="verify", unit="rep")
        for rec in iterator:
            arr = self._get(rec.model, rec.layer)
            m, n = arr.shape
            rows, cols = arr.chunks
            hasher = _Hasher()
            damaged = False
            for r0 in range(0, m, rows):
                r1 = min(m, r0 + rows)
                band = np.full((r1 - r0, n), np.nan, dtype=STORED_DTYPE)
                for c0 in range(0, n, cols):
                    c1 = min(n, c0 + cols)
                    key = arr.metadata.encode_chunk_key((r0 // rows, c0 // cols))
                    if not sync(arr.store.exists(f"{arr.path}/{key}")):
                        missing.append((rec.rep_id, key))
                        damaged = True
                        continue
                    try:
                        band[:, c0:c1] = arr[r0:r1, c0:c1]
                    except Exception as err:
                        corrupt.append((rec.rep_id, key, str(err)))
                        damaged = True
                hasher.update(band)
            if damaged or hasher.hexdigest((m, n)) != rec.content_hash:
                mismatched.append(rec.rep_id)
        return VerifyReport(
            n_reps=len(records),
            missing_chunks=tuple(missing),
            corrupt_chunks=tuple(corrupt),
            hash_mismatches=tuple(mismatched),
            stimuli_problems=tuple(stim),
            incomplete=tuple(incomplete),
            rep_problems=tuple(problems),
        )

    def _rep_problems(self, records: list[RepRecord]) -> list[str]:
        """Reps whose stimulus count is not the store's; ids that two reps share."""
        problems = []
        n = self.n_stimuli
        for rec in records:
            if n is None or rec.n_stimuli != n:
                problems.append(
                    f"stimulus count mismatch: {rec.rep_id} has {rec.n_stimuli} stimuli, "
                    f"the store has {n}"
                )
        by_id: dict[str, list[RepRecord]] = {}
        for rec in records:
            by_id.setdefault(rec.rep_id, []).append(rec)
        for rid, recs in sorted(by_id.items()):
            if len(recs) > 1:
                splits = " and ".join(f"model {r.model!r} + layer {r.layer!r}" for r in recs)
                problems.append(f"id {rid!r} is shared by {splits}; rename one")
        return problems

    def _leftover_folders(self, nodes: dict) -> list[str]:
        """Folders under a rep group that are no zarr node (chunks written after their
        node was deleted): invisible to zarr's listing, found on the file system."""
        if _is_url(self.path):
            return []
        reps = os.path.join(self.path, "reps")
        found = []
        for group in {p.rsplit("/", 1)[0] for p in nodes if p.count("/") == 2} | {
            p for p, node in nodes.items() if p.count("/") == 1
        }:
            folder = os.path.join(reps, *group.split("/"))
            with contextlib.suppress(OSError):
                for entry in os.listdir(folder):
                    full = os.path.join(folder, entry)
                    if f"{group}/{entry}" not in nodes and os.path.isdir(full):
                        found.append(f"leftover folder reps/{group}/{entry} (no zarr metadata)")
        return sorted(found)


def _id_splits(rid: str) -> list[tuple[str, str]]:
    """Every (model, layer) whose id is ``rid``: one per ``/`` with text on both sides."""
    return [
        (rid[:i], rid[i + 1:])
        for i, ch in enumerate(rid)
        if ch == "/" and 0 < i < len(rid) - 1
    ]


def _record(attrs: dict) -> RepRecord:
    return RepRecord(
        model=attrs["model"],
        layer=attrs["layer"],
        n_neurons=int(attrs["n_neurons"]),
        n_stimuli=int(attrs["n_stimuli"]),
        content_hash=attrs["content_hash"],
        rep_id=rep_id(attrs["model"], attrs["layer"]),
        attrs=attrs,
    )


class RepWriter:
    """Appends stimulus batches to one rep; made by :meth:`ActivationStore.writer`.

    Rows are buffered until a full band of chunk rows is ready, so each chunk is written
    once; the content hash is updated batch by batch.
    """

    def __init__(
        self,
        store: ActivationStore,
        model: str,
        layer: str,
        n_neurons: int,
        *,
        overwrite: bool,
        attrs: dict | None,
        chunks: tuple[int, int] | None,
    ) -> None:
        self.store = store
        self.model = model
        self.layer = layer
        self.rep_id = rep_id(model, layer)
        if isinstance(n_neurons, bool) or not isinstance(n_neurons, int | np.integer) \
                or n_neurons < 1:
            raise StoreError(f"{self.rep_id}: n_neurons must be a positive int, got {n_neurons!r}")
        self.n_neurons = int(n_neurons)
        self.overwrite = overwrite
        user = dict(attrs or {})
        clash = sorted(set(user) & set(RESERVED_ATTRS))
        if clash:
            raise StoreError(f"{self.rep_id}: attrs {clash} are set by the store itself")
        self._user_attrs = _check_json(user, where=self.rep_id)
        self._gpath = store._rep_group_path(model, layer)  # validates the names
        self._array = None
        # Checked again under the lock at the commit; here to fail before any work.
        store._check_free(model, layer, overwrite=overwrite)
        self._expected_rows = store.n_stimuli
        if chunks is None:
            chunks = default_chunks(self._expected_rows, self.n_neurons)
        if len(chunks) != 2 or not all(isinstance(c, int | np.integer) and c > 0 for c in chunks):
            raise StoreError(f"{self.rep_id}: chunks must be two positive ints, got {chunks!r}")
        self.chunks = (int(chunks[0]), int(chunks[1]))
        self._hasher = _Hasher()
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.n_rows = 0
        self._written = 0
        self.record: RepRecord | None = None
        self._node = "v" + uuid.uuid4().hex[:16]
        # Under the lock: a concurrent first write must not reset a pointer just set, and
        # a concurrent remove() must see this node and keep its group.
        with store._rep_lock(model, layer):
            group = store.root.require_group(self._gpath)
            if "model" not in group.attrs:
                group.attrs.update(
                    {"model": model, "layer": layer, "current": None, ORDER_ATTR: _write_order()}
                )
            self._array = group.create_array(
                self._node,
                shape=(0, self.n_neurons),
                dtype=STORED_DTYPE,
                chunks=self.chunks,
                compressors=[ZstdCodec(level=3), Crc32cCodec()],
                fill_value=np.nan,
                config={"write_empty_chunks": True},
                attributes={"model": model, "layer": layer, "complete": False},
            )

    def append(self, batch: np.ndarray) -> None:
        """Append rows (stimuli) to the rep.

        Parameters
        ----------
        batch : array_like, shape (batch_stimuli, n_neurons)

        Raises
        ------
        StoreError
            Wrong shape or neuron count, non-finite values (the message names the stimulus
            rows), or more rows than the store's stimulus count.
        """
        batch = np.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] != self.n_neurons:
            raise StoreError(
                f"{self.rep_id}: batch of shape {batch.shape} does not fit "
                f"(batch_stimuli, {self.n_neurons}) — expected {self.n_neurons} neurons"
            )
        if not np.issubdtype(batch.dtype, np.number) or np.iscomplexobj(batch):
            raise StoreError(f"{self.rep_id}: batch dtype {batch.dtype} is not real numeric")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            batch = np.ascontiguousarray(batch, dtype=STORED_DTYPE)
        bad = ~np.isfinite(batch).all(axis=1)
        if bad.any():
            rows = (np.flatnonzero(bad) + self.n_rows).tolist()
            shown = rows[:10] + (["..."] if len(rows) > 10 else [])
            raise StoreError(
                f"non-finite values (NaN/Inf, possibly float32 overflow) in {self.rep_id} "
                f"at stimulus rows {shown} ({len(rows)} rows)"
            )
        if self._expected_rows is not None and self.n_rows + len(batch) > self._expected_rows:
            raise StoreError(
                f"stimulus count mismatch: {self.rep_id} has at least "
                f"{self.n_rows + len(batch)} stimuli, the store expects {self._expected_rows}"
            )
        self._hasher.update(batch)
        self._buffer.append(batch)
        self._buffered += len(batch)
        self.n_rows += len(batch)
        if self._buffered >= self.chunks[0]:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._buffer:
            return
        data = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        rows = self.chunks[0]
        take = len(data) if final else (len(data) // rows) * rows
        if take:
            start = self._written
            self._array.resize((start + take, self.n_neurons))
            self._array[start : start + take] = data[:take]
            self._written += take
        rest = data[take:]
        self._buffer = [rest] if len(rest) else []
        self._buffered = len(rest)

    def _commit(self) -> None:
        self._flush(final=True)
        store, shape = self.store, (self.n_rows, self.n_neurons)
        if self.n_rows == 0:
            raise StoreError(f"{self.rep_id}: no stimuli were written")
        attrs = {
            **self._user_attrs,
            "model": self.model,
            "layer": self.layer,
            "n_neurons": self.n_neurons,
            "n_stimuli": self.n_rows,
            "dtype": "float32",
            "content_hash": self._hasher.hexdigest(shape),
            "created": _now(),
            "smd_dist_version": _package_version(),
            "chunks": list(self.chunks),
            "complete": True,
        }
        self._array.attrs.update(attrs)
        with store._rep_lock(self.model, self.layer):
            try:
                group = store.root[self._gpath]
                group[self._node]
            except KeyError:
                raise StoreError(
                    f"{self.rep_id}: its data in {store.path!r} was deleted while it was "
                    "being written (the store was replaced?); nothing was stored"
                ) from None
            try:
                store._check_free(self.model, self.layer, overwrite=self.overwrite)
            except StoreError as err:
                raise StoreError(f"{err} (written by another process meanwhile)") from None
            with store._store_lock():
                n = store.n_stimuli
                if n is not None and n != self.n_rows:
                    raise StoreError(
                        f"stimulus count mismatch: {self.rep_id} has {self.n_rows} stimuli, "
                        f"the store expects {n}"
                    )
                if n is None:
                    store._update_root_attrs({"n_stimuli": self.n_rows})
            old = group.attrs.get("current")
            # The pointer flip is the commit point: before it the old data is intact.
            group.attrs["current"] = self._node
            if old is not None and old != self._node:
                with contextlib.suppress(KeyError, OSError):
                    del group[old]
        self.record = _record(attrs)

    def _abort(self) -> None:
        self._buffer = []
        if self._array is None:
            return
        store = self.store
        try:
            with store._rep_lock(self.model, self.layer):
                group = store.root[self._gpath]
                if group.attrs.get("current") == self._node:
                    return  # committed: never delete the node the pointer names
                with contextlib.suppress(KeyError):
                    del group[self._node]
                if group.attrs.get("current") is None and not list(group.array_keys()):
                    del store.root[self._gpath]
        except Exception:  # cleanup is best effort; the leftover is invisible to list()
            pass
