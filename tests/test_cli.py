"""End-to-end tests of the `brpg` command line, run as subprocesses (exit codes, stderr, files written)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
ENV.pop("BRPG_DEBUG", None)
SUBCOMMANDS = ("train", "eval", "predict", "splits", "config", "demo")


def brpg(*args, cwd=None, timeout=240):
    "Run `python -m brpg.cli ARGS` (the same `main` as the console script); return the CompletedProcess."
    return subprocess.run([sys.executable, "-m", "brpg.cli", *map(str, args)], cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r):
    "A user error: exit code 2 and exactly one stderr line `brpg: error: ...`, no traceback."
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brpg: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_console_script_help():
    exe = shutil.which("brpg", path=str(Path(sys.executable).parent))
    assert exe, "the `brpg` console script is not installed in this environment"
    r = subprocess.run([exe, "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for c in SUBCOMMANDS: assert c in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd):
    r = brpg(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and cmd in r.stdout.split("\n", 1)[0]


def test_config_typo_names_closest_key():
    line = one_line_error(brpg("config", "--config", "demo", "--set", "method.temprature=0.2"))
    assert "method.temprature" in line and "method.temperature" in line


def test_config_prints_resolved_and_keys():
    r = brpg("config", "--config", "demo", "--set", "method.temperature=0.2")
    assert r.returncode == 0 and "temperature: 0.2" in r.stdout and "backbone: resnet18" in r.stdout
    r = brpg("config", "--keys")
    assert r.returncode == 0 and "method.proto_loss_weight = 0.25  # " in r.stdout


def test_missing_config_file_is_one_line():
    line = one_line_error(brpg("train", "--config", "/nonexistent/cfg.yaml"))
    assert "/nonexistent/cfg.yaml" in line


@pytest.mark.slow
def test_splits_on_tiny_folder_dataset(tmp_path):
    import numpy as np
    from PIL import Image
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True); (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        if i < 5: Image.fromarray(rng.integers(0, 3, (16, 16), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("a\nb\nc\n")
    r = brpg("splits", "--dataset", "folder", "--root", root, "--n-labeled", 2, "--seed", 1, "--set", "data.num_classes=3")
    assert r.returncode == 0, r.stderr
    lab = (root / "splits" / "labeled.txt").read_text().split()
    unl = (root / "splits" / "unlabeled.txt").read_text().split()
    assert len(lab) == 2 and not set(lab) & set(unl) and sorted(lab + unl) == [f"im{i}" for i in range(6)]
    assert "im5" not in lab  # im5 has no mask, so it can only be unlabeled
    r = brpg("splits", "--dataset", "folder", "--root", root, "--n-labeled", 9, "--set", "data.num_classes=3")
    assert r.returncode == 2 and "n_labeled = 9" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "`brpg train` of a seconds-scale BRPG config (sup-only, sampling and prototype phases: 6 iterations)."
    from brpg.config import save_config
    from brpg.testing import tiny_demo_config
    d = tmp_path_factory.mktemp("cli")
    save_config(tiny_demo_config("brpg", ["trainer.epochs=3"]), d / "tiny.yaml")
    save_config(tiny_demo_config("brpg", ["trainer.epochs=3", "data.num_classes=5"]), d / "tiny5.yaml")
    r = brpg("train", "--config", d / "tiny.yaml", "--out", d / "run", cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.slow
def test_train_writes_run(tiny_run):
    run = tiny_run / "run"
    assert {"last.pt", "best.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["type"] == "end" and recs[-1]["iterations"] == 6
    assert any(r.get("phase") == "prototypes" for r in recs)  # the run reached the prototype phase


@pytest.mark.slow
def test_eval_writes_json(tiny_run):
    out = tiny_run / "eval.json"
    r = brpg("eval", "--checkpoint", tiny_run / "run", "--out", out, cwd=tiny_run)  # config from the run
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert 0 <= res["miou"] <= 1 and 0 <= res["boundary_iou"] <= 1
    assert list(res["iou"]) == ["background"] + [f"digit {i}" for i in range(10)]
    assert res["checkpoint"].endswith("best.pt") and f"mIoU {100 * res['miou']:.2f}" in r.stdout
    # the number the trainer logged for best.pt is what `brpg eval` measures again
    recs = [json.loads(l) for l in (tiny_run / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max((x for x in recs if x["type"] == "val"), key=lambda x: x["miou"])
    assert abs(best["miou"] - res["miou"]) < 1e-4, (best, res["miou"])


@pytest.mark.slow
def test_predict_writes_pngs(tiny_run):
    import numpy as np
    from PIL import Image
    imgs = tiny_run / "imgs"; imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(imgs / "b.jpg")
    r = brpg("predict", "--checkpoint", tiny_run / "run" / "last.pt", imgs, "--out", tiny_run / "pred", cwd=tiny_run)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (tiny_run / "pred").iterdir())
    assert names == sorted(f"{s}_{k}.png" for s in "ab" for k in ("mask", "overlay", "label"))
    assert np.asarray(Image.open(tiny_run / "pred" / "a_mask.png")).shape == (37, 45, 3)
    assert np.asarray(Image.open(tiny_run / "pred" / "b_label.png")).shape == (20, 30)
    assert np.asarray(Image.open(tiny_run / "pred" / "a_label.png")).max() < 11
    one_line_error(brpg("predict", "--checkpoint", tiny_run / "run", tiny_run / "nope.png", "--out", tiny_run / "p2"))


@pytest.mark.slow
def test_train_refuses_existing_run(tiny_run):
    last = tiny_run / "run" / "last.pt"
    before = (last.stat().st_mtime_ns, last.read_bytes())
    line = one_line_error(brpg("train", "--config", tiny_run / "tiny.yaml", "--out", tiny_run / "run", cwd=tiny_run))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (last.stat().st_mtime_ns, last.read_bytes()) == before


@pytest.mark.slow
def test_checkpoint_of_other_class_count(tiny_run):
    line = one_line_error(brpg("eval", "--checkpoint", tiny_run / "run" / "best.pt", "--config", tiny_run / "tiny5.yaml"))
    assert "11 classes" in line and "data.num_classes=5" in line


def test_bad_checkpoint_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    line = one_line_error(brpg("eval", "--checkpoint", tmp_path / "x.pt"))
    assert "x.pt" in line and "not a readable torch checkpoint" in line


# ---------------------------------------------------------------------------------------- loader stumbles on real data
def test_config_keys_list_choices():
    r = brpg("config", "--keys")
    assert r.returncode == 0, r.stderr
    assert "data.dataset = 'demo'  # dataset format (choices: demo, brain, voc, cityscapes, coco, folder)" in r.stdout
    assert "method.name = 'brpg'  # which method to train (choices: supervised, mean_teacher, brpg, unimatch, unimatch_brpg)" in r.stdout
    assert "data.num_classes = 11  # " in r.stdout and "0 = auto" in r.stdout


@pytest.mark.slow
def test_crop_dependent_keys_are_checked():
    "method.grid_num must fit data.crop_size (one-line error naming both and a valid value); 0 derives it."
    line = one_line_error(brpg("config", "--config", "voc/classic_366", "--set", "data.crop_size=321"))
    assert "data.crop_size" in line and "method.grid_num" in line and "method.grid_num=20" in line, line
    line = one_line_error(brpg("config", "--set", "data.crop_size=512", "method.grid_num=0"))
    assert "data.crop_size=513" in line, line
    r = brpg("config", "--set", "data.crop_size=321", "method.grid_num=0")
    assert r.returncode == 0 and "grid_num: 0" in r.stdout and r.stderr == "", r.stderr


def test_aspp_dilations_beyond_the_feature_map_warn_in_one_line():
    "ASPP dilations larger than the crop's stride-8 feature map: one warning line with a scaled suggestion."
    r = brpg("config", "--set", "data.crop_size=57", "method.grid_num=14")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == ["brpg: warning: config key 'model.aspp_dilations' = [12, 24, 36]: the largest "
        "dilation 36 exceeds the 8x8 feature map of data.crop_size=57 at model.output_stride=8; try model.aspp_dilations=[2, 5, 7]"], r.stderr


def test_shipped_configs_validate_without_warnings():
    import warnings
    from brpg.config import CONFIG_DIR, load_config
    names = sorted(str(q.relative_to(CONFIG_DIR))[:-5] for q in CONFIG_DIR.rglob("*.yaml"))
    assert {"voc/classic_366", "cityscapes/372", "coco/1_32", "demo", "brain"} <= set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in names: load_config(n)


def test_voc_without_labeled_split_says_how_to_create_it(tmp_path):
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True); (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClassAug").mkdir()
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
    line = one_line_error(brpg("train", "--config", "voc/classic_366", "--set", f"data.root={tmp_path}",
                               f"data.split_dir={tmp_path / 'splits'}", "--out", tmp_path / "run"))
    assert "labeled.txt' not found" in line and "brpg splits --config" in line and "--n-labeled N" in line, line
    assert "ImageSets/Segmentation/train.txt" in line, line


def _auto_classes_config(tiny_run):
    from brpg.config import save_config
    from brpg.testing import tiny_demo_config
    save_config(tiny_demo_config("brpg", ["trainer.epochs=3", "data.num_classes=0"]), tiny_run / "tiny0.yaml")
    return tiny_run / "tiny0.yaml"


@pytest.mark.slow
def test_eval_resolves_num_classes_auto(tiny_run):
    "data.num_classes: 0 in the given config means the dataset's count (the demo's 11), as the checkpoint has."
    _auto_classes_config(tiny_run)
    r = brpg("eval", "--checkpoint", tiny_run / "run", "--config", tiny_run / "tiny0.yaml", "--out", tiny_run / "e0.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tiny_run / "e0.json").read_text())["iou"]) == 11


@pytest.mark.slow
def test_predict_resolves_num_classes_auto(tiny_run):
    _auto_classes_config(tiny_run)
    import numpy as np
    from PIL import Image
    (tiny_run / "imgs0").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tiny_run / "imgs0" / "z.png")
    r = brpg("predict", "--checkpoint", tiny_run / "run", tiny_run / "imgs0", "--config", tiny_run / "tiny0.yaml",
             "--out", tiny_run / "pred0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tiny_run / "pred0" / "z_label.png").is_file()
