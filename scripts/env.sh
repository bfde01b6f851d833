#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install brpg with its dev extras.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
export MPLBACKEND="${MPLBACKEND:-Agg}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
