"""Shared fixtures: tiny arrays, a tiny store, an in-process cluster."""

from __future__ import annotations

import os

# Workers and tests run BLAS single-threaded: results must not depend on thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_store(tmp_path):
    """An activation store with 3 models x 2 layers (conv1: 8 neurons, fc: 5), 20 stimuli.

    Model "b" is model "a" with its conv1 neurons permuted, so its soft matching distance
    to "a" at conv1 is zero.
    """
    from smd_dist.store import ActivationStore

    gen = np.random.default_rng(7)
    store = ActivationStore(tmp_path / "tiny_store", mode="w")
    store.set_stimuli([f"stim{i:02d}" for i in range(20)])
    a_conv1 = gen.normal(size=(20, 8))
    store.write("a", "conv1", a_conv1)
    store.write("a", "fc", gen.normal(size=(20, 5)))
    store.write("b", "conv1", a_conv1[:, gen.permutation(8)])
    store.write("b", "fc", gen.normal(size=(20, 5)))
    store.write("c", "conv1", gen.normal(size=(20, 8)))
    store.write("c", "fc", gen.normal(size=(20, 5)))
    return store
