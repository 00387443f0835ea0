"""Activations computed elsewhere, from ``.npy``, ``.npz`` or HDF5 files, into a store.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column. Every array chosen
is checked (2-D, one row per stimulus, the same stimuli as the ids and the store) before
anything is written; each is then streamed into the store a band of rows at a time, so an
HDF5 dataset larger than memory imports too.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from smd_dist.store.activation_store import (
    ActivationStore,
    RepRecord,
    StoreError,
    default_chunks,
    rep_id,
)

__all__ = ["STIMULUS_KEYS", "SUFFIXES", "import_arrays"]

#: Entries of an ``.npz`` or HDF5 file taken as the stimulus ids (1-D, one per row).
STIMULUS_KEYS = ("stimulus_ids", "stimuli")
SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[dict, object]]:
    """``({key: array-like}, stimulus ids or None)`` in the file's order; HDF5 stays lazy."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        yield {path.stem: np.load(path, mmap_mode="r", allow_pickle=False)}, None
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
            ids = next((arrays.pop(k) for k in STIMULUS_KEYS if k in arrays), None)
            yield arrays, ids
    elif suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError as err:
            raise StoreError(
                f"reading {path.name} needs h5py (pip install 'smd-dist[netcdf]')"
            ) from err
        with h5py.File(path, "r") as f:
            arrays: dict = {}

            def collect(name, node):  # returns None: visititems stops at a value
                if isinstance(node, h5py.Dataset):
                    arrays[name] = node

            f.visititems(collect)
            ids = next((arrays.pop(k)[()] for k in STIMULUS_KEYS if k in arrays), None)
            if ids is not None and ids.dtype.kind in "OS":
                ids = [v.decode() if isinstance(v, bytes) else str(v) for v in ids]
            yield arrays, ids
    else:
        raise StoreError(
            f"{path.name}: cannot import a {suffix or 'suffix-less'} file; "
            f"use one of {', '.join(SUFFIXES)}"
        )


def import_arrays(
    store: ActivationStore | str,
    path: str | os.PathLike,
    *,
    model: str,
    layers: Sequence[str] | Mapping[str, str] | None = None,
    stimulus_ids: Sequence | None = None,
    overwrite: bool = False,
) -> list[RepRecord]:
    """Store the (stimuli, neurons) arrays of one file as the layers of ``model``.

    Parameters
    ----------
    store : ActivationStore or str
        Target store (a path opens it in mode ``"a"``).
    path : str or path-like
        An ``.npy`` file (one array, its layer named after the file), an ``.npz`` archive
        or an HDF5 file (``.h5``, ``.hdf5``; each dataset a layer, named by its path).
    model : str
        The model name in the store.
    layers : sequence or mapping of str, optional
        Which arrays, in which order (the store lists them in this order): their keys,
        or ``{key: layer name}``. For an ``.npy`` file, one name for its array. Default:
        every array in the file's order.
    stimulus_ids : sequence, optional
        One id per row. Default: the file's ``stimulus_ids`` (or ``stimuli``) entry, if
        any.
    overwrite : bool
        Replace layers already in the store.

    Returns
    -------
    list of RepRecord
        One per layer, in order.

    Raises
    ------
    StoreError
        An unknown key (the closest named), an array that is not 2-D, arrays with
        different numbers of rows, ids that do not match the rows or the store's, layers
        already stored (without ``overwrite``), a file type other than :data:`SUFFIXES`;
        all found before anything is written.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no file {str(path)!r} to import")
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store, mode="a")
    with _opened(path) as (arrays, file_ids):
        chosen = _chosen(path, arrays, layers)
        rows = set()
        for key in chosen:
            shape = tuple(arrays[key].shape)
            if len(shape) != 2 or arrays[key].dtype.kind not in "iuf":
                raise StoreError(
                    f"{path.name}: {key!r} is {arrays[key].dtype} of shape {shape}; expected "
                    "a 2-D numeric (stimuli, neurons) array (reshape it to (stimuli, -1))"
                )
            rows.add(shape[0])
        if len(rows) > 1:
            counts = {key: arrays[key].shape[0] for key in chosen}
            raise StoreError(f"{path.name}: the arrays have different numbers of rows: {counts}")
        n_rows = rows.pop()
        ids = stimulus_ids if stimulus_ids is not None else file_ids
        if ids is not None and len(ids) != n_rows:
            raise StoreError(
                f"{len(ids)} stimulus ids for {n_rows} rows in {path.name}; give one id per row"
            )
        if store.n_stimuli is not None and store.n_stimuli != n_rows:
            raise StoreError(
                f"stimulus count mismatch: {path.name} has {n_rows} stimuli, the store "
                f"expects {store.n_stimuli}"
            )
        existing = [rep_id(model, layer) for layer in chosen.values() if (model, layer) in store]
        if existing and not overwrite:
            raise StoreError(
                f"{', '.join(existing)} already in {store.path!r}; pass overwrite=True "
                "(--overwrite) to replace"
            )
        if ids is not None:
            store.set_stimuli(ids)
        records = []
        for key, layer in chosen.items():
            array = arrays[key]
            chunks = default_chunks(n_rows, array.shape[1])
            attrs = {"source": "smd_dist.import", "file": path.name, "key": key}
            with store.writer(
                model, layer, int(array.shape[1]), overwrite=overwrite, attrs=attrs, chunks=chunks
            ) as writer:
                for start in range(0, n_rows, chunks[0]):
                    writer.append(np.asarray(array[start : start + chunks[0]]))
            records.append(writer.record)
    return records


def _chosen(path: Path, arrays: dict, layers) -> dict[str, str]:
    """``{key: layer name}`` of the arrays to import, in order."""
    if path.suffix.lower() == ".npy":
        (key,) = arrays
        if layers is None:
            return {key: key}
        names = [layers] if isinstance(layers, str) else list(layers)
        if isinstance(layers, Mapping) or len(names) != 1:
            raise StoreError(f"{path.name} holds one array: name its layer once, got {layers!r}")
        return {key: names[0]}
    if layers is None:
        if not arrays:
            raise StoreError(f"{path.name} holds no array to import")
        return {key: key for key in arrays}
    mapping = dict(layers) if isinstance(layers, Mapping) else {k: k for k in layers}
    for key in mapping:
        if key not in arrays:
            close = difflib.get_close_matches(key, list(arrays), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise StoreError(
                f"{path.name} has no array {key!r}{hint}; it has: {', '.join(arrays)}"
            )
    names = list(mapping.values())
    if len(set(names)) != len(names):
        raise StoreError(f"two arrays map to the same layer name: {names}")
    return mapping
