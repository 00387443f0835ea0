"""smd-dist: all-pairs soft matching distance between neural representations.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column.

Every public name is imported on first use (PEP 562), so ``import smd_dist`` and
``smd-dist --help`` load none of torch, Dask, zarr, xarray or POT.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smd-dist")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Public name -> the module that defines it.
_PUBLIC = {
    "ActivationStore": "smd_dist.store",
    "CorruptOutputError": "smd_dist.engine",
    "CorruptStoreError": "smd_dist.store",
    "CrossValidatedScore": "smd_dist.metrics",
    "InputError": "smd_dist.engine",
    "OutputError": "smd_dist.engine",
    "PartialSoftMatchingResult": "smd_dist.metrics",
    "SoftMatchingResult": "smd_dist.metrics",
    "SolverError": "smd_dist.kernel",
    "StoreError": "smd_dist.store",
    "compute_distances": "smd_dist.engine",
    "extract": "smd_dist.store",
    "linear_cka": "smd_dist.metrics",
    "open_distances": "smd_dist.engine",
    "pairwise": "smd_dist.engine.pairwise",
    "partial_soft_matching": "smd_dist.metrics",
    "partial_soft_matching_score": "smd_dist.metrics",
    "permutation_distance": "smd_dist.metrics",
    "procrustes_distance": "smd_dist.metrics",
    "soft_matching": "smd_dist.metrics",
    "soft_matching_cv": "smd_dist.metrics",
    "soft_matching_distance": "smd_dist.metrics",
    "soft_matching_score": "smd_dist.metrics",
}

#: Modules of the flat layout before 0.2, with where they live now (deprecated aliases).
_MOVED = {
    "smd_dist.cluster": "smd_dist.engine.clusters",
    "smd_dist.extract": "smd_dist.store.extraction",
    "smd_dist.prepare": "smd_dist.kernel.preparation",
    "smd_dist.results": "smd_dist.engine.output",
    "smd_dist.screening": "smd_dist.kernel.bounds",
    "smd_dist.solvers": "smd_dist.kernel.transport",
    "smd_dist.synthetic": "smd_dist.demo.workloads",
    "smd_dist.validation": "smd_dist.kernel.validation",
    "smd_dist.worker_cache": "smd_dist.engine.worker_cache",
}

#: Subpackages reachable as attributes (``smd_dist.analysis.mds(...)``), imported on first use.
_SUBPACKAGES = ("analysis", "demo", "engine", "kernel", "metrics", "store")

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"smd_dist.{name}")
    raise AttributeError(f"module 'smd_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})


from smd_dist import _moved  # noqa: E402  (after the tables it reads)

_moved.install(_MOVED)
