"""The activation store: a zarr cache of (stimuli, neurons) arrays, and extraction into it.

``activation_store``
    :class:`ActivationStore`, one zarr group per stimulus set, one checksummed array per
    (model, layer).
``extraction``
    :func:`extract`: forward hooks on a torch model's modules, streamed into a store
    (imported on first use: it needs torch).
``importing``
    :func:`import_arrays`: arrays from ``.npy``, ``.npz`` or HDF5 files into a store.
"""

from __future__ import annotations

import importlib

from smd_dist.store.activation_store import (
    ActivationStore,
    CorruptStoreError,
    RepRecord,
    StoreError,
    VerifyReport,
    content_hash,
    rep_id,
)
from smd_dist.store.importing import import_arrays

_EXTRACTION = ("ExtractionError", "extract")

__all__ = [
    "ActivationStore",
    "CorruptStoreError",
    "ExtractionError",
    "RepRecord",
    "StoreError",
    "VerifyReport",
    "content_hash",
    "extract",
    "import_arrays",
    "rep_id",
]


def __getattr__(name: str):
    if name in _EXTRACTION:
        return getattr(importlib.import_module("smd_dist.store.extraction"), name)
    raise AttributeError(f"module 'smd_dist.store' has no attribute {name!r}")
