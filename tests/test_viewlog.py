"""The view log end to end: what a real `Trainer` writes into its run directory, following a `brpg train` started in
a subprocess (no trainer in this process), resume, the size budget, and the run's loader workers and log lines."""
import multiprocessing as mp
import os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from brpg.config import save_config
from brpg.testing import tiny_demo_config
from brpg.viewlog import VIEW_LOG, ViewLogState, read_view_log

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def records(run):
    recs, off = read_view_log(run / VIEW_LOG)
    assert off == (run / VIEW_LOG).stat().st_size                 # every frame whole
    return recs


@pytest.mark.slow
def test_trainer_writes_view_log_and_resume_continues_it(tmp_path):
    from brpg.trainer import Trainer
    run = tmp_path / "run"
    tr = Trainer(tiny_demo_config("brpg", ["trainer.epochs=6"]), out_dir=run)
    tr.fit()
    recs = records(run)
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "start" and kinds[-1] == "end" and {"sample", "bank", "drift"} <= set(kinds)
    m = recs[0]["meta"]
    assert (m["method"], m["num_classes"], m["class_names"], m["prototypes_at"], m["max_iters"]) == \
        ("brpg", 11, tr.class_names, tr.method.proto_init_iter, 12)
    s = next(r for r in recs if r["kind"] == "sample")
    assert s["feats"].dtype == np.float16 and s["feats"].shape[1] == tr.cfg.model.rep_dim
    assert s["is_labeled"].dtype == bool and len(s["is_labeled"]) == len(s["labels"]) and s["meta"]["phase"]
    st = ViewLogState()
    for r in recs: st.add(r)
    h = st.history()
    assert h["from_init"].shape[1:] == tuple(tr.method.bank.protos.shape[:2]) and h["iterations"][-1] == tr.iteration
    np.testing.assert_allclose(st.bank["protos"], tr.method.bank.protos.numpy(), atol=2e-3)   # fp16 copy of the last bank
    n0 = len(recs)
    tr2 = Trainer(tiny_demo_config("brpg", ["trainer.epochs=8"]), out_dir=run, resume=True)
    tr2.fit()
    recs2 = records(run)
    key = lambda rs: [(r["kind"], r["iteration"]) for r in rs]
    assert key(recs2[:n0]) == key(recs) and key(recs2[n0:n0 + 2]) == [("resume", 12), ("start", 12)]   # appended
    st2 = ViewLogState()
    for r in recs2: st2.add(r)
    its = st2.history()["iterations"]
    assert its[-1] == 16 and (np.diff(its) > 0).all()             # one history across the resume, in order


@pytest.mark.slow
def test_view_log_respects_its_budget(tmp_path):
    from brpg.trainer import Trainer
    run = tmp_path / "run"
    tr = Trainer(tiny_demo_config("brpg", ["trainer.epochs=10", "trainer.view_every=1", "trainer.view_log_mb=0.25"]), out_dir=run)
    tr.fit()
    recs = records(run)
    n_samples = sum(r["kind"] == "sample" for r in recs)
    assert (run / VIEW_LOG).stat().st_size <= 0.25 * 2**20
    assert 2 <= n_samples < 20 and tr.viewlog.skipped == 20 - n_samples, (n_samples, tr.viewlog.skipped)
    assert recs[-1]["kind"] == "end"


@pytest.mark.slow
def test_view_log_off(tmp_path):
    from brpg.trainer import Trainer
    Trainer(tiny_demo_config("mean_teacher", ["trainer.epochs=2", "trainer.view_log=false"]), out_dir=tmp_path / "r").fit()
    assert not (tmp_path / "r" / VIEW_LOG).exists()


@pytest.mark.slow
def test_follow_a_cli_run_from_another_process(tmp_path):
    "The dashboard updates from a `brpg train` subprocess: no trainer in this process."
    from brpg.views import open_run
    cfg = tmp_path / "tiny.yaml"
    save_config(tiny_demo_config("brpg", ["trainer.epochs=10", "trainer.view_every=1"]), cfg)
    run = tmp_path / "run"
    dash = open_run(run, follow=True, interval=0.1)               # before the run exists: it waits
    assert dash.state == "following" and "waiting for" in dash.status.value
    p = subprocess.Popen([sys.executable, "-m", "brpg.cli", "train", "--config", str(cfg), "--out", str(run)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = set()
    try:
        t0 = time.time()
        while dash.follower.thread.is_alive() and time.time() - t0 < 300:
            seen.add(dash._iteration); time.sleep(0.05)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0, err[-3000:]
    assert dash.state == "finished", dash.status.value
    assert len(seen - {0}) >= 3, seen                               # it moved while the run trained
    assert dash.trainer is None and dash.follower.polls >= 3
    h = dash.drift.history()
    assert h["iterations"][-1] == 20 and h["from_init"].shape[1] == 11
    assert dash.features.renders >= 1 and dash.features.sample_meta["iteration"] == 20
    assert dash.drift.renders >= 1 and dash.margins.renders >= 1
    assert [v for _, v in dash.curves.vals] and dash.curves.artists["val"]["miou"].get_xdata()[-1] == 20
    assert "Prototypes start at iteration" in dash.drift.note.value


@pytest.mark.slow
def test_fit_closes_loader_workers_and_routes_log_lines(tmp_path):
    from brpg.trainer import Trainer
    from brpg.views import TrainingDashboard
    tr = Trainer(tiny_demo_config("supervised", ["trainer.epochs=2", "data.num_workers=1"]), out_dir=tmp_path / "r")
    dash = TrainingDashboard(tr)
    dash.run(block=True)
    assert dash.state == "finished", dash.error.outputs
    deadline = time.time() + 20
    while mp.active_children() and time.time() < deadline: time.sleep(0.1)
    assert mp.active_children() == []                              # no worker outlives the run
    text = "".join(o.get("text", "") for o in dash.messages.outputs)
    assert "[brpg] data:" in text and "best mIoU" in text          # the trainer's lines, in the dashboard
