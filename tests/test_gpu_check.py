"""benchmarks/gpu_check.sh: the `--dry-run` (CPU, tiny sizes) runs every stage and prints one table of numbers;
bad options and a failing stage end it with a non-zero exit and a message naming the problem."""
import os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("prototype_step", "clustering", "train_step_bf16", "train_step_fp16", "train_200")


def _run(*args, env=None, timeout=60):
    e = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=e)


def _table(md: str) -> dict:
    "`{stage: {measurement: value}}` from the markdown table; every value must parse as a number."
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("stage", "---"): continue
        assert len(cells) == 4, line
        rows.setdefault(cells[0], {})[cells[1]] = float(cells[2])   # ValueError on a non-number
    return rows


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = _run("--dry-run", "--out", out, env={"OMP_NUM_THREADS": "2"}, timeout=600)
    return r, out


@pytest.mark.slow
def test_dry_run_table(dry):
    r, out = dry
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "gpu_check.md").read_text()
    assert md in r.stdout                                        # the printed table is the file's
    head = md.splitlines()[0]
    import torch
    assert "device cpu" in head and f"torch {torch.__version__}" in head and re.search(r"commit \S+", head)
    t = _table(md)
    assert set(STAGES) | {"wall"} <= set(t), t.keys()
    for s in STAGES:
        assert (out / f"{s}.log").stat().st_size > 0
        assert all(v == v and v >= 0 for v in t[s].values()), (s, t[s])   # finite (NaN != NaN), non-negative
    p = t["prototype_step"]
    for sc in ("VOC", "COCO"):
        old = next(v for k, v in p.items() if k.startswith(f"{sc} (") and k.endswith("step old"))
        assert old > 0 and p[f"{sc} step new"] > 0
        assert p[f"{sc} step new/old"] == pytest.approx(p[f"{sc} step new"] / old, rel=2e-3)
        assert any(k.startswith(f"{sc} model step") and v > 0 for k, v in p.items())
    c = t["clustering"]
    for sc in ("VOC", "COCO"):
        new = c[f"{sc} new"]; old = next(v for k, v in c.items() if k.startswith(f"{sc} ") and k.endswith(" old"))
        assert new > 0 and c[f"{sc} new/old"] == pytest.approx(new / old, rel=2e-3)
        assert 0.9 < c[f"{sc} inertia new / sklearn"] < 1.5
    for amp in ("bf16", "fp16"):
        ts = t[f"train_step_{amp}"]
        mt = next(v for k, v in ts.items() if k.startswith("mean teacher"))
        br = next(v for k, v in ts.items() if k.startswith("BRPG (") and re.search(r"\d+ prototypes", k))
        assert mt > 0 and br > 0 and ts["BRPG / mean teacher"] == pytest.approx(br / mt, rel=2e-3)
    tr = t["train_200"]
    wall_key = next(k for k in tr if k.endswith(": wall"))
    n = int(re.match(r"(\d+) iterations", wall_key).group(1))
    assert 3 <= n <= 5 and int(re.search(r"(\d+) view samples", wall_key).group(1)) > 0
    assert tr["iterations / wall second"] == pytest.approx(n / tr[wall_key], rel=2e-3)
    assert t["wall"]["total"] >= sum(v for k, v in t["wall"].items() if k.startswith("stage ")) - 1


@pytest.mark.parametrize("args", [("--bogus",), ("--dry-run", "--out"), ("a", "b")])
def test_bad_option(args, tmp_path):
    r = _run(*args)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and "usage:" in lines[0], r.stderr


def test_help():
    r = _run("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:")


def test_failing_stage_names_stage_and_log(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'boom from fake python' >&2\nexit 3\n"); fake.chmod(0o755)
    out = tmp_path / "out"
    r = _run("--dry-run", "--out", out, env={"PYTHON": str(fake)})
    assert r.returncode != 0
    assert f"stage 'env' failed (exit 3); log: {out / 'env.log'}" in r.stderr and "boom from fake python" in r.stderr
    assert not (out / "gpu_check.md").exists() and "| stage |" not in r.stdout
