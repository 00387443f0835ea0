#!/usr/bin/env bash
# Create .venv and install smd-dist with every extra the tests and the demo use.
# torch is pinned through .ci/constraints.txt to the CPU build that lies on this machine's
# disk; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
