"""Certified entropic transport: Sinkhorn's iterations, then an interval that holds the exact cost.

Arrays are (stimuli M, neurons N): a neuron's tuning curve is a column. The exact problem is
the one :mod:`smd_dist.kernel.transport` solves,

.. math::

    W = \\min_{P \\ge 0,\\; P\\mathbf 1 = a,\\; P^\\top \\mathbf 1 = b}
        \\sum_{ij} P_{ij} D_{ij}, \\qquad D_{ij} = \\lVert x_i - y_j \\rVert^2 ,

and Sinkhorn's algorithm solves its entropic version (regularisation :math:`\\varepsilon`)
instead: potentials :math:`f, g` with the plan
:math:`P^\\varepsilon_{ij} = a_i b_j \\exp((f_i + g_j - D_{ij})/\\varepsilon)`. That plan is
neither optimal nor, after finitely many iterations, feasible, and its cost is biased by up
to :math:`\\varepsilon \\log(N_x N_y)`. Both of its outputs are turned into rigorous bounds:

**Lower bound** (weak duality). Any :math:`u, v` with :math:`u_i + v_j \\le D_{ij}` give
:math:`\\sum_i a_i u_i + \\sum_j b_j v_j \\le W`. Sinkhorn's :math:`g` is made feasible by the
double c-transform, evaluated over every entry in float64,

.. math::

    u_i = \\min_j (D_{ij} - g_j), \\qquad v_j = \\min_i (D_{ij} - u_i),

which can only raise the dual objective of a feasible pair.

**Upper bound** (a feasible plan). The plan is rounded onto the transportation polytope
(Altschuler, Weed & Rigollet 2017, Algorithm 2): rows scaled down to at most :math:`a`,
columns to at most :math:`b`, and the missing mass :math:`e_r, e_c` added as
:math:`e_r e_c^\\top / \\lVert e_r \\rVert_1`; the cost of the rounded plan :math:`Q` is an
upper bound on :math:`W`. In floating point :math:`Q`'s marginals are off by rounding, so
the bound adds :math:`2 \\max D \\, (\\lVert Q\\mathbf 1 - a\\rVert_1 +
\\lVert Q^\\top\\mathbf 1 - b\\rVert_1)`, the most the cost can change when :math:`Q` is moved
onto the polytope (their Lemma 7), with the marginals' own summation error bounded.

**Floating point.** Both bounds are evaluated on :math:`\\hat D`, the float64 expansion
:math:`\\lVert x\\rVert^2 + \\lVert y\\rVert^2 - 2x^\\top y`, whose entries are within
:math:`\\delta = (2\\gamma_M + 5u)(\\max_i\\lVert x_i\\rVert^2 + \\max_j\\lVert y_j\\rVert^2)`
of the exact costs in any summation order (Higham 2002, §3.1; :math:`\\gamma_M = Mu/(1-Mu)`,
:math:`u = 2^{-53}`), twice that is subtracted from the lower bound and added per unit mass
to the upper bound, with the rounding of every subtraction and sum bounded the same way.
Each row's heaviest plan entry is also costed from the differences :math:`x_i - y_j` (no
cancellation), which checks that :math:`\\hat D` respects :math:`\\delta`: a BLAS that broke
the assumption is an error, not a looser bound.

The iterations run ε-scaling (ε halves from the largest cost) with Sinkhorn's scaling
updates in float64 on the stabilised kernel :math:`K = \\exp((f_i + g_j - D_{ij})/\\varepsilon)`,
the scalings absorbed into the log-domain potentials :math:`f, g` whenever they grow
(Schmitzer 2019), in torch on the requested device. Memory: :math:`\\hat D` and :math:`K`
(two dense float64 matrices); the bound passes work on blocks of rows. The iterations stop
as soon as the interval on the distance, :math:`[\\sqrt{L}, \\sqrt{U}]`, is narrower than
``rtol`` times its upper end, or after ``max_iter`` iterations (the caller then solves
exactly).

References
----------
.. [1] Cuturi, M. (2013). Sinkhorn distances: lightspeed computation of optimal transport.
   Advances in Neural Information Processing Systems 26.
.. [2] Altschuler, J., Weed, J., & Rigollet, P. (2017). Near-linear time approximation
   algorithms for optimal transport via Sinkhorn iteration. Advances in Neural Information
   Processing Systems 30 (Algorithm 2, Lemma 7).
.. [3] Schmitzer, B. (2019). Stabilized sparse scaling algorithms for entropy regularized
   transport problems. SIAM Journal on Scientific Computing, 41(3), A1443–A1481.
.. [4] Peyré, G., & Cuturi, M. (2019). Computational optimal transport. Foundations and
   Trends in Machine Learning, 11(5–6), §3.2 (c-transforms) and §4.4 (log-domain).
.. [5] Higham, N. J. (2002). Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1.
   SIAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from smd_dist.kernel.certificate import SolverError, marginals
from smd_dist.kernel.dense import check_finite
from smd_dist.kernel.preparation import resolve_device, squared_distances
from smd_dist.kernel.prepared import as_prepared
from smd_dist.kernel.transport import exact_costs

__all__ = [
    "DEFAULT_RTOL",
    "MAX_ITER",
    "CostInterval",
    "check_rtol",
    "cost_error",
    "dual_lower_bound",
    "rounded_upper_bound",
    "sinkhorn_interval",
]

#: Rows of the cost matrix per block in the passes over it (their temporaries stay small).
ROW_CHUNK = 1024

#: Relative width of the distance interval that counts as certified, unless asked otherwise.
DEFAULT_RTOL = 1e-3
#: Scaling iterations (each one pass over the kernel for rows, one for columns) before the
#: interval is returned as it stands, however wide.
MAX_ITER = 1000
#: ε shrinks by this factor per stage of ε-scaling.
EPSILON_DECAY = 0.5
#: Smallest ε, relative to the largest cost: below it float64 potentials carry no more
#: information and the iterations stall.
EPSILON_FLOOR = 1e-10
#: Iterations per stage at most (a stage ends earlier when its marginals are close).
STAGE_ITER = 50
#: A stage ends when the plan's row marginals are off by at most this times ``rtol`` times
#: the cost estimate over the largest cost, in L1 (the missing mass is what the rounding
#: routes at a poor cost), or by :data:`MIN_STAGE_TOL`.
STAGE_TOL = 2.0
MIN_STAGE_TOL = 1e-12
#: Below this times ``rtol`` times the cost estimate, ε shrinks only once a stage converged.
TARGET = 1.0
#: A stage at the same ε that does not cut the marginal error below this fraction of the
#: last one's counts as stalled.
STALLED = 0.5
#: The interval is computed after this many iterations since the last time, and after
#: every stage once ε is below ``CHECK_BELOW · rtol`` times the cost estimate.
CHECK_EVERY = 50
CHECK_BELOW = 4.0
#: Sinkhorn scalings that route the mass the rounded plan misses along the kernel.
RESIDUAL_ITER = 20
#: Scalings are absorbed into the potentials when ``|log|`` of one exceeds this.
ABSORB_AT = 30.0

_U = 2.0**-53
#: The absolute error of a float64 product that falls into the subnormal range.
_SUBNORMAL = 2.0**-1074


@dataclass(frozen=True)
class CostInterval:
    """Rigorous bounds on the exact transport cost (the squared distance).

    Attributes
    ----------
    lower, upper : float
        ``lower <= W <= upper`` for the exact optimum ``W`` of the float64 problem;
        ``upper`` is the cost of a feasible plan.
    epsilon : float
        The entropic regularisation (in cost units) of the iterate the bounds came from.
    iterations : int
        Scaling iterations run.
    """

    lower: float
    upper: float
    epsilon: float
    iterations: int

    @property
    def distance_lower(self) -> float:
        return math.sqrt(max(self.lower, 0.0))

    @property
    def distance_upper(self) -> float:
        return math.sqrt(max(self.upper, 0.0))

    def within(self, rtol: float) -> bool:
        """Whether ``sqrt(upper) - sqrt(lower) <= rtol * sqrt(upper)``."""
        hi = self.distance_upper
        return hi - self.distance_lower <= rtol * hi

    def tightened(self, other: CostInterval) -> CostInterval:
        """The intersection with another valid interval for the same problem."""
        return CostInterval(
            lower=max(self.lower, other.lower),
            upper=min(self.upper, other.upper),
            epsilon=other.epsilon,
            iterations=other.iterations,
        )


def check_rtol(rtol) -> float:
    """``rtol`` as a float, or ``ValueError`` unless ``0 < rtol < 1``."""
    if isinstance(rtol, bool) or not isinstance(rtol, int | float | np.floating | np.integer):
        raise ValueError(f"rtol must be a number between 0 and 1 (exclusive), got {rtol!r}")
    if not 0.0 < float(rtol) < 1.0:
        raise ValueError(f"rtol must be between 0 and 1 (exclusive), got {rtol!r}")
    return float(rtol)


def _gamma(n: int) -> float:
    """Higham's ``γ_n = n u / (1 - n u)``: the relative error of an n-term float64 sum of
    non-negative terms, or of an n-term inner product against ``Σ|x_k y_k|``."""
    return n * _U / (1 - n * _U)


def cost_error(m: int, scale: float) -> float:
    """Twice the most any float64 expansion entry can differ from ``||x_i - y_j||²``.

    ``m`` stimuli; ``scale = max ||x_i||² + max ||y_j||²`` (computed: its own error is
    covered by the factor two). The inner product is off by at most ``γ_m ||x|| ||y||``,
    each squared norm by ``γ_m`` of itself, and the two additions by ``u`` of at most
    ``2 · scale`` each (Higham 2002, §3.1), in any summation order or thread count.
    """
    return 2.0 * ((2.0 * _gamma(m) + 5.0 * _U) * scale + 8 * m * _SUBNORMAL)


def dual_lower_bound(D, a, b, g, *, delta: float, device=None) -> float:
    """A rigorous lower bound on the exact transport cost from column potentials ``g``.

    .. math::

        u_i = \\min_j (\\hat D_{ij} - g_j), \\quad v_j = \\min_i (\\hat D_{ij} - u_i),
        \\quad L = \\sum_i a_i u_i + \\sum_j b_j v_j - \\delta - \\text{rounding}

    ``(u - δ - e, v)`` is feasible for the exact costs (``e`` bounds the rounding of the
    subtractions); the sums are taken with :func:`math.fsum` and their products' rounding
    is bounded too.

    Parameters
    ----------
    D : numpy.ndarray or torch.Tensor, shape (Nx, Ny)
        The float64 expansion ``Ĉ``, every entry within ``delta`` of the exact cost.
    a, b : numpy.ndarray
        The marginals (uniform or merged-neuron masses), each summing to one.
    g : numpy.ndarray, shape (Ny,)
        Any column potentials (float64); the better they are, the tighter the bound.
    delta : float
        From :func:`cost_error`.
    """
    Dt = torch.as_tensor(D, device=device)
    gt = torch.as_tensor(g, dtype=torch.float64, device=Dt.device)
    starts = range(0, Dt.shape[0], ROW_CHUNK)
    u = torch.cat([(Dt[s : s + ROW_CHUNK] - gt[None, :]).amin(dim=1) for s in starts])
    v = torch.full_like(gt, math.inf)
    for s in starts:
        torch.minimum(v, (Dt[s : s + ROW_CHUNK] - u[s : s + ROW_CHUNK, None]).amin(dim=0), out=v)
    u, v = u.cpu().numpy(), v.cpu().numpy()
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return -math.inf
    d_max = _abs_max(Dt)
    u_max, v_max = float(np.abs(u).max()), float(np.abs(v).max())
    subtraction = _U * (d_max + u_max) * (1 + _U)  # fl(D̂ - u) vs D̂ - u
    # fsum of rounded products and masses; products that fall to subnormals
    sums = 3.1 * _U * (u_max + v_max) + (len(a) + len(b)) * _SUBNORMAL
    value = math.fsum(a * u) + math.fsum(b * v)
    return value - (delta + 2.0 * (subtraction + sums))


def _abs_max(Dt: torch.Tensor) -> float:
    return max(float(Dt[s : s + ROW_CHUNK].abs().max()) for s in range(0, Dt.shape[0], ROW_CHUNK))


def rounded_upper_bound(D, K, p, q, a, b, *, delta: float, X, Y, scale: float) -> float:
    """A rigorous upper bound on the exact transport cost: the cost of a feasible plan.

    The plan :math:`F = \\operatorname{diag}(p) K \\operatorname{diag}(q)` (in exact
    arithmetic from the float factors; any non-negative ones) is rounded onto the polytope
    (Altschuler et al. 2017, Algorithm 2) without being formed: its rows scaled down to at
    most :math:`a`, then its columns to at most :math:`b`, giving :math:`Y`. The mass
    :math:`Y` misses, :math:`e_r = a - Y\\mathbf 1` and :math:`e_c = b - Y^\\top\\mathbf 1`, is
    routed first along :math:`K` (a few Sinkhorn scalings of :math:`K` towards
    :math:`e_r, e_c`, scaled down the same way: :math:`R`), and what is left, :math:`e'_r,
    e'_c`, by Algorithm 2's rank-one term:

    .. math::

        Q = Y + R + e'_r {e'_c}^\\top / \\lVert e'_r\\rVert_1 .

    Algorithm 2 routes all of :math:`e_r` by the rank-one term, at about the average cost;
    along :math:`K` it costs about what the plan's own entries cost, so that the bound is
    far less sensitive to how well the iterations balanced the marginals.

    Each row's heaviest entry of :math:`Y` is costed exactly from the tuning curves (and
    checks the expansion against ``delta``); every other entry with
    :math:`\\max(\\hat D_{ij}, 0) + \\delta`. Every sum is of non-negative terms, so its
    rounding is bounded by Higham's :math:`\\gamma_n` of itself; so are :math:`Q`'s
    marginals, whose distance from ``a, b`` is charged at :math:`2 \\max D` (their Lemma 7).

    Parameters
    ----------
    D : numpy.ndarray or torch.Tensor, shape (Nx, Ny)
        The float64 expansion.
    K : torch.Tensor, shape (Nx, Ny)
        Non-negative float64 (the stabilised Sinkhorn kernel), on ``D``'s device.
    p, q : torch.Tensor, shapes (Nx,) and (Ny,)
        Non-negative row and column factors.
    a, b : numpy.ndarray
        Marginals.
    delta : float
        From :func:`cost_error`.
    X, Y : numpy.ndarray, shapes (M, Nx) and (M, Ny)
        The prepared tuning curves ``D`` was computed from.
    scale : float
        ``max ||x_i||² + max ||y_j||²`` (``max D <= 2 scale``).

    Raises
    ------
    SolverError
        When an exactly computed cost lies further than ``delta`` from its expansion.
    """
    Dt = torch.as_tensor(D, device=K.device)
    dev = Dt.device
    nx, ny = Dt.shape
    m = X.shape[0]
    a_t, b_t = torch.as_tensor(a, device=dev), torch.as_tensor(b, device=dev)
    p, q = _scaled_down(K, p, q, a_t, b_t)
    e_r = (a_t - p * (K @ q)).clamp(min=0.0)
    e_c = (b_t - q * (K.T @ p)).clamp(min=0.0)
    p2, q2 = _scaled_down(K, *_balanced(K, e_r, e_c), e_r, e_c)
    # Q's first two terms, diag(p) K diag(q) + diag(p2) K diag(q2): marginals and costs.
    r_yr = (p * (K @ q) + p2 * (K @ q2)).cpu().numpy()
    c_yr = (q * (K.T @ p) + q2 * (K.T @ p2)).cpu().numpy()
    right = torch.stack([q, q2], dim=1)
    full = torch.empty(nx, 2, dtype=torch.float64, device=dev)
    heavy = torch.empty(nx, dtype=torch.int64, device=dev)
    for s in range(0, nx, ROW_CHUNK):
        block = K[s : s + ROW_CHUNK]
        k = block.shape[0]
        heavy[s : s + k] = (block * q[None, :]).argmax(dim=1)
        full[s : s + k] = (block * _padded(Dt[s : s + k], delta)) @ right
    rows = torch.arange(nx, device=dev)
    heavy_mass = p * K[rows, heavy] * q[heavy]
    expansion = Dt[rows, heavy]
    full = (full[:, 0] * p + full[:, 1] * p2).cpu().numpy()
    heavy_bound = (heavy_mass * (expansion.clamp(min=0.0) + delta)).cpu().numpy()
    heavy_mass, expansion = heavy_mass.cpu().numpy(), expansion.cpu().numpy()
    exact = exact_costs(X, Y, np.arange(nx), heavy.cpu().numpy())
    worst = float(np.abs(exact - expansion).max())
    if not worst <= delta:
        raise SolverError(
            f"a squared distance computed from the differences is {worst:.3g} from its "
            f"float64 expansion, beyond the error bound {delta:.3g}: the matrix product "
            "broke its rounding assumptions"
        )
    gamma = _gamma(max(nx, ny, m) + 16)
    # Σ over all but the heavy entries = full_i - heavy_i, each computed within γ of itself.
    rest = math.fsum(full - heavy_bound) + gamma * (math.fsum(full) + math.fsum(heavy_bound))
    cost = rest + math.fsum(heavy_mass * exact) * (1 + gamma)
    # What is still missing, by the rank-one term, costed with D̂⁺ + δ.
    e_r, e_c = np.maximum(a - r_yr, 0.0), np.maximum(b - c_yr, 0.0)
    s_r, s_c = math.fsum(e_r), math.fsum(e_c)
    q_r, q_c = r_yr, c_yr
    if s_r > 0 and s_c > 0:
        e_c_t = torch.as_tensor(e_c, device=dev)
        t = torch.cat(
            [_padded(Dt[s : s + ROW_CHUNK], delta) @ e_c_t for s in range(0, nx, ROW_CHUNK)]
        ).cpu().numpy()
        cost += math.fsum(e_r * t) / s_r
        q_r, q_c = r_yr + e_r * (s_c / s_r), c_yr + e_c
    cost *= 1 + gamma
    # Q's marginals as computed are within γ of themselves; the masses a, b within u.
    off = (
        math.fsum(np.abs(q_r - a)) + math.fsum(np.abs(q_c - b))
        + gamma * (math.fsum(q_r) + math.fsum(q_c)) + 4 * _U
    )
    d_max = 2.0 * scale * (1 + _gamma(m + 4))
    return cost + 2.0 * d_max * off * (1 + 8 * _U) + 8 * (nx * ny + nx + ny) * _SUBNORMAL


def _padded(D, delta):
    """``max(D̂, 0) + δ``: at least the exact cost of every entry."""
    return D.clamp(min=0.0).add_(delta)


def _scaled_down(K, p, q, a, b):
    """Factors of ``diag(p) K diag(q)`` with rows, then columns, scaled down to at most
    ``a`` and ``b`` (Algorithm 2's first two steps)."""
    r = p * (K @ q)
    p = p * torch.where(r > a, a / r, 1.0)
    c = q * (K.T @ p)
    return p, q * torch.where(c > b, b / c, 1.0)


def _balanced(K, a, b, iterations: int = RESIDUAL_ITER):
    """Sinkhorn scalings ``(p, q)`` of ``K`` towards marginals ``a, b`` (zeros allowed)."""
    q = (b > 0).to(K.dtype)
    p = torch.zeros_like(a)
    for _ in range(iterations):
        Kq = K @ q
        p = torch.where(Kq > 0, a / Kq, 0.0)
        Kp = K.T @ p
        q = torch.where(Kp > 0, b / Kp, 0.0)
    return p, q


def sinkhorn_interval(
    X, Y, *, rtol: float = DEFAULT_RTOL, device=None, max_iter: int = MAX_ITER
) -> CostInterval:
    """Run Sinkhorn until the exact cost is pinned within ``rtol`` (on the distance).

    Parameters
    ----------
    X, Y : PreparedRep or numpy.ndarray, shapes (M, Nx) and (M, Ny)
        Prepared representations (stimuli in rows, neurons in columns), already
        validated; identical columns are merged (their masses add up).
    rtol : float
        Stop once ``sqrt(upper) - sqrt(lower) <= rtol * sqrt(upper)``; in (0, 1).
    device : str or torch.device, optional
        Where the iterations and the bound passes run (CUDA when available by default).
    max_iter : int
        Scaling iterations at most; the interval is then returned as it stands.

    Returns
    -------
    CostInterval
        Always valid: ``lower <= W <= upper``; narrow enough only when
        ``interval.within(rtol)``.

    Raises
    ------
    ValueError
        ``rtol`` outside (0, 1) or ``max_iter`` < 1.
    SolverError
        Non-finite costs, or a matrix product that broke its rounding bound.
    """
    rtol = check_rtol(rtol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    x, y = as_prepared(X, name="X"), as_prepared(Y, name="Y")
    Xd, Yd = x.distinct(), y.distinct()
    norms = (x.sq_norms[: x.n_distinct], y.sq_norms[: y.n_distinct])
    a, b = marginals((x.n_distinct, y.n_distinct), (x.counts, y.counts))
    dev = resolve_device(device)
    D = squared_distances(Xd, Yd, device=dev, norms=norms)
    check_finite(D, norms)
    scale = float(norms[0].max() + norms[1].max())
    delta = cost_error(Xd.shape[0], scale)
    problem = _Problem(
        D=torch.from_numpy(D).to(dev), a=a, b=b, delta=delta, X=Xd, Y=Yd, scale=scale
    )
    d_max = float(D.max())
    if d_max <= delta:  # every cost is zero to rounding: the product plan is optimal
        return problem.bounds(_product_state(problem), 0)
    return _iterate(problem, rtol=rtol, max_iter=max_iter, d_max=d_max)


def _product_state(problem: _Problem) -> _State:
    """The product plan ``a bᵀ`` as an iterate (zero potentials, a kernel of ones)."""
    nx, ny = problem.D.shape
    kw = {"dtype": torch.float64, "device": problem.D.device}
    zeros_x, zeros_y = torch.zeros(nx, **kw), torch.zeros(ny, **kw)
    return _State(zeros_x, zeros_y, torch.ones(nx, ny, **kw), zeros_x + 1, zeros_y + 1, 1.0)


@dataclass(frozen=True)
class _Problem:
    """One pair's costs, marginals and tuning curves, for :meth:`bounds`."""

    D: torch.Tensor
    a: np.ndarray
    b: np.ndarray
    delta: float
    X: np.ndarray
    Y: np.ndarray
    scale: float

    def bounds(self, state: _State, iterations: int) -> CostInterval:
        a_t = torch.as_tensor(self.a, device=self.D.device)
        b_t = torch.as_tensor(self.b, device=self.D.device)
        g = (state.g + state.eps * state.beta.log()).cpu().numpy()
        lower = dual_lower_bound(self.D, self.a, self.b, g, delta=self.delta)
        upper = rounded_upper_bound(
            self.D, state.K, a_t * state.alpha, b_t * state.beta, self.a, self.b,
            delta=self.delta, X=self.X, Y=self.Y, scale=self.scale,
        )
        return CostInterval(max(lower, 0.0), upper, state.eps, iterations)


@dataclass(frozen=True)
class _State:
    """Sinkhorn's iterate: the plan ``a_i α_i K_ij β_j b_j`` with the stabilised kernel
    ``K = exp((f_i + g_j - D_ij)/ε)``; its potentials are ``f + ε log α``, ``g + ε log β``."""

    f: torch.Tensor
    g: torch.Tensor
    K: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    eps: float

    def potentials(self):
        return self.f + self.eps * self.alpha.log(), self.g + self.eps * self.beta.log()


def _iterate(problem: _Problem, *, rtol, max_iter, d_max) -> CostInterval:
    """ε-scaling with stabilised scaling updates; the tightest interval seen."""
    Dt = problem.D
    dev = Dt.device
    a_t = torch.as_tensor(problem.a, device=dev)
    b_t = torch.as_tensor(problem.b, device=dev)
    f = torch.zeros(len(problem.a), dtype=torch.float64, device=dev)
    g = torch.zeros(len(problem.b), dtype=torch.float64, device=dev)
    eps, floor = d_max, EPSILON_FLOOR * d_max
    best = None
    estimate = d_max
    iterations = since_check = 0
    previous = math.inf
    while True:
        tol = max(STAGE_TOL * rtol * max(estimate, 0.0) / d_max, MIN_STAGE_TOL)
        state, done, err = _stage(
            Dt, a_t, b_t, f, g, eps, tol=tol, n_iter=min(STAGE_ITER, max_iter - iterations)
        )
        f, g = state.potentials()
        iterations += done
        since_check += done
        estimate = float(a_t @ f + b_t @ g)  # the entropic dual: W to within ε·log(NxNy)
        last = iterations >= max_iter
        if last or since_check >= CHECK_EVERY or eps <= CHECK_BELOW * rtol * max(estimate, 0.0):
            interval = problem.bounds(state, iterations)
            best = interval if best is None else best.tightened(interval)
            since_check = 0
            if best.within(rtol) or last:
                return best
        # Down to about rtol times the cost, ε shrinks every stage; below, once the
        # marginals have converged (the entropic bias is then what keeps the bound wide) or
        # stopped converging (weakly coupled blocks of near-duplicate neurons mix slowly).
        stalled = err > STALLED * previous
        previous = err
        if err <= tol or stalled or eps > TARGET * rtol * max(estimate, 0.0):
            eps = max(eps * EPSILON_DECAY, floor)
            previous = math.inf


def _stage(Dt, a_t, b_t, f, g, eps, *, tol, n_iter):
    """Sinkhorn at one ε from potentials ``(f, g)``: scaling updates on the stabilised
    kernel until the rows are within ``tol`` (L1) of ``a`` with the columns balanced."""
    K = _kernel(Dt, f, g, eps)
    alpha, beta = torch.ones_like(f), torch.ones_like(g)
    done = 0
    while done < n_iter:
        Kb = K @ (b_t * beta)
        err = float((a_t * (alpha * Kb - 1.0).abs()).sum())
        alpha = 1.0 / Kb
        beta = 1.0 / (K.T @ (a_t * alpha))
        done += 1
        big = max(float(alpha.log().abs().max()), float(beta.log().abs().max()))
        if not math.isfinite(big) or big > ABSORB_AT:
            if math.isfinite(big):
                f, g = f + eps * alpha.log(), g + eps * beta.log()
            else:  # a row or column underflowed: balance both in the log domain
                f = _log_rows(Dt, b_t.log(), g, eps)
                g = _log_cols(Dt, a_t.log(), f, eps)
            K = _kernel(Dt, f, g, eps)
            alpha, beta = torch.ones_like(f), torch.ones_like(g)
        elif done > 1 and err <= tol:  # the first plan's columns were not yet balanced
            break
    return _State(f, g, K, alpha, beta, eps), done, err


def _kernel(Dt, f, g, eps):
    K = f[:, None] + g[None, :]
    K -= Dt
    K /= eps
    return K.exp_()


def _log_rows(Dt, lb, g, eps):
    """``f_i = -ε log Σ_j b_j exp((g_j - D_ij)/ε)`` (rows of the plan sum to ``a``)."""
    return torch.cat(
        [
            -eps * torch.logsumexp(lb[None, :] + (g[None, :] - Dt[s : s + ROW_CHUNK]) / eps, dim=1)
            for s in range(0, Dt.shape[0], ROW_CHUNK)
        ]
    )


def _log_cols(Dt, la, f, eps):
    """``g_j = -ε log Σ_i a_i exp((f_i - D_ij)/ε)`` (columns sum to ``b``)."""
    acc = None
    for s in range(0, Dt.shape[0], ROW_CHUNK):
        rows = slice(s, s + ROW_CHUNK)
        part = torch.logsumexp(la[rows, None] + (f[rows, None] - Dt[rows]) / eps, dim=0)
        acc = part if acc is None else torch.logaddexp(acc, part)
    return -eps * acc
