"""The all-pairs engine: which pairs, Dask, the ledger, resume, the labeled matrix.

``selection``
    Which reps and metrics a run compares.
``settings``, ``planning``
    The engine's settings; memory per pair and the grouping of pairs into tasks.
``tasks``, ``worker_cache``
    What runs on a worker: read, prepare and keep reps; compare the pairs of one task.
``clusters``
    Dask clusters from config: local, an existing scheduler, or SLURM (dask-jobqueue).
``output``
    The results output: the ledger of pair records and the assembled labeled matrix.
``run``
    :func:`compute_distances`, from a selection to the labeled matrix.
"""

from smd_dist.engine.output import (
    CorruptOutputError,
    IncompatibleOutputError,
    OutputError,
    open_distances,
)
from smd_dist.engine.run import (
    OutputLockedError,
    RunReport,
    SchedulerLostError,
    compute_distances,
    output_status,
)
from smd_dist.engine.selection import InputError

__all__ = [
    "CorruptOutputError",
    "IncompatibleOutputError",
    "InputError",
    "OutputError",
    "OutputLockedError",
    "RunReport",
    "SchedulerLostError",
    "compute_distances",
    "open_distances",
    "output_status",
]
