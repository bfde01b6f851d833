"""Config reliability, where a user meets it: shipped configs inside the package (and the wheel), the
Cityscapes/COCO evaluation settings, sliding-window and scale validation, scientific notation in YAML and
`--set`, and which prefix an override error carries (`--set` on the command line, `override` from Python)."""
import os, shutil, subprocess, sys, zipfile
from pathlib import Path

import pytest

from brpg import cli as brpg_cli
from brpg.config import CONFIG_DIR, ConfigError, apply_overrides, load_config, Config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
ENV.pop("BRPG_DEBUG", None)
SHIPPED = sorted(str(q.relative_to(CONFIG_DIR).with_suffix("")) for q in CONFIG_DIR.rglob("*.yaml"))


def brpg(*args, cwd=None, timeout=240):
    "Run `python -m brpg.cli ARGS` in a subprocess; return the CompletedProcess."
    return subprocess.run([sys.executable, "-m", "brpg.cli", *map(str, args)], cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brpg: error: "), r.stderr[-3000:]
    return lines[0]


def main_error(capsys, *argv):
    "Run `brpg_cli.main(argv)` in-process; return its one stderr line (exit code 2)."
    assert brpg_cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brpg: error: "), err
    return err[0]


# --- 8: the configs live in the package --------------------------------------------------------------------------

def test_config_dir_is_inside_the_package():
    import brpg
    assert CONFIG_DIR == Path(brpg.__file__).resolve().parent / "configs"
    assert not (ROOT / "configs").exists(), "configs/ moved to brpg/configs/ (the package data)"
    assert {"demo", "brain", "voc/classic_366", "cityscapes/372", "coco/1_32"} <= set(SHIPPED), SHIPPED


def test_shipped_configs_by_name_from_another_directory(tmp_path):
    "A name resolves against the package, whatever the working directory."
    for name in ("demo", "voc/classic_366", "cityscapes/744", "coco/1_64.yaml"):
        r = brpg("config", "--config", name, cwd=tmp_path)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert "data:" in r.stdout
    line = one_line_error(brpg("config", "--config", "nope", cwd=tmp_path))
    assert "shipped configs: " in line and "voc/classic_366" in line and "none" not in line


@pytest.mark.slow
def test_wheel_ships_configs(tmp_path):
    "A non-editable build (`pip wheel`, as `pip install .` makes) holds every shipped YAML under brpg/configs/."
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "settings.ini", "README.md", "pyproject.toml"): shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "brpg", src / "brpg", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("brpg-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    want = {f"brpg/configs/{n}.yaml" for n in SHIPPED}
    assert len(want) >= 20 and want <= names, sorted(want - names)


# --- 9: Cityscapes evaluates whole images with the sliding window; Boundary IoU bands per dataset ------------------

@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("cityscapes/")])
def test_cityscapes_configs_slide_over_full_images(name):
    c = load_config(name)
    assert c.data.val_crop_size == 0                      # no centre crop: all 1024x2048 pixels are scored
    assert (c.eval.mode, c.eval.crop_size, c.eval.stride) == ("sliding", 769, 513)   # stride = ceil(2/3 * 769)
    assert c.eval.boundary_dilation == 0.005


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("coco/")])
def test_coco_boundary_band(name):
    assert load_config(name).eval.boundary_dilation == 0.02


def test_cityscapes_eval_keys_printed_by_cli():
    r = brpg("config", "--config", "cityscapes/372")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = r.stdout.split("\neval:\n", 1)[1]
    for line in ("mode: sliding", "crop_size: 769", "stride: 513", "boundary_dilation: 0.005"): assert f"  {line}\n" in ev, ev
    assert "  val_crop_size: 0\n" in r.stdout


# --- 11: a stride above the crop leaves holes: refused --------------------------------------------------------------

def test_stride_larger_than_crop_refused_by_cli():
    line = one_line_error(brpg("config", "--set", "eval.mode=sliding", "eval.crop_size=513", "eval.stride=600"))
    assert "eval.stride" in line and "eval.crop_size" in line and "600" in line and "513" in line


def test_stride_larger_than_crop_refused_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  mode: sliding\n  crop_size: 321\n  stride: 400\n")
    line = one_line_error(brpg("train", "--config", p))
    assert str(p) in line and "eval.stride" in line and "eval.crop_size" in line


def test_stride_equal_to_crop_accepted(capsys):
    assert brpg_cli.main(["config", "--set", "eval.crop_size=513", "eval.stride=513"]) == 0
    assert "stride: 513" in capsys.readouterr().out


# --- 14: empty or non-positive scales -----------------------------------------------------------------------------

@pytest.mark.parametrize("value,shown", [("[]", "[]"), ("[1.0, 0]", "0"), ("[-0.5]", "-0.5"), ("[1, big]", "'big'")])
def test_bad_scales_refused(capsys, value, shown):
    line = main_error(capsys, "config", "--set", f"eval.scales={value}")
    assert "eval.scales" in line and shown in line


def test_good_scales_accepted():
    assert load_config("demo", ["eval.scales=[0.75, 1, 1.25]"]).eval.scales == [0.75, 1.0, 1.25]


# --- 13: scientific notation; override prefix ------------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [("1e-3", 1e-3), ("1e9", 1e9), ("1E9", 1e9), ("-2.5e+4", -2.5e4), ("5E-4", 5e-4)])
def test_set_scientific_notation(raw, want):
    r = brpg("config", "--config", "demo", "--set", f"trainer.weight_decay={raw}" if want > 0 else f"trainer.lr={raw}")
    if want > 0:
        assert r.returncode == 0, r.stderr[-2000:]
        import yaml
        assert yaml.safe_load(r.stdout)["trainer"]["weight_decay"] == pytest.approx(want)
    else:   # a negative lr parses as a float and fails the range check, not the type check
        line = one_line_error(r)
        assert "trainer.lr" in line and "outside" in line and "expected float" not in line


def test_yaml_file_scientific_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("_base_: " + str(CONFIG_DIR / "demo.yaml") + "\ntrainer:\n  lr: 1e-3\n  weight_decay: 5E-4\n"
                 "method:\n  kmeans_tol: 1e-5\n")
    c = load_config(p)
    assert (c.trainer.lr, c.trainer.weight_decay, c.method.kmeans_tol) == (1e-3, 5e-4, 1e-5)
    r = brpg("train", "--config", p, "--set", "trainer.lr=abc", "--set", f"trainer.out_dir={tmp_path / 'run'}")
    line = one_line_error(r)
    assert "expected float, got str 'abc'" in line


def test_strings_that_only_look_numeric_stay_strings():
    c = load_config("demo", ["trainer.out_dir=1e", "data.cache_dir=e5", "data.root=1.2.3"])
    assert (c.trainer.out_dir, c.data.cache_dir, c.data.root) == ("1e", "e5", "1.2.3")


def test_cli_error_says_set_subprocess_and_in_process(capsys):
    line = one_line_error(brpg("config", "--set", "trainer.lr=fast"))
    assert "--set: config key 'trainer.lr'" in line and "override" not in line
    line = main_error(capsys, "config", "--set", "trainer.lr=fast")
    assert "--set: config key 'trainer.lr'" in line
    line = main_error(capsys, "config", "--set", "trainer.lrr=1")
    assert "--set 'trainer.lrr=1'" in line and "trainer.lr" in line


def test_python_error_says_override():
    with pytest.raises(ConfigError) as e: apply_overrides(Config(), ["trainer.lr=fast"])
    assert str(e.value).startswith("override: config key 'trainer.lr'") and "--set" not in str(e.value)
    with pytest.raises(ConfigError) as e: load_config("demo", ["trainer.lr=fast"])
    assert str(e.value).startswith("override: ") and "--set" not in str(e.value)
    with pytest.raises(ConfigError) as e: load_config(None, ["trainer.lrr=1"])
    assert str(e.value).startswith("override 'trainer.lrr=1'")
    with pytest.raises(ConfigError) as e: apply_overrides(Config(), ["trainer.lr=fast"], source="sweep.json")
    assert str(e.value).startswith("sweep.json: ")


OFFICIAL = {"data.label_pad_value": 0, "model.backbone": "resnet101_deep", "model.multi_grid": [2, 2, 4],
            "method.sync_prototypes": False, "method.proto_loss_weight": 1.0,
            "method.proto_loss_divide_by_world_size": True, "method.kmeans_algorithm": "minibatch",
            "method.kmeans_batch_size": 100, "method.kmeans_restarts": 3, "method.kmeans_seed": 0,
            "method.fault_weight": 1.0, "method.teacher_copy_bn": False, "method.recluster_every": 0,
            "method.min_queue_samples": 0, "trainer.amp": "fp16"}


def _flat(d, pre=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict): out.update(_flat(v, f"{pre}{k}."))
        else: out[f"{pre}{k}"] = v
    return out


def test_official_preset_switches_every_deviation_back():
    import yaml
    from brpg.config import CONFIG_DIR, load_config
    cfg, voc = _flat(load_config("voc/official_366").to_dict()), _flat(load_config("voc/classic_366").to_dict())
    for key, want in OFFICIAL.items():
        assert cfg[key] == want, key
    preset = _flat(yaml.safe_load((Path(CONFIG_DIR) / "official.yaml").read_text()))
    assert set(preset) == set(OFFICIAL)                       # the test names every key the preset switches
    changed = {k for k in cfg if cfg[k] != voc[k]}
    assert changed <= set(OFFICIAL) | {"trainer.out_dir"}, changed - set(OFFICIAL)
    assert cfg["data.split_dir"] == voc["data.split_dir"]     # the dataset part stays the VOC config's


@pytest.mark.slow
def test_official_clustering_trains_into_the_prototype_phase(tmp_path):
    from brpg.testing import tiny_demo_config
    from brpg.trainer import Trainer
    tr = Trainer(tiny_demo_config("brpg", ["method.kmeans_algorithm=minibatch", "trainer.max_iters=5"]), out_dir=tmp_path)
    tr.fit(); tr.close()
    assert tr.method.bank_ready and int(tr.method.bank.valid.sum()) > 0
    assert [h["phase"] for h in tr.history if h["type"] == "train"][-1] == "prototypes"
