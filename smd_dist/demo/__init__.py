"""The offline demo stores and the synthetic workloads of benchmarks and tests.

``build``
    :func:`build_demo`: digits CNNs and MiniLM-L6 activation stores, built offline.
``workloads``
    Synthetic (stimuli, neurons) arrays in three regimes: shared latent, permuted copy,
    redundant neurons with dead units.
"""

from smd_dist.demo.build import (
    DIGITS_LAYERS,
    FULL,
    MINILM_LAYERS,
    SMALL,
    DemoBuild,
    build_demo,
    load_sentences,
)

__all__ = ["DIGITS_LAYERS", "FULL", "MINILM_LAYERS", "SMALL", "DemoBuild", "build_demo",
           "load_sentences"]
