"""Name → metric registry, so the engine can compute any set of named metrics per pair.

Each :class:`Metric` says what preprocessing the engine applies once per representation
(:func:`smd_dist.kernel.prepared.prepare`) and computes a :class:`PairValue` on two
:class:`~smd_dist.kernel.prepared.PreparedRep` values. A metric may take options (the
engine reads them from the ``smd-dist.metric-options.<name>`` config).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from smd_dist.kernel.partial import check_mass
from smd_dist.kernel.prepared import PreparedRep
from smd_dist.kernel.sinkhorn import DEFAULT_RTOL, check_rtol
from smd_dist.kernel.transport import solve
from smd_dist.metrics.comparison import (
    linear_cka_prepared,
    permutation_prepared,
    procrustes_prepared,
)
from smd_dist.metrics.partial import DEFAULT_MASS, partial_transport
from smd_dist.metrics.soft_matching import solve_pair

__all__ = ["Metric", "PairValue", "available", "get", "register"]


@dataclass(frozen=True)
class PairValue:
    """One metric value for one pair.

    Attributes
    ----------
    value : float
    solver : str
        Exact method that produced it (``""`` when no transport solve is involved).
    certificate : dict
        JSON-safe ``{"max_violation", "gap", "tolerance"}`` floats, ``{}`` if not applicable.
    lower, upper : float or None
        A certified interval ``lower <= exact value <= upper`` when the value came from
        one (``value`` is then ``upper``); None otherwise.
    """

    value: float
    solver: str = ""
    certificate: dict = field(default_factory=dict)
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Metric:
    """A named metric on pairs of representations.

    Attributes
    ----------
    name : str
    kind : {"distance", "similarity"}
    description : str
        The formula, JSON-safe.
    equal_width_only : bool
        True when the metric is undefined for different widths (the engine skips such pairs).
    fixed_preprocessing : dict or None
        Preprocessing the metric always uses, whatever the run asks for.
    options : dict
        The options :meth:`compute` takes, with their defaults (JSON-safe).
    interval : bool
        Whether its values may come with a certified interval (``PairValue.lower``,
        ``upper``), which the engine then records.
    """

    name: str
    kind: str
    description: str
    equal_width_only: bool
    _compute: Callable = field(repr=False, compare=False)
    fixed_preprocessing: dict | None = None
    options: dict = field(default_factory=dict, compare=False)
    interval: bool = False
    _check_options: Callable | None = field(default=None, repr=False, compare=False)

    def preprocessing(
        self,
        *,
        center: bool = True,
        normalize: str | None = None,
        constant_neurons: str = "refuse",
    ) -> dict:
        """What to apply once per representation before :meth:`compute`.

        ``constant_neurons`` applies whatever the metric fixes: a run that drops constant
        neurons compares the same neurons in every metric. It is named only when
        ``"drop"``, so the default's keys are those of outputs made before it existed.
        """
        if self.fixed_preprocessing is not None:
            prep = dict(self.fixed_preprocessing)
        else:
            prep = {"center": bool(center), "normalize": normalize}
        if constant_neurons != "refuse":
            prep["constant_neurons"] = constant_neurons
        return prep

    def with_options(self, given: dict | None = None) -> dict:
        """All of the metric's options: ``given`` over the defaults, checked.

        Raises
        ------
        ValueError
            An option the metric does not take, or a value out of range (both named).
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            takes = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"metric {self.name!r} has no option {', '.join(map(repr, unknown))} "
                f"(its options: {takes})"
            )
        values = {**self.options, **given}
        if self._check_options is not None:
            self._check_options(self.name, values)
        return values

    def compute(self, x: PreparedRep, y: PreparedRep, *, device=None, **options) -> PairValue:
        """The metric on two reps prepared as :meth:`preprocessing` says, with ``options``
        over its defaults."""
        return self._compute(x, y, device=device, **self.with_options(options))


def _soft_matching(x, y, *, device=None):
    tr = solve(x, y, device=device)
    return PairValue(math.sqrt(max(tr.cost, 0.0)), tr.solver, tr.certificate.as_dict())


def _soft_matching_score(x, y, *, device=None):
    tr = solve(x, y, device=device)
    return PairValue(1.0 - max(tr.cost, 0.0) / 2.0, tr.solver, tr.certificate.as_dict())


def _partial_soft_matching_score(x, y, *, device=None, mass=DEFAULT_MASS):
    tr = partial_transport(x, y, mass=mass, device=device)
    return PairValue(1.0 - max(tr.cost, 0.0) / 2.0, tr.solver, tr.certificate.as_dict())


def _check_partial_options(name, values):
    try:
        check_mass(values["mass"])
    except ValueError as err:
        raise ValueError(f"metric {name!r}: {err}") from None


def _soft_matching_sinkhorn(x, y, *, device=None, rtol=DEFAULT_RTOL):
    solved = solve_pair(x, y, method="sinkhorn", rtol=rtol, device=device)
    distance, lower, upper = solved.distances()
    return PairValue(distance, solved.solver, solved.certificate.as_dict(), lower, upper)


def _check_sinkhorn_options(name, values):
    try:
        check_rtol(values["rtol"])
    except ValueError as err:
        raise ValueError(f"metric {name!r}: {err}") from None


def _permutation(x, y, *, device=None):
    tr, d = permutation_prepared(x, y, device=device)
    return PairValue(d, tr.solver, tr.certificate.as_dict())


def _procrustes(x, y, *, device=None):
    return PairValue(procrustes_prepared(x, y, device=device))


def _cka(x, y, *, device=None):
    return PairValue(linear_cka_prepared(x, y))


_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric under its name (replacing one of the same name)."""
    _REGISTRY[metric.name] = metric
    return metric


def available() -> tuple[str, ...]:
    """Names of all registered metrics, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Metric:
    """The metric called ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message suggests the closest valid names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), available(), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown metric {name!r}{hint} (available: {', '.join(available())})"
        ) from None


register(
    Metric(
        name="soft_matching",
        kind="distance",
        description="sqrt(min_P sum_ij P_ij ||x_i - y_j||^2), P >= 0, rows sum to 1/Nx, "
        "columns to 1/Ny (exact optimal transport between tuning curves)",
        equal_width_only=False,
        _compute=_soft_matching,
    )
)
register(
    Metric(
        name="soft_matching_score",
        kind="similarity",
        description="max_P sum_ij P_ij corr(x_i, y_j) = 1 - d^2/2 on centred unit-norm columns",
        equal_width_only=False,
        _compute=_soft_matching_score,
        fixed_preprocessing={"center": True, "normalize": "unit"},
    )
)
register(
    Metric(
        name="partial_soft_matching_score",
        kind="similarity",
        description="1 - min_T sum_ij T_ij (1 - corr(x_i, y_j)), T >= 0, rows sum to at most "
        "1/Nx, columns to at most 1/Ny, all to the mass m (option 'mass', default "
        f"{DEFAULT_MASS}; exact partial optimal transport)",
        equal_width_only=False,
        _compute=_partial_soft_matching_score,
        fixed_preprocessing={"center": True, "normalize": "unit"},
        options={"mass": DEFAULT_MASS},
        _check_options=_check_partial_options,
    )
)
register(
    Metric(
        name="soft_matching_sinkhorn",
        kind="distance",
        description="soft_matching within a certified interval: entropic transport (Sinkhorn) "
        "bounds d in [lower, upper] with upper - lower <= rtol * upper, and the value is "
        "upper; pairs whose interval is wider are solved exactly (lower, upper then NaN)",
        equal_width_only=False,
        _compute=_soft_matching_sinkhorn,
        options={"rtol": DEFAULT_RTOL},
        interval=True,
        _check_options=_check_sinkhorn_options,
    )
)
register(
    Metric(
        name="permutation",
        kind="distance",
        description="min_Pi ||X - Y Pi||_F over permutation matrices (equal widths only)",
        equal_width_only=True,
        _compute=_permutation,
    )
)
register(
    Metric(
        name="procrustes",
        kind="distance",
        description="min_{Q orthogonal} ||X - Y Q||_F = sqrt(||X||_F^2 + ||Y||_F^2 - "
        "2 ||X^T Y||_*), narrower side padded with zero columns",
        equal_width_only=False,
        _compute=_procrustes,
    )
)
register(
    Metric(
        name="linear_cka",
        kind="similarity",
        description="||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns",
        equal_width_only=False,
        _compute=_cka,
        fixed_preprocessing={"center": True, "normalize": None},
    )
)
