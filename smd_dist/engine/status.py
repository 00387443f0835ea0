"""An output's progress, read from its ledger's columns: ``smd-dist status``.

Reads the header and the ledger only (NumPy and zarr: no xarray, Dask, torch or POT), so
it answers in about a second even for outputs of millions of pairs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from smd_dist.engine.output import ResultsOutput, resolved_path

__all__ = ["output_status"]


def output_status(path: str | os.PathLike) -> dict:
    """Progress of an output: pairs done and failed, from the ledger; who holds it.

    Returns
    -------
    dict
        ``path``, ``store``, ``against`` (a rectangular run's second ``store`` and
        ``reps``, else None), ``metrics``, ``pairs_total`` (of the last run's selection),
        ``preprocessing``, ``assembled``, ``pairs_with_results`` (pairs with a record of
        any metric), ``records`` (the latest per pair and metric), ``failed`` (``"a vs b
        (metric): error"`` for each failed record), ``incomplete_parts`` and ``running``
        (who holds the output's lock, or None).

    Raises
    ------
    CorruptOutputError
        A ledger part fails its checksum (``smd-dist run`` quarantines it and recomputes
        its pairs).
    """
    out = ResultsOutput(resolved_path(path))
    header = out.header()
    read = out.read(on_corrupt="raise")
    records = read.records.latest()
    pair_key = records.codes[:, 0].astype(np.int64) * max(len(records.reps), 1)
    pairs = np.unique(pair_key + records.codes[:, 1])
    info_path = Path(f"{out.path}.lock.json")
    holder = None
    if info_path.exists():
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(info_path.read_text())
    n_reps = len(header.get("reps", []))
    against = header.get("against")
    return {
        "path": str(path),
        "store": header.get("store"),
        "against": against and {
            "store": against.get("store") or header.get("store"),
            "reps": against.get("reps", []),
        },
        "metrics": header.get("metrics"),
        "pairs_total": n_reps * (n_reps - 1) // 2 if against is None else against["n_pairs"],
        "preprocessing": header.get("preprocessing"),
        "assembled": bool(header.get("assembled")),
        "pairs_with_results": int(pairs.size),
        "records": len(records),
        "failed": records.failures(),
        "incomplete_parts": list(read.incomplete),
        "running": holder,
    }
