"""What a run directory guarantees (issue: reliability): no non-finite checkpoint ever replaces a finite one, one run
per directory (a lock that a killed run does not leave blocking), no stale temporaries, an overwrite that replaces
the old run only once the new one has saved."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

import brpg.losses
import brpg.methods
from brpg.checkpoint import read_checkpoint
from brpg.testing import tiny_demo_config
from brpg.trainer import NonFiniteLossError, Trainer, TrainerError

ROOT = Path(__file__).resolve().parents[1]


def _run(out, method="supervised", extra=(), **kw):
    return Trainer(tiny_demo_config(method, ["trainer.max_iters=2", "trainer.val_every=1", *extra]), out_dir=out, **kw).fit()


def _all_finite(ck):
    return all(torch.isfinite(v).all() for p in ("student", "teacher") if ck.get(p) for v in ck[p].values()
               if v.is_floating_point())


def test_non_finite_buffers_are_never_saved(tmp_path, monkeypatch):
    "BN running variance -> inf while every loss is finite: the save is refused, the good last.pt stays, the message is true."
    out = tmp_path / "run"
    _run(out)
    good = (out / "last.pt").read_bytes()
    real = brpg.methods.Method.end_iteration
    def poison(self, it):
        real(self, it)
        bn = next(m for m in self.tr.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))
    monkeypatch.setattr(brpg.methods.Method, "end_iteration", poison)
    with pytest.raises(NonFiniteLossError) as e:
        _run(out, extra=["trainer.max_iters=4"], resume=True)
    msg = str(e.value)
    assert "non-finite weights at iteration 3" in msg and "running_var" in msg and f"{out / 'last.pt'} kept" in msg, msg
    assert (out / "last.pt").read_bytes() == good and _all_finite(read_checkpoint(out / "last.pt"))


def test_diverging_lr_never_overwrites_a_good_run(tmp_path):
    "Resuming a finished run with trainer.lr=1e9: training stops; what last.pt holds is finite, weights and BN buffers."
    out = tmp_path / "run"
    _run(out)
    with pytest.raises(NonFiniteLossError, match="kept"):
        _run(out, extra=["trainer.max_iters=8", "trainer.lr=1.0e+9"], resume=True)
    ck = read_checkpoint(out / "last.pt")
    assert ck["iteration"] >= 2 and _all_finite(ck)


def test_message_says_no_checkpoint_when_there_is_none(tmp_path, monkeypatch):
    real = brpg.losses.supervised_loss
    monkeypatch.setattr(brpg.losses, "supervised_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        _run(tmp_path / "run")


def _start_training(out, epochs=200):
    script = textwrap.dedent(f"""
        from brpg.trainer import train_main
        from brpg.testing import tiny_demo_config
        train_main(tiny_demo_config("supervised", ["trainer.epochs={epochs}", "trainer.save_every=1"]), {str(out)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 90 and p.poll() is None:
        if (out / "last.pt").exists() and (out / ".lock").exists(): return p
        time.sleep(0.2)
    p.kill(); raise AssertionError(f"training did not start: {p.communicate()[1][-2000:]}")


@pytest.mark.slow
def test_one_run_per_directory_and_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "run"
    p = _start_training(out)
    try:
        with pytest.raises(TrainerError, match=f"in use by process {p.pid}"):
            Trainer(tiny_demo_config("supervised", ["trainer.epochs=200"]), out_dir=out, resume=True)
        r = subprocess.run([sys.executable, "-m", "brpg.cli", "train", "--config", str(out / "config.yaml"), "--out", str(out),
                            "--resume"], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "in use by process" in r.stderr, r.stderr
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    assert (out / ".lock").exists()                                    # left behind by the killed run
    (out / f".last.pt.{p.pid}.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves it
    n = read_checkpoint(out / "last.pt")["iteration"]
    tr = Trainer(tiny_demo_config("supervised", ["trainer.epochs=200", f"trainer.max_iters={n + 1}"]), out_dir=out, resume=True)
    assert tr.fit()["iterations"] == n + 1
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))


def test_overwrite_that_dies_before_saving_leaves_the_old_run_whole(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(out)
    before = {n: (out / n).read_bytes() for n in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "weights.json")}
    def boom(*a, **k): raise RuntimeError("crash in the first iteration")
    monkeypatch.setattr(brpg.losses, "supervised_loss", boom)
    with pytest.raises(RuntimeError, match="first iteration"):
        Trainer(tiny_demo_config("supervised", ["trainer.lr=0.5"]), out_dir=out, overwrite=True).fit()
    assert {n: (out / n).read_bytes() for n in before} == before       # checkpoints, config and log of the old run
    monkeypatch.undo()
    tr = Trainer(tiny_demo_config("supervised", ["trainer.max_iters=3", "trainer.val_every=1"]), out_dir=out, resume=True)
    assert tr.iteration == 2 and tr.fit()["iterations"] == 3
    # an overwrite that saves replaces everything: the new config and a log that starts at iteration 1
    Trainer(tiny_demo_config("supervised", ["trainer.max_iters=1", "trainer.lr=0.5"]), out_dir=out, overwrite=True).fit()
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["iteration"] == 1 and "lr: 0.5" in (out / "config.yaml").read_text()
    assert not (out / ".overwrite").exists() and not (out / "best.pt").exists() or read_checkpoint(out / "best.pt")["iteration"] == 1


@pytest.mark.parametrize("old_run", [False, True])
def test_overwrite_with_tensorboard_keeps_logging_after_the_first_save(tmp_path, old_run):
    "TensorBoard reopens its events file by name: the staged tb/ moved at the first save must keep receiving scalars."
    out = tmp_path / "run"
    if old_run: _run(out, extra=["trainer.tensorboard=true"])
    ov = ["trainer.max_iters=4", "trainer.val_every=1", "trainer.log_every=1", "trainer.tensorboard=true"]
    res = Trainer(tiny_demo_config("supervised", ov), out_dir=out, overwrite=True).fit()
    assert res["iterations"] == 4 and not (out / ".overwrite").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(out / "tb")); ev.Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4]          # the new run only, all of it


def test_a_run_that_saved_nothing_is_not_offered_resume(tmp_path, monkeypatch):
    def boom(*a, **k): raise RuntimeError("crash before the first checkpoint")
    monkeypatch.setattr(brpg.losses, "supervised_loss", boom)
    with pytest.raises(RuntimeError): _run(tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(TrainerError) as e: _run(tmp_path / "run")
    assert "overwrite=True" in str(e.value) and "resume=True" not in str(e.value), str(e.value)
