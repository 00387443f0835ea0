"""smd-dist: all-pairs soft matching distance between neural representations.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smd-dist")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from smd_dist.engine import InputError, compute_distances
from smd_dist.extract import extract
from smd_dist.metrics import (
    linear_cka,
    permutation_distance,
    procrustes_distance,
    soft_matching,
    soft_matching_distance,
    soft_matching_score,
)
from smd_dist.metrics.soft_matching import SoftMatchingResult
from smd_dist.results import CorruptOutputError, OutputError, open_distances
from smd_dist.solvers import SolverError
from smd_dist.store import ActivationStore, CorruptStoreError, StoreError

__all__ = [
    "__version__",
    "ActivationStore",
    "CorruptOutputError",
    "CorruptStoreError",
    "InputError",
    "OutputError",
    "SolverError",
    "StoreError",
    "SoftMatchingResult",
    "compute_distances",
    "extract",
    "linear_cka",
    "open_distances",
    "permutation_distance",
    "procrustes_distance",
    "soft_matching",
    "soft_matching_distance",
    "soft_matching_score",
]
