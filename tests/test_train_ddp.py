"""Two CPU processes (gloo) train BRPG and UniMatch + BRPG through prototype initialisation and end with identical weights."""
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from _ddp import dist_env

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import sys, torch
    from brpg.trainer import Trainer
    from brpg.testing import tiny_demo_config
    out, res, method = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    tr = Trainer(tiny_demo_config(method, ["trainer.epochs=3", "model.sync_bn=true"]), out_dir=out)
    assert tr.world_size == 2, tr.world_size
    r = tr.fit()
    torch.save({"student": tr.student.state_dict(), "teacher": tr.method.teacher.state_dict() if hasattr(tr.method, "teacher") else {},
                "bank": tr.method.bank.state_dict(), "summary": r,
                "losses": [h["loss_sup"] for h in tr.history if h["type"] == "train"]}, res)
    tr.close()
""")


@pytest.mark.parametrize("method", ["brpg", "unimatch_brpg"])
def test_two_process_ddp_identical_state(tmp_path, free_port, method):
    port, out = free_port, tmp_path / "run"
    procs = []
    for rank in range(2):
        env = dict(os.environ, **dist_env(rank, 2, port), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out), str(tmp_path / f"rank{rank}.pt"), method],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    for p in procs:
        try: so, se = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs: q.kill()
            raise
        logs.append(se)
    for rank, p in enumerate(procs): assert p.returncode == 0, f"rank {rank}:\n{logs[rank][-3000:]}"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["summary"]["iterations"] == 6 and bool(a["bank"]["initialized"])
    for key in ("student", "teacher", "bank"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs between ranks"
    assert int(a["bank"]["valid"].sum()) > 0
    assert a["losses"] != b["losses"]                      # the ranks really saw different batches
    assert a["summary"]["best_miou"] == b["summary"]["best_miou"]    # metrics reduced across ranks
    # only rank 0 writes the run directory
    assert sorted(os.listdir(out)) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "views.log", "weights.json"]
