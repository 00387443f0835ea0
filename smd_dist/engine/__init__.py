"""The all-pairs engine: which pairs, Dask, the ledger, resume, the labeled matrix.

``selection``, ``against``
    Which reps and metrics a run compares; a rectangular run's second selection (the same
    store or another with the same stimuli) and its matrix.
``settings``, ``planning``
    The engine's settings; memory per pair and blocks of the matrix as tasks.
``tasks``, ``worker_cache``
    What runs on a worker: read, prepare and keep reps; compare the pairs of one block.
``clusters``
    Dask clusters from config: local (worker processes, or threads of the calling
    process), an existing scheduler, or SLURM (dask-jobqueue).
``dispatch``
    Blocks sent to Dask in waves, their arrays written to the ledger as they arrive.
``ledger``, ``assembly``, ``output``
    The ledger of pair results in columnar parts; what is done and the labeled matrix,
    from its columns; the output folder (header, ledger, matrix).
``run``
    :func:`compute_distances`, from a selection to the labeled matrix; :func:`plan_run`,
    what a run would do.
``status``
    :func:`output_status`, an output's progress from its ledger.
``pairwise``
    ``pairwise``, every pair of a few in-memory arrays, no store needed
    (:func:`smd_dist.pairwise`).

Public names are imported on first use (PEP 562): a worker process that runs blocks, or
``smd-dist status``, loads only the modules it needs.
"""

from __future__ import annotations

import importlib

#: Public name -> the module that defines it.
_PUBLIC = {
    "CorruptOutputError": "smd_dist.engine.ledger",
    "IncompatibleOutputError": "smd_dist.engine.output",
    "InputError": "smd_dist.engine.selection",
    "OutputError": "smd_dist.engine.ledger",
    "OutputLockedError": "smd_dist.engine.run",
    "RunInterrupted": "smd_dist.engine.run",
    "RunPlan": "smd_dist.engine.run",
    "RunReport": "smd_dist.engine.run",
    "SchedulerLostError": "smd_dist.engine.run",
    "compute_distances": "smd_dist.engine.run",
    "open_distances": "smd_dist.engine.output",
    "output_status": "smd_dist.engine.status",
    "plan_run": "smd_dist.engine.run",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smd_dist.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
