"""Trainer end-to-end on a tiny demo config (CPU): exact resume, bad input, NaN stop, interrupts."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

import brpg.losses
from brpg.trainer import Trainer, TrainerError, NonFiniteLossError, train_main
from brpg.checkpoint import read_checkpoint as load_checkpoint
from brpg.testing import tiny_demo_config

ROOT = Path(__file__).resolve().parents[1]


class StopAt:
    "Callback: request a stop once `iteration` iterations are done."
    def __init__(self, iteration): self.iteration = iteration
    def on_step_end(self, trainer, logs):
        if trainer.iteration == self.iteration: trainer.stop("test")


def _state(tr):
    return {"student": tr.student.state_dict(), "bank": tr.method.bank.state_dict(),
            "teacher": tr.method.teacher.state_dict() if hasattr(tr.method, "teacher") else None,
            "momentum": [s["momentum_buffer"] for s in tr.optimizer.state_dict()["state"].values()]}


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): _assert_same(x, y, f"{where}[{i}]")
    elif a is None or b is None:
        assert a is None and b is None, where
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.float() - b.float()).abs().max():.3g})"
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize("method", ["brpg", "unimatch_brpg"])
def test_resume_is_exact(tmp_path, method):
    "8 iterations straight == 3 + stop + resume to 5 (queues live) + stop + resume to 8 (prototypes live)."
    cfg = tiny_demo_config(method, ["trainer.epochs=4"])          # init at iteration 4
    straight = Trainer(cfg, out_dir=tmp_path / "a")
    straight.fit()
    assert straight.iteration == 8 and bool(straight.method.bank.initialized)

    tr = Trainer(cfg, callbacks=[StopAt(3)], out_dir=tmp_path / "b")
    r = tr.fit()
    assert r["stopped"] and r["iterations"] == 3
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["iteration"] == 3 and ck["queues"] is not None and not bool(ck["bank"]["initialized"])
    tr = Trainer(cfg, callbacks=[StopAt(5)], out_dir=tmp_path / "b", resume=True)
    assert tr.iteration == 3 and tr.method.queues is not None
    tr.fit()
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["iteration"] == 5 and bool(ck["bank"]["initialized"]) and ck["queues"] is None
    tr = Trainer(cfg, out_dir=tmp_path / "b", resume=True)
    res = tr.fit()
    assert res["iterations"] == 8 and not res["stopped"]

    _assert_same(_state(straight), _state(tr))
    val = lambda t: [(h["iteration"], h["miou"]) for h in t.history if h["type"] == "val"]
    assert val(straight) == val(tr)
    # metrics.jsonl of the resumed run: one record per log step, no duplicates across the resumes
    recs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    its = [r["iteration"] for r in recs if r["type"] == "train"]
    assert its == list(range(1, 9))


class Watcher:
    "Callback that observes everything the views observe."
    def __init__(self): self.samples, self.updates = 0, 0
    def on_features_sampled(self, trainer, sample): self.samples += 1
    def on_prototypes_updated(self, trainer, bank): self.updates += 1


@pytest.mark.slow
def test_observers_do_not_change_training(tmp_path, monkeypatch):
    "Attaching view-style listeners (feature samples, prototype updates) leaves the run bit-identical."
    import brpg.trainer
    monkeypatch.setattr(brpg.methods, "VIEW_SAMPLE_SIZE", 16)   # force the subsampling path on tiny data
    cfg = tiny_demo_config("brpg", ["trainer.epochs=4"])
    plain = Trainer(cfg, out_dir=tmp_path / "plain"); plain.fit()
    w = Watcher()
    watched = Trainer(cfg, callbacks=[w], out_dir=tmp_path / "watched"); watched.fit()
    assert w.samples > 0 and w.updates > 0
    _assert_same(_state(plain), _state(watched))


def _tiny_run(tmp_path, name="run", method="supervised", extra=()):
    out = tmp_path / name
    Trainer(tiny_demo_config(method, ["trainer.max_iters=1", *extra]), out_dir=out).fit()
    return out


def test_out_dir_and_resume_errors(tmp_path):
    out = _tiny_run(tmp_path)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(TrainerError, match="already holds a run") as e:
        Trainer(tiny_demo_config("supervised"), out_dir=out)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainerError, match="exclude each other"):
        Trainer(tiny_demo_config("supervised"), out_dir=out, resume=True, overwrite=True)
    with pytest.raises(TrainerError, match="does not exist"):
        Trainer(tiny_demo_config("supervised"), out_dir=tmp_path / "empty", resume=True)
    # resume with another class count / backbone: one line naming both values; the checkpoint is untouched
    cfg = tiny_demo_config("supervised", ["data.num_classes=12"])
    with pytest.raises(TrainerError, match=r"num_classes=11 .*num_classes=12") as e:
        Trainer(cfg, out_dir=out, resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainerError, match="backbone='resnet18'.*backbone='resnet34'"):
        Trainer(tiny_demo_config("supervised", ["model.backbone=resnet34"]), out_dir=out, resume=True)
    # missing dataset: one line naming the key and the folder; nothing is written
    bad = tiny_demo_config("supervised", ["data.dataset=voc", f"data.root={tmp_path / 'no_such_voc'}"])
    with pytest.raises(TrainerError, match="no_such_voc") as e:
        Trainer(bad, out_dir=out, overwrite=True)
    assert "\n" not in str(e.value) and "data.root" in str(e.value)
    assert (out / "last.pt").read_bytes() == before
    # overwrite=True replaces the run
    r = Trainer(tiny_demo_config("supervised", ["trainer.max_iters=2"]), out_dir=out, overwrite=True).fit()
    assert r["iterations"] == 2 and load_checkpoint(out / "last.pt")["iteration"] == 2


@pytest.mark.parametrize("log_every", [1, 10])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, log_every):
    "NaN in L_s at iteration 3: stop naming iteration and term; last.pt stays the finite one of iteration 2."
    real, calls = brpg.losses.supervised_loss, []
    def flaky(logits, target, cfg, ignore_index=255):
        calls.append(1)
        loss = real(logits, target, cfg, ignore_index)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(brpg.losses, "supervised_loss", flaky)
    out = tmp_path / "run"
    cfg = tiny_demo_config("supervised", [f"trainer.log_every={log_every}", "trainer.val_every=2", "trainer.epochs=5"])
    with pytest.raises(NonFiniteLossError, match="iteration 3: loss_sup = nan") as e:
        Trainer(cfg, out_dir=out).fit()
    assert "\n" not in str(e.value)
    ck = load_checkpoint(out / "last.pt")
    assert ck["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["type"] == "error" and "iteration 3" in recs[-1]["message"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_checkpoint(tmp_path, sig):
    class Kill:
        def on_step_end(self, trainer, logs):
            if trainer.iteration == 2: os.kill(os.getpid(), sig)
    before = signal.getsignal(sig)
    tr = Trainer(tiny_demo_config("supervised"), callbacks=[Kill()], out_dir=tmp_path)
    r = tr.fit()
    assert r["stopped"] and r["stop_reason"] == sig.name and r["iterations"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    assert signal.getsignal(sig) == before                      # the previous handler is back


@pytest.mark.slow
def test_ctrl_c_in_a_real_process(tmp_path):
    "train_main in a subprocess; SIGINT after a few iterations -> exit 0, checkpoint, message; resume continues."
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        from brpg.trainer import train_main
        from brpg.testing import tiny_demo_config
        r = train_main(tiny_demo_config("supervised", ["trainer.epochs=200"]), {str(out)!r})
        print("RESULT", r["stopped"], r["iterations"])
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 60:
            m = out / "metrics.jsonl"
            if m.exists() and sum(1 for _ in m.open()) >= 2: break
            if p.poll() is not None: break
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        so, se = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0, se[-2000:]
    assert "RESULT True" in so and "stopped at iteration" in se
    n = load_checkpoint(out / "last.pt")["iteration"]
    assert 2 <= n < 400
    tr = Trainer(tiny_demo_config("supervised", ["trainer.epochs=200"]), out_dir=out, resume=True)
    assert tr.iteration == n


def test_variants_grad_accum_no_teacher_bn_forward_tensorboard(tmp_path):
    "grad_accum=2 (iterations per epoch = batches // 2), eval-mode entropy, TensorBoard scalars + image, tqdm."
    cfg = tiny_demo_config("mean_teacher", ["trainer.iters_per_epoch=0", "trainer.grad_accum=2", "trainer.max_iters=1",
                                            "method.sup_only_epochs=0", "method.teacher_bn_train_forward=false",
                                            "trainer.tensorboard=true", "trainer.progress=true"])
    tr = Trainer(cfg, out_dir=tmp_path)
    assert tr.iters_per_epoch == len(tr.loaders["unlabeled"]) // 2
    t_buf0 = {k: v.clone() for k, v in tr.method.teacher.state_dict().items() if "running_mean" in k}
    r = tr.fit()
    assert r["iterations"] == 1 and r["final_miou"] is not None
    logs = [h for h in tr.history if h["type"] == "train"]
    assert all(h["loss_unsup"] > 0 and h["phase"] == "semi" for h in logs)
    # without the train-mode teacher forward the teacher's BN buffers follow the student by EMA (d = 0 at t = 0)
    s_buf, t_buf = tr.student.state_dict(), tr.method.teacher.state_dict()
    assert all(torch.equal(t_buf[k], s_buf[k]) and not torch.equal(t_buf[k], t_buf0[k]) for k in t_buf0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tb")); ev.Reload()
    assert {"train/loss", "train/lr", "val/miou"} <= set(ev.Tags()["scalars"]) and "val/prediction" in ev.Tags()["images"]


def test_recluster_keeps_queues_and_emits_updates(tmp_path):
    "method.recluster_every>0: queues stay alive after init, prototypes are re-clustered and views are told."
    class Rec:
        def __init__(self): self.ev = []
        def on_prototypes_initialized(self, tr, bank): self.ev.append(("init", tr.iteration))
        def on_prototypes_updated(self, tr, bank): self.ev.append(("upd", tr.iteration))
    rec = Rec()
    tr = Trainer(tiny_demo_config("brpg", ["trainer.epochs=3", "method.recluster_every=1", "trainer.log_every=10"]),
                 callbacks=[rec], out_dir=tmp_path)
    tr.fit()
    assert rec.ev[0] == ("init", 4) and ("upd", 5) in rec.ev          # re-clustered before iteration 6
    assert tr.method.queues is not None and int(tr.method.queues["high"].counts.sum() + tr.method.queues["low"].counts.sum()) > 0
    assert load_checkpoint(tmp_path / "last.pt")["queues"] is not None


def test_overwrite_keeps_old_checkpoint_until_the_new_run_saves(tmp_path, monkeypatch):
    out = _tiny_run(tmp_path, extra=["trainer.max_iters=2", "trainer.val_every=1"])
    old_last, old_best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()
    def boom(*a, **k): raise RuntimeError("crash in the first iteration")
    monkeypatch.setattr(brpg.losses, "supervised_loss", boom)
    with pytest.raises(RuntimeError, match="first iteration"):
        Trainer(tiny_demo_config("supervised"), out_dir=out, overwrite=True).fit()
    assert (out / "last.pt").read_bytes() == old_last and (out / "best.pt").read_bytes() == old_best


@pytest.mark.parametrize("copy_bn", [False, True])
def test_teacher_hand_over_bn_buffers(tmp_path, copy_bn):
    "At the hand-over the teacher takes the student's parameters; its BN buffers only with method.teacher_copy_bn."
    cfg = tiny_demo_config("mean_teacher", [f"method.teacher_copy_bn={str(copy_bn).lower()}"])
    tr = Trainer(cfg, callbacks=[StopAt(2)], out_dir=tmp_path / "r")
    tr.fit()
    assert tr.method.teacher_start == 2
    tr.method.begin_iteration(tr.method.teacher_start)
    for a, b in zip(tr.method.teacher.parameters(), tr.student.parameters()): assert torch.equal(a, b)
    same = [torch.equal(a, b) for a, b in zip(tr.method.teacher.buffers(), tr.student.buffers()) if a.is_floating_point()]
    assert all(same) if copy_bn else not all(same)


# ---------------------------------------------------------------------------------------- loader stumbles on real data
def _demo_splits(tmp_path, names=("labeled.txt", "val.txt")):
    "A split folder holding only some of the tiny demo's split files."
    import shutil
    from brpg.data import dataset_root
    root = dataset_root(tiny_demo_config("supervised"))
    d = tmp_path / "splits"; d.mkdir()
    for n in names: shutil.copy(root / "splits" / n, d / n)
    return d


def test_supervised_trains_without_unlabeled_split(tmp_path):
    "No unlabeled.txt: supervised-only trains, one epoch = one pass over the labeled set (8 images / batch 2)."
    d = _demo_splits(tmp_path)
    cfg = tiny_demo_config("supervised", [f"data.split_dir={d}", "trainer.iters_per_epoch=0", "trainer.epochs=1"])
    tr = Trainer(cfg, out_dir=tmp_path / "run")
    assert tr.iters_per_epoch == 4 and len(tr.datasets["unlabeled"]) == 0
    assert tr.fit()["iterations"] == 4
    for method in ("mean_teacher", "brpg"):
        with pytest.raises(TrainerError, match=f"method.name={method} needs an unlabeled split: '.*unlabeled.txt' not found"):
            Trainer(tiny_demo_config(method, [f"data.split_dir={d}"]), out_dir=tmp_path / method)


class SlowObserver:
    "A view-like callback that is slow on every event it gets."
    def __init__(self, s): self.s = s
    def on_validation_end(self, trainer, res): time.sleep(self.s)
    def on_features_sampled(self, trainer, sample): time.sleep(self.s)


def test_it_per_s_counts_training_steps_only(tmp_path, monkeypatch):
    "Slow validation, checkpoints and view callbacks (0.5 s each) are left out of it_per_s; wall_it_per_s keeps them."
    import brpg.trainer
    real_save = brpg.trainer.atomic_save
    monkeypatch.setattr(brpg.trainer, "atomic_save", lambda *a: (time.sleep(0.5), real_save(*a)))
    cfg = tiny_demo_config("supervised", ["trainer.max_iters=2", "trainer.val_every=1", "trainer.view_every=1"])
    Trainer(cfg, callbacks=[SlowObserver(0.5)], out_dir=tmp_path / "run").fit()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2]
    # iteration 2 (after the validation and checkpoint of 1) takes well under 1 s of training; before the fix
    # its it_per_s also held the checkpoint and the view callback (>= 1 s)
    assert 1 / train[1]["it_per_s"] < 1.0, train[1]
    for r, slept in zip(train, (0.5, 1.5)):      # iteration 1: its view; iteration 2: + validation and checkpoint of 1
        left_out = 1 / r["wall_it_per_s"] - 1 / r["it_per_s"]     # + the real checkpoint writes
        assert slept - 0.05 <= left_out <= slept + 3, (r, left_out)


def test_metrics_jsonl_is_strict_json(tmp_path, monkeypatch):
    "A class absent from val has a NaN IoU: metrics.jsonl writes null, every line parses with a strict parser."
    import brpg.metrics
    real = brpg.metrics.evaluate
    def evaluate(*a, **k):
        res = real(*a, **k); res["iou"] = [float(v) for v in res["iou"]][:-1] + [float("nan")]; return res
    monkeypatch.setattr(brpg.metrics, "evaluate", evaluate)
    Trainer(tiny_demo_config("supervised", ["trainer.max_iters=2", "trainer.val_every=1"]), out_dir=tmp_path / "run").fit()
    def no_constants(c): raise ValueError(f"non-standard JSON constant {c}")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(l, parse_constant=no_constants) for l in lines]
    vals = [r for r in recs if r["type"] == "val"]
    assert len(vals) == 2 and all(v["iou"][-1] is None and len(v["iou"]) == 11 for v in vals)


def test_grayscale_folder_dataset_auto_classes_and_report(tmp_path, capsys):
    "Grayscale PNGs: the start-up line says they become 3-channel; data.num_classes=0 is read from classes.txt and saved."
    import numpy as np, yaml
    from PIL import Image
    root = tmp_path / "ds"; (root / "images").mkdir(parents=True); (root / "masks").mkdir(); (root / "splits").mkdir()
    rng = np.random.default_rng(0)
    ids = [f"g{i}" for i in range(10)]
    for sid in ids:
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(root / "images" / f"{sid}.png")
        Image.fromarray(rng.integers(0, 3, (40, 40), dtype=np.uint8), "L").save(root / "masks" / f"{sid}.png")
    (root / "classes.txt").write_text("background\nbone\ntissue\n")
    for name, part in (("labeled", ids[:4]), ("unlabeled", ids[4:8]), ("val", ids[8:])):
        (root / "splits" / f"{name}.txt").write_text("\n".join(part) + "\n")
    cfg = tiny_demo_config("supervised", ["data.dataset=folder", f"data.root={root}", "data.num_classes=0", "trainer.max_iters=1"])
    tr = Trainer(cfg, out_dir=tmp_path / "run")
    assert tr.cfg.data.num_classes == 3
    tr.fit()
    assert len(tr.last_metrics["iou"]) == 3                                       # a 3-class model was trained
    err = capsys.readouterr().err
    assert ("[brpg] data: folder, 4 labeled, 4 unlabeled, 2 val images, 3 classes; grayscale images (labeled, unlabeled, val) "
            "are replicated to 3 channels and normalised with data.mean/std") in err, err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["num_classes"] == 3
