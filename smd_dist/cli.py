"""Command line: ``smd-dist`` (also ``python -m smd_dist``).

Imports of heavy modules (torch, dask) happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smd-dist")
def main() -> None:
    """Soft matching distances between every pair of neural representations."""


# --- run / status / info / config (engine) ---------------------------------------------


# --- extract / demo (store) ------------------------------------------------------------


# --- plot (analysis) -------------------------------------------------------------------


# --- cluster (slurm) -------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
