"""Shared pytest set-up: no network, no GUI backend, one BLAS thread (the CI machine has 2 cores).

Inner loop: `pytest -m "not slow"` skips the end-to-end trainings, the multi-process DDP tests, the
JupyterLab/Chromium browser test and the UMAP fit (markers `slow`, `ddp`, `browser`, registered in
pyproject.toml; every `ddp` and `browser` test is also `slow`). `pytest tests`, as CI runs it, runs everything.

Shared helpers: the `free_port` fixture here, and `free_port`, `dist_env`, `spawn_gloo` in tests/_ddp.py
(a plain module, so that test modules and spawned child processes can import it)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import _ddp  # noqa: E402  (tests/ is on sys.path: pytest puts a rootless conftest's folder there)


@pytest.fixture
def free_port():
    "A TCP port on 127.0.0.1 that is free right now."
    return _ddp.free_port()
