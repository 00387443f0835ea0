"""The low-precision cost bounds: every bound against float64 costs computed independently."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_transport import make

from smd_dist.kernel import bounds as bounds_module
from smd_dist.kernel.bounds import BoundViolation, CostBounds
from smd_dist.kernel.preparation import squared_distances

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(params=DTYPES, ids=["bfloat16", "float32"])
def product_dtype(request, monkeypatch):
    """Force the product precision whatever the probe would pick on this CPU."""
    monkeypatch.setitem(bounds_module._PRODUCT_DTYPE, "cpu", request.param)
    return request.param


def _bounds(X, Y):
    norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
    return CostBounds(X, Y, norms, device=torch.device("cpu")), norms


def _relu_sparse(rng, m, n):
    A = rng.standard_normal((m, n)) @ rng.standard_normal((n, n)) * 0.1
    return np.maximum(A - 1.0, 0.0)  # mostly zero, heavy tailed: like late ReLU layers


CASES = {
    "gaussian": lambda rng: (rng.standard_normal((300, 40)), rng.standard_normal((300, 50))),
    "huge": lambda rng: (
        1e12 * rng.standard_normal((50, 30)),
        1e12 * rng.standard_normal((50, 30)),
    ),
    "tiny": lambda rng: (
        1e-12 * rng.standard_normal((50, 30)),
        3e-13 * rng.standard_normal((50, 20)),
    ),
    "mixed_scales": lambda rng: (
        rng.standard_normal((80, 30)) * np.logspace(-6, 6, 30),
        rng.standard_normal((80, 25)) * np.logspace(6, -6, 25),
    ),
    "integers": lambda rng: (
        rng.integers(-3, 4, (200, 30)).astype(float),
        rng.integers(-3, 4, (200, 30)).astype(float),
    ),
    "relu": lambda rng: (_relu_sparse(rng, 400, 30), _relu_sparse(rng, 400, 30)),
    "near_copies": lambda rng: (
        (A := rng.standard_normal((500, 30))),
        A[:, ::-1] + 1e-9 * rng.standard_normal((500, 30)),
    ),
    "long_curves": lambda rng: (rng.standard_normal((6000, 12)), rng.standard_normal((6000, 9))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lower_bounds_hold_and_are_tight(case, product_dtype):
    X, Y = CASES[case](np.random.default_rng(len(case)))
    b, norms = _bounds(X, Y)
    D = squared_distances(X, Y)
    low = b.lower.double().numpy()
    scale = norms[0].max() + norms[1].max()
    assert np.all(low <= D), f"bound above the exact cost by {(low - D).max():.3g}"
    # Not vacuous: within the product's precision of the truth (so this test can fail). In
    # float32 the worst-case accumulation term 2·M·2⁻²⁴·|x||y| dominates.
    width = 0.05 if product_dtype == torch.bfloat16 else 4 * X.shape[0] * 2.0**-24 + 1e-5
    assert np.all(D - low <= width * scale)


def test_exact_costs_match_float64(product_dtype):
    X, Y = make("latent", 60, 30, 40, 1)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    keys = np.sort(np.random.default_rng(0).choice(30 * 40, 300, replace=False)).astype(np.int64)
    got = b.exact(keys)
    np.testing.assert_allclose(got, D.ravel()[keys], rtol=0, atol=1e-12 * D.max())


def test_exact_refuses_a_broken_bound():
    X, Y = make("latent", 60, 30, 30, 2)
    b, _ = _bounds(X, Y)
    b.lower[3, 4] += 1e3 * float(b.lower.abs().max())  # as if the product's error were larger
    with pytest.raises(BoundViolation, match="lower bound"):
        b.exact(np.array([3 * 30 + 4], dtype=np.int64))


def test_below_flags_every_entry_it_cannot_prove(product_dtype):
    rng = np.random.default_rng(5)
    X, Y = make("latent", 80, 50, 50, 3)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    for _ in range(5):
        u = D.min(axis=1) - rng.random(50) * D.std()
        v = (D - u[:, None]).min(axis=0) - rng.random(50) * D.std() * 0.01
        flagged = np.zeros(D.size, bool)
        flagged[b.below(u, v)] = True
        reduced = (D - u[:, None] - v[None, :]).ravel()
        assert np.all(reduced[~flagged] >= 0)
        assert flagged.sum() < D.size  # the bound proves something


def test_candidates_cover_every_row_and_column():
    X, Y = make("latent", 80, 64, 64, 4)
    b, _ = _bounds(X, Y)
    keys = b.candidates(4)
    assert np.all(np.diff(keys) > 0)
    assert set(np.unique(keys // 64)) == set(range(64))
    assert set(np.unique(keys % 64)) == set(range(64))
    assert keys.size < 64 * 64 / 4  # sparse


def test_product_precision_follows_the_hardware(monkeypatch):
    assert bounds_module.product_dtype(torch.device("cuda")) == torch.float32
    cases = [
        ({"amx_bf16": True, "avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": False, "avx512_bf16": True}, torch.bfloat16),  # e.g. AMD Zen 4
        ({"amx_bf16": True}, torch.bfloat16),
        ({"amx_bf16": False, "avx512_bf16": False, "avx2": True}, torch.float32),
        ({}, torch.float32),
    ]
    for capabilities, expected in cases:
        monkeypatch.setattr(bounds_module, "_PRODUCT_DTYPE", {})
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert bounds_module.product_dtype(torch.device("cpu")) == expected, capabilities


def test_a_product_that_breaks_the_bound_is_not_used(monkeypatch):
    """The self-test catches a library whose bfloat16 products are less accurate."""
    assert bounds_module._bound_holds(torch.bfloat16, torch.device("cpu"))
    real = torch.Tensor.__matmul__

    def sloppy(a, b):  # as if partial sums were rounded to bfloat16 along the way
        out = real(a, b)
        return out * (1 - 2.0**-6) if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(torch.Tensor, "__matmul__", sloppy)
    assert not bounds_module._bound_holds(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(bounds_module, "_PRODUCT_DTYPE", {})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert bounds_module.product_dtype(torch.device("cpu")) == torch.float32


def test_below_over_budget_keeps_the_most_doubtful_of_each_row(
    product_dtype, quarter_budget_check
):
    X, Y = make("latent", 80, 64, 300, 3)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    u = D.min(axis=1) + 0.5 * D.std()  # far from feasible: most entries are doubtful
    v = np.zeros(300)
    full, complete = b.below(u, v)
    assert complete and full.size > 64 * 40
    same, complete = b.below(u, v, budget=full.size, per_row=8)
    assert complete and np.array_equal(same, full)
    quarter_budget_check(b, D, u, v, full)


def test_below_with_a_cushion_adds_the_nearly_tight_entries(product_dtype):
    X, Y = make("latent", 80, 64, 300, 3)
    b, _ = _bounds(X, Y)
    D = squared_distances(X, Y)
    u, v = D.min(axis=1), np.zeros(300)  # feasible, tight at each row's minimum
    plain, complete = b.below(u, v)
    assert complete
    cushion = 0.05 * b.scale
    wide, complete = b.below(u, v, cushion=cushion)
    assert complete and np.isin(plain, wide).all() and wide.size > plain.size
    reduced = (D - u[:, None] - v[None, :]).ravel()
    # everything proven a cushion away from tight is left out; what is left in is not far
    assert (reduced[np.setdiff1d(np.arange(D.size), wide)] >= cushion * (1 - 1e-6)).all()
    lower = b.lower.double().numpy().ravel() - u.repeat(300)
    assert (lower[wide] < cushion * (1 + 1e-5)).all()
    assert b.scale == pytest.approx(
        (X * X).sum(0).max() + (Y * Y).sum(0).max(), rel=1e-12
    )
    with pytest.raises(ValueError, match="cushion must be >= 0, got -1"):
        b.below(u, v, cushion=-1.0)


def test_threads_never_see_a_precision_decision_half_made(monkeypatch):
    """A worker's threads share the decision; one asking while the self-test runs waits."""
    import threading
    import time

    monkeypatch.setattr(bounds_module, "_PRODUCT_DTYPE", {})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})

    def slow_self_test(dtype, device):
        time.sleep(0.3)
        return True

    monkeypatch.setattr(bounds_module, "_bound_holds", slow_self_test)
    seen = []
    cpu = torch.device("cpu")
    threads = [
        threading.Thread(target=lambda: seen.append(bounds_module.product_dtype(cpu)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert seen == [torch.bfloat16] * 3


# Run in a fresh interpreter: torch's precision flags are process-wide, and once a
# per-backend flag is set, torch >= 2.9 raises on reads of the legacy one.
PRECISION_PROBE = """
import json, sys, warnings
import numpy as np, ot, torch
from smd_dist.kernel import bounds as bounds_module
from smd_dist.kernel.preparation import preprocess
from smd_dist.kernel.transport import solve
from smd_dist.demo.workloads import family

cpu, cuda = torch.device("cpu"), torch.device("cuda")
X, Y = (preprocess(a) for a in family("latent", [512, 512], n_stimuli=200, seed=1))
reference = ot.emd2(np.full(512, 1 / 512), np.full(512, 1 / 512), ot.dist(X.T, Y.T),
                    numItermax=10**9)

def state():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = solve(X, Y, device="cpu")
    try:
        norms = (np.einsum("mi,mi->i", X, X), np.einsum("mj,mj->j", Y, Y))
        bounds_module.CostBounds(X, Y, norms, device=cpu)
        bounds = "built"
    except bounds_module.ReducedPrecision as err:
        bounds = str(err)
    return {
        "cpu": bounds_module.reduced_float32_matmul(cpu),
        "cuda": bounds_module.reduced_float32_matmul(cuda),
        "other": bounds_module.reduced_float32_matmul(torch.device("meta")),
        "solver": tr.solver,
        "error": abs(tr.cost - reference),
        "passed": tr.certificate.passed,
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        "bounds": bounds,
        "dtype": str(bounds_module.product_dtype(cpu)),
        "decided": "cpu" in bounds_module._PRODUCT_DTYPE,
    }

out = {}
for setting in sys.argv[1:]:
    if setting == "mkldnn-bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    elif setting != "default":
        torch.set_float32_matmul_precision(setting)
    out[setting] = state()
print(json.dumps(out))
"""


def _precision_probe(*settings):
    out = subprocess.run(
        [sys.executable, "-c", PRECISION_PROBE, *settings],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def test_reduced_float32_products_send_pairs_to_the_dense_path():
    """TF32 or bfloat16 passes in float32 products would void the bounds' error terms:
    the solver must not screen with them, and must still return the exact optimum."""
    default = _precision_probe("default")["default"]
    assert default["cpu"] is None and default["cuda"] is None and default["other"] is None
    assert default["solver"] == "sparse-network-simplex" and default["bounds"] == "built"
    assert not default["warnings"] and default["decided"]
    states = _precision_probe("high", "medium", "highest")
    high, medium, highest = (states[k] for k in ("high", "medium", "highest"))
    assert high["cuda"] in ("tf32", "high") and high["cpu"] in ("tf32", "high")
    assert high["other"] == "high"
    assert medium["cpu"] in ("bf16", "medium")
    for state in (high, medium):
        assert state["solver"] in ("assignment", "network-simplex"), state
        assert "'highest'" in state["bounds"] and "precision" in state["bounds"]
        assert len(state["warnings"]) == 1 and "float64 cost matrix" in state["warnings"][0]
        # The product precision is decided by a test product, never under these settings.
        assert state["dtype"] == "torch.float32" and not state["decided"]
    assert highest == default
    for state in (default, *states.values()):
        assert state["passed"] and state["error"] < 1e-9, state


@pytest.mark.skipif(
    not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    reason="torch without per-backend fp32_precision flags",
)
def test_a_cpu_only_precision_flag_leaves_cuda_alone():
    state = _precision_probe("mkldnn-bf16")["mkldnn-bf16"]
    assert state["cpu"] == "bf16" and state["cuda"] is None
    assert state["other"] == "unknown"  # torch refuses the legacy read after this flag
    assert state["solver"] != "sparse-network-simplex" and state["error"] < 1e-9
