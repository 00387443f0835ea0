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
    :func:`compute_distances`, from a selection to the labeled matrix; :func:`plan_run`,
    what a run would do.
``pairwise``
    :func:`pairwise`, every pair of a few in-memory arrays, no store needed.
"""

from smd_dist.engine.output import (
    CorruptOutputError,
    IncompatibleOutputError,
    OutputError,
    open_distances,
)
from smd_dist.engine.pairwise import pairwise
from smd_dist.engine.run import (
    OutputLockedError,
    RunInterrupted,
    RunPlan,
    RunReport,
    SchedulerLostError,
    compute_distances,
    output_status,
    plan_run,
)
from smd_dist.engine.selection import InputError

__all__ = [
    "CorruptOutputError",
    "IncompatibleOutputError",
    "InputError",
    "OutputError",
    "OutputLockedError",
    "RunInterrupted",
    "RunPlan",
    "RunReport",
    "SchedulerLostError",
    "SchedulerLostError",
    "compute_distances",
    "open_distances",
    "output_status",
    "pairwise",
    "plan_run",
]
