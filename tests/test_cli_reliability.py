"""CLI reliability: signal exit codes, unique predict outputs, split files kept, padded eval batches, bare state
dicts, unreadable images and bad --out paths; all through `python -m brpg.cli` subprocesses."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
ENV.pop("BRPG_DEBUG", None)
PNG_KINDS = ("mask", "overlay", "label")


def brpg(*args, cwd=None, timeout=240):
    "Run `python -m brpg.cli ARGS`; return the CompletedProcess."
    return subprocess.run([sys.executable, "-m", "brpg.cli", *map(str, args)], cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def one_line_error(r):
    "A user error: exit code 2 and exactly one stderr line `brpg: error: ...`, no traceback."
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brpg: error: "), r.stderr[-3000:]
    return lines[0]


def save_rgb(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def pngs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*.png"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    "A tiny demo config (own cache) and a bare `model.state_dict()` of its (untrained) model, in a folder without config.yaml."
    import torch
    from brpg.config import save_config
    from brpg.models import create_segmenter
    from brpg.testing import tiny_demo_config
    d = tmp_path_factory.mktemp("bare")
    cfg = tiny_demo_config("supervised", [f"data.cache_dir={d / 'cache'}"])
    save_config(cfg, d / "tiny.yaml")
    torch.manual_seed(0)
    (d / "w").mkdir()
    torch.save(create_segmenter(cfg.model, cfg.data.num_classes).state_dict(), d / "w" / "weights.pt")
    return d


# ------------------------------------------------------------------------------- 4: a stopped run exits non-zero
@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stop_exits_nonzero_after_checkpoint(tmp_path, sig, code):
    from brpg.checkpoint import read_checkpoint
    from brpg.config import save_config
    from brpg.testing import tiny_demo_config
    save_config(tiny_demo_config("supervised", ["trainer.epochs=200", f"data.cache_dir={tmp_path / 'cache'}"]), tmp_path / "t.yaml")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "brpg.cli", "train", "--config", str(tmp_path / "t.yaml"), "--out", str(out)],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            m = out / "metrics.jsonl"
            if m.exists() and sum(1 for _ in m.open()) >= 2: break   # the first log record after the header
            if p.poll() is not None: break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(sig)
        so, se = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == code, (p.returncode, se[-3000:])
    assert (out / "last.pt").is_file() and "Traceback" not in se, se[-3000:]
    assert f"stopped by {sig.name}" in se and "--resume" in se, se[-3000:]
    n = read_checkpoint(out / "last.pt")["iteration"]
    assert 1 <= n < 400
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["type"] == "end" and recs[-1]["stopped"] and recs[-1]["stop_reason"] == sig.name


# ------------------------------------------------------------------------------- 5: predict output names unique
def test_predict_same_stem_in_two_folders(bare, tmp_path):
    save_rgb(tmp_path / "in" / "a" / "x.png", 20, 24, 0)
    save_rgb(tmp_path / "in" / "b" / "x.png", 18, 30, 1)
    out = tmp_path / "pred"
    r = ok(brpg("predict", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml",
                tmp_path / "in" / "a" / "x.png", tmp_path / "in" / "b" / "x.png", "--out", out))
    assert pngs(out) == sorted(f"{s}/x_{k}.png" for s in "ab" for k in PNG_KINDS)
    assert f"wrote 6 PNGs for 2 images to {out}" in r.stdout, r.stdout
    assert np.asarray(Image.open(out / "b" / "x_label.png")).shape == (18, 30)   # each image's own prediction
    assert np.asarray(Image.open(out / "a" / "x_label.png")).shape == (20, 24)


def test_predict_same_stem_same_folder_refused(bare, tmp_path):
    save_rgb(tmp_path / "x.png", 8, 8); save_rgb(tmp_path / "x.jpg", 8, 8)
    line = one_line_error(brpg("predict", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml",
                               tmp_path / "x.png", tmp_path / "x.jpg", "--out", tmp_path / "pred"))
    assert "x.png" in line and "x.jpg" in line and "same PNGs" in line, line
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------------------------------------- 7 + 18: splits
def folder_dataset(root, sizes, C=3, val=2):
    "images/, masks/ (random labels < C), classes.txt and splits/{labeled,unlabeled,val}.txt of images of the given sizes."
    ids = [f"im{i}" for i in range(len(sizes))]
    rng = np.random.default_rng(0)
    for i, (sid, (h, w)) in enumerate(zip(ids, sizes)):
        save_rgb(root / "images" / f"{sid}.png", h, w, seed=i)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, C, (h, w), dtype=np.uint8)).save(root / "masks" / f"{sid}.png")
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(C)))
    (root / "splits").mkdir(exist_ok=True)
    n_lab = (len(ids) - val) // 2
    for name, part in (("labeled", ids[:n_lab]), ("unlabeled", ids[n_lab:len(ids) - val]), ("val", ids[len(ids) - val:])):
        (root / "splits" / f"{name}.txt").write_text("\n".join(part) + "\n")
    return ids


@pytest.mark.slow
def test_splits_refuses_to_replace_dataset_splits(tmp_path):
    root = tmp_path / "ds"; folder_dataset(root, [(12, 12)] * 8)
    lab, unl = root / "splits" / "labeled.txt", root / "splits" / "unlabeled.txt"
    before = (lab.read_text(), unl.read_text())
    line = one_line_error(brpg("splits", "--dataset", "folder", "--root", root, "--set", "data.num_classes=3",
                               "--n-labeled", 2, "--seed", 5))
    assert str(lab) in line and str(unl) in line and "--force" in line, line
    assert (lab.read_text(), unl.read_text()) == before                            # nothing touched
    r = ok(brpg("splits", "--dataset", "folder", "--root", root, "--set", "data.num_classes=3", "--n-labeled", 2,
                "--seed", 5, "--force"))
    assert "wrote 2 labeled lines" in r.stdout and len(lab.read_text().split()) == 2
    assert sorted(lab.read_text().split() + unl.read_text().split()) == [f"im{i}" for i in range(6)]  # val ids excluded
    assert sorted(p.name for p in (root / "splits").iterdir()) == ["labeled.txt", "unlabeled.txt", "val.txt"]
    # a draw that cannot be made still says so first (the files exist)
    line = one_line_error(brpg("splits", "--dataset", "folder", "--root", root, "--set", "data.num_classes=3", "--n-labeled", 99))
    assert "n_labeled = 99" in line, line


def test_splits_set_takes_several_keys(tmp_path):
    "Regression (18): `brpg splits --set K1=V1 K2=V2` applies both keys (split_dir decides where the files go)."
    root = tmp_path / "ds"; folder_dataset(root, [(12, 12)] * 8)
    sd = tmp_path / "elsewhere"
    r = ok(brpg("splits", "--dataset", "folder", "--root", root, "--set", "data.num_classes=3", f"data.split_dir={sd}",
                "--n-labeled", 3))
    assert (sd / "labeled.txt").is_file() and len((sd / "labeled.txt").read_text().split()) == 3, r.stdout
    assert f"{sd / 'labeled.txt'}" in r.stdout


# ------------------------------------------------------------------------------- 12: eval batches of variable-size images
@pytest.mark.slow
def test_eval_batch_size_does_not_change_scores_on_variable_sizes(tmp_path):
    import torch
    from brpg.config import save_config
    from brpg.models import create_segmenter
    from brpg.testing import tiny_demo_config
    root = tmp_path / "ds"
    folder_dataset(root, [(24, 24)] * 4 + [(21, 33), (40, 28), (21, 33), (17, 19), (40, 28)], val=5)
    cfg = tiny_demo_config("supervised", ["data.dataset=folder", f"data.root={root}", "data.num_classes=3", "eval.batch_size=1"])
    save_config(cfg, tmp_path / "f.yaml")
    torch.manual_seed(0)
    torch.save(create_segmenter(cfg.model, 3).state_dict(), tmp_path / "w.pt")
    res = {}
    for bs in (1, 3):
        ok(brpg("eval", "--checkpoint", tmp_path / "w.pt", "--config", tmp_path / "f.yaml", "--set", f"eval.batch_size={bs}",
                "--device", "cpu", "--out", tmp_path / f"e{bs}.json"))
        res[bs] = json.loads((tmp_path / f"e{bs}.json").read_text())
    assert res[3]["eval"]["batch_size"] == 3 and res[3]["num_images"] == 5
    for k in ("miou", "boundary_iou", "acc"): assert res[1][k] == pytest.approx(res[3][k], abs=1e-9), (k, res)
    assert res[1]["iou"] == pytest.approx(res[3]["iou"], abs=1e-9)


# ------------------------------------------------------------------------------- 16: bare state dicts
@pytest.mark.slow
def test_bare_state_dict_with_config(bare, tmp_path):
    out = tmp_path / "e.json"
    r = ok(brpg("eval", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml", "--out", out))
    res = json.loads(out.read_text())
    assert 0 <= res["miou"] <= 1 and len(res["iou"]) == 11 and res["checkpoint"].endswith("weights.pt")
    assert "mIoU" in r.stdout
    save_rgb(tmp_path / "img" / "z.png", 16, 20)
    r = ok(brpg("predict", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml", tmp_path / "img",
                "--out", tmp_path / "pred"))
    assert pngs(tmp_path / "pred") == [f"z_{k}.png" for k in sorted(PNG_KINDS)]


@pytest.mark.slow
def test_bare_state_dict_without_config_says_pass_config(bare, tmp_path):
    save_rgb(tmp_path / "z.png", 8, 8)
    for args in (("eval", "--checkpoint", bare / "w" / "weights.pt", "--out", tmp_path / "e.json"),
                 ("predict", "--checkpoint", bare / "w" / "weights.pt", tmp_path / "z.png", "--out", tmp_path / "p")):
        line = one_line_error(brpg(*args))
        assert "weights.pt" in line and "pass --config" in line and len(line) < 300, line
    assert not (tmp_path / "e.json").exists()


# ------------------------------------------------------------------------------- 17: unreadable images, bad --out
def test_predict_skips_unreadable_files(bare, tmp_path):
    imgs = tmp_path / "imgs"
    save_rgb(imgs / "a.png", 16, 16); save_rgb(imgs / "c.jpg", 12, 20, 1)
    (imgs / "b.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    r = ok(brpg("predict", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml", imgs, "--out", out))
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brpg: warning: skipped ") and "b.png" in err[0], r.stderr
    assert pngs(out) == sorted(f"{s}_{k}.png" for s in "ac" for k in PNG_KINDS)
    assert "wrote 6 PNGs for 2 images" in r.stdout and "1 skipped" in r.stdout, r.stdout


def test_predict_nothing_readable_fails(bare, tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("a.png", "b.jpg"): (tmp_path / "imgs" / n).write_bytes(b"junk")
    r = brpg("predict", "--checkpoint", bare / "w" / "weights.pt", "--config", bare / "tiny.yaml", tmp_path / "imgs",
             "--out", tmp_path / "pred")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert sum(l.startswith("brpg: warning: skipped ") for l in lines) == 2 and lines[-1].startswith("brpg: error: "), r.stderr
    assert pngs(tmp_path / "pred") == []


@pytest.mark.slow
def test_bad_out_fails_before_any_work(bare, tmp_path):
    save_rgb(tmp_path / "z.png", 8, 8)
    (tmp_path / "afile").write_text("keep")
    ck = bare / "w" / "weights.pt"
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):       # predict: --out must be (or become) a folder
        line = one_line_error(brpg("predict", "--checkpoint", ck, "--config", bare / "tiny.yaml", tmp_path / "z.png", "--out", out))
        assert str(out) in line and "file" in line, line
    (tmp_path / "adir").mkdir()                                        # eval: --out is the JSON file, not a folder
    line = one_line_error(brpg("eval", "--checkpoint", ck, "--config", bare / "tiny.yaml", "--out", tmp_path / "adir"))
    assert str(tmp_path / "adir") in line and "folder" in line, line
    line = one_line_error(brpg("eval", "--checkpoint", ck, "--config", bare / "tiny.yaml", "--out", tmp_path / "afile" / "e.json"))
    assert "afile" in line, line
    assert (tmp_path / "afile").read_text() == "keep" and list((tmp_path / "adir").iterdir()) == []
    # checked first: a missing checkpoint is not even looked at
    line = one_line_error(brpg("eval", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "adir"))
    assert "is a folder" in line, line
