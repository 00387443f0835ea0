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
