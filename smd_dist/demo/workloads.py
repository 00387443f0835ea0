"""Synthetic representations in the three regimes the benchmarks and tests use.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column.

``latent``
    Two layers reading a shared low-dimensional latent through independent random
    weights: similar population geometry, no neuron-to-neuron correspondence.
``permuted``
    The second layer is the first with its neurons permuted, plus noise: a clear
    one-to-one correspondence (widths must be equal; otherwise columns are resampled).
``redundant``
    Wide layers with near-duplicate neurons: columns resampled with replacement from a
    base layer plus noise, and 10 % dead (all-zero) units, which make exact ties.
"""

from __future__ import annotations

import numpy as np

REGIMES = ("latent", "permuted", "redundant")


def family(
    regime: str,
    widths: list[int] | tuple[int, ...],
    *,
    n_stimuli: int = 2000,
    seed: int = 0,
    latent_dim: int = 32,
    noise: float = 0.1,
) -> list[np.ndarray]:
    """Float64 (stimuli, neurons) arrays, one per width, sharing ``regime``'s structure.

    In ``permuted`` each array takes a random subset of one base layer's neurons (all of
    them, permuted, when the widths are equal), so that every pair has a correspondence.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_stimuli, latent_dim))

    def readout(n):
        return np.tanh(latent @ rng.standard_normal((latent_dim, n)) / np.sqrt(latent_dim))

    def noisy(x, scale):
        return x + scale * rng.standard_normal(x.shape)

    if regime == "latent":
        return [noisy(readout(n), noise) for n in widths]
    if regime == "permuted":
        base = readout(max(widths))
        return [noisy(base[:, rng.permutation(base.shape[1])[:n]], noise) for n in widths]
    core = readout(max(8, min(widths) // 4))
    out = []
    for n in widths:
        x = noisy(core[:, rng.integers(0, core.shape[1], size=n)], 0.05 * noise)
        x[:, rng.choice(n, size=n // 10, replace=False)] = 0.0
        out.append(x)
    return out


def pair(
    regime: str,
    n_x: int,
    n_y: int,
    *,
    n_stimuli: int = 2000,
    seed: int = 0,
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of widths ``n_x`` and ``n_y`` in ``regime`` (see :func:`family`)."""
    x, y = family(regime, [n_x, n_y], n_stimuli=n_stimuli, seed=seed, noise=noise)
    return x, y
