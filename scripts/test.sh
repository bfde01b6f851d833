#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, check that the notebooks and the exported package
# agree (nbdev_export / nbdev_clean leave no diff), run the notebooks' tests, then pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Browser tests use Debian's Chromium (Playwright's own browser download does not work offline).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium install failed"
fi
source scripts/env.sh
echo "== nbdev_export / nbdev_clean must leave tracked files unchanged"
nbdev_export
nbdev_clean
if [ -n "$(git status --porcelain --untracked-files=no -- brpg nbs)" ]; then
  git status --porcelain -- brpg nbs; git --no-pager diff --stat -- brpg nbs
  echo "FAIL: run nbdev_export and nbdev_clean and commit the result"; exit 1
fi
echo "== nbdev_test"
nbdev_test --n_workers 2 --timing
echo "== pytest"
python -m pytest -q tests
