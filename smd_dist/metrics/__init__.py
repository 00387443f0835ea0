"""Metrics on pairs of representations and the name → metric registry.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column.
"""

from smd_dist.metrics.comparison import linear_cka, permutation_distance, procrustes_distance
from smd_dist.metrics.cross_validation import CrossValidatedScore, soft_matching_cv
from smd_dist.metrics.partial import (
    PartialSoftMatchingResult,
    partial_soft_matching,
    partial_soft_matching_score,
)
from smd_dist.metrics.registry import Metric, PairValue, available, get, register
from smd_dist.metrics.soft_matching import (
    SoftMatchingResult,
    soft_matching,
    soft_matching_distance,
    soft_matching_score,
)

__all__ = [
    "CrossValidatedScore",
    "Metric",
    "PairValue",
    "PartialSoftMatchingResult",
    "SoftMatchingResult",
    "available",
    "get",
    "linear_cka",
    "partial_soft_matching",
    "partial_soft_matching_score",
    "permutation_distance",
    "procrustes_distance",
    "register",
    "soft_matching",
    "soft_matching_cv",
    "soft_matching_distance",
    "soft_matching_score",
]
