"""Which representations and metrics a run compares.

Arrays are (stimuli, neurons): a neuron's tuning curve is a column. Selections are made on
the store's records (no data is read) and checked before anything else happens.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence

from smd_dist import config
from smd_dist import metrics as metric_registry

__all__ = [
    "InputError",
    "metric_options",
    "metric_specs",
    "prep_key",
    "resolve_metrics",
    "select_reps",
]


class InputError(ValueError):
    """Representations that cannot be compared, found before any pair is computed."""


def select_reps(
    records: Sequence, patterns: Sequence[str] | str | None, *, min_reps: int = 2
) -> list:
    """Pick reps by ``"model/layer"`` ids or glob patterns, in store order.

    A pattern without ``/`` that names a model selects all its layers. Patterns that
    match nothing are errors, with the closest ids suggested, as is a selection of fewer
    than ``min_reps`` reps (an all-pairs run needs 2; each side of a rectangular run, 1).
    """
    if patterns is None:
        chosen = list(records)
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        ids = [r.rep_id for r in records]
        models = sorted({r.model for r in records})
        keep = set()
        for pattern in patterns:
            hits = {i for i in ids if fnmatch.fnmatchcase(i, pattern)}
            hits |= {r.rep_id for r in records if fnmatch.fnmatchcase(r.model, pattern)}
            if not hits:
                raise InputError(
                    f"rep pattern {pattern!r} matches no representation in the store"
                    f"{config.suggest(pattern, ids + models)}; the store has "
                    f"{len(ids)} reps from models {', '.join(models[:10])}"
                    + (" ..." if len(models) > 10 else "")
                )
            keep |= hits
        chosen = [r for r in records if r.rep_id in keep]
    if len(chosen) < min_reps:
        raise InputError(
            f"selection holds {len(chosen)} representation(s) "
            f"({', '.join(r.rep_id for r in chosen) or 'none'}); at least {min_reps} "
            f"{'is' if min_reps == 1 else 'are'} needed"
        )
    return chosen


def resolve_metrics(names: Sequence[str] | str) -> list:
    """Registry objects for the named metrics, in order, without duplicates."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise InputError("no metric named; available: " + ", ".join(metric_registry.available()))
    seen = []
    for name in names:
        metric = metric_registry.get(name)
        if metric.name not in [m.name for m in seen]:
            seen.append(metric)
    return seen


def prep_key(prep: dict) -> str:
    return json.dumps(prep, sort_keys=True)


def metric_options(metric) -> dict:
    """The metric's options: the ``smd-dist.metric-options.<name>`` config over its defaults.

    Raises
    ------
    InputError
        Options the metric does not take, or values out of range.
    """
    given = config.get(f"metric-options.{metric.name}", None) or {}
    if not isinstance(given, dict):
        raise InputError(
            f"config smd-dist.metric-options.{metric.name} must be a mapping of option names "
            f"to values, got {given!r}"
        )
    try:
        return metric.with_options(given)
    except ValueError as err:
        raise InputError(f"config smd-dist.metric-options.{metric.name}: {err}") from None


def metric_specs(metric_objs, base_prep: dict) -> list[tuple[str, str, dict]]:
    """``(metric name, prep key, options)`` per metric: what a pair task runs on which
    prepared array, and how."""
    return [
        (m.name, prep_key(m.preprocessing(**base_prep)), metric_options(m)) for m in metric_objs
    ]
