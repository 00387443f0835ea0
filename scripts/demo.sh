#!/usr/bin/env bash
# The main job on the built-in demo, from a fresh checkout: install, build the offline demo
# stores (digits CNNs and MiniLM-L6; a few minutes on 2 cores, once), compute every pair on
# a local Dask cluster, show the status and draw the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ ! -d demo-data/digits ] || [ ! -d demo-data/minilm ]; then
    smd-dist demo build demo-data --force
fi
smd-dist run configs/demo.yaml
smd-dist run configs/demo-minilm.yaml
smd-dist status demo-results/digits.zarr
smd-dist plot demo-results/digits.zarr demo-results/figures/digits
smd-dist plot demo-results/minilm.zarr demo-results/figures/minilm
echo "matrices: demo-results/digits.zarr demo-results/minilm.zarr (open with smd_dist.open_distances)"
