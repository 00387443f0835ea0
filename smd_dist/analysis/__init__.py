"""Analysis of a distance matrix: selection, MDS, clustering, the rotation null, figures.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column.
"""

from smd_dist.analysis._matrix import dissimilarity, metric_names, select
from smd_dist.analysis.clustering import Clustering, cluster
from smd_dist.analysis.embedding import Embedding, classical_mds, kruskal_stress, metric_mds
from smd_dist.analysis.matching import best_matches
from smd_dist.analysis.null import RotationNull, haar_orthogonal, live_neurons, rotation_null
from smd_dist.analysis.plots import plot_dendrogram, plot_heatmap, plot_mds

__all__ = [
    "Clustering",
    "Embedding",
    "RotationNull",
    "best_matches",
    "classical_mds",
    "cluster",
    "dissimilarity",
    "haar_orthogonal",
    "kruskal_stress",
    "live_neurons",
    "metric_mds",
    "metric_names",
    "plot_dendrogram",
    "plot_heatmap",
    "plot_mds",
    "rotation_null",
    "select",
]
