"The brain MRI data set: split rules on any volume shape, the builder on a small synthetic subset, the real build."
import json
import numpy as np
import pytest
from PIL import Image
from brpg.brain import (AXES, BRAIN_CLASSES, check_plan, make_brain_dataset, plan_slices, tissue_slice,
                        write_brain_dataset)
from brpg.config import load_config
from brpg.data import build_datasets


@pytest.mark.parametrize("shape", [(80, 90, 100), (149, 185, 157), (120, 120, 120)])
@pytest.mark.parametrize("n_labeled", [1, 3, 6, 10])
def test_plan_rules(shape, n_labeled):
    plan = plan_slices(shape, n_labeled)
    check_plan(plan)
    assert len(plan["labeled"]) == n_labeled and {o for o, _ in plan["labeled"]} == {"axial"}
    for split in ("unlabeled", "val", "test"):
        assert {o for o, _ in plan[split]} == set(AXES), split
    assert plan == plan_slices(shape, n_labeled)  # deterministic


def test_check_plan_catches_leaks():
    plan = plan_slices((149, 185, 157))
    o, i = plan["test"][0]
    near = {**plan, "unlabeled": plan["unlabeled"] + [(o, i + 1)]}
    with pytest.raises(AssertionError, match="within 3 slices"): check_plan(near)
    with pytest.raises(AssertionError, match="share"): check_plan({**plan, "val": plan["val"] + plan["labeled"][:1]})
    with pytest.raises(AssertionError, match="not axial"): check_plan({**plan, "labeled": plan["labeled"] + [("coronal", 10_000)]})


def test_plan_errors_name_the_key():
    with pytest.raises(ValueError, match="data.brain_num_labeled"): plan_slices((149, 185, 157), 0)
    with pytest.raises(ValueError, match="data.brain_num_labeled=500"): plan_slices((149, 185, 157), 500)


def _volume(shape=(40, 44, 48)):
    "A synthetic 'brain': a ball of white matter in a shell of grey matter, with a CSF-like core."
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    brain = (r < .9).astype(np.float32); wm = ((r < .6) & (r > .15)).astype(np.float32); gm = brain - wm - (r <= .15)
    t1 = brain * (0.4 + 0.5 * wm + 0.2 * gm)
    return t1, np.stack([brain, np.clip(gm, 0, 1), wm])


def test_builder_on_a_small_subset(tmp_path):
    t1, prob = _volume()
    plan = {k: v[:3] for k, v in plan_slices((80, 90, 100), 2).items()}
    plan = {k: [(o, min(i, t1.shape[AXES[o]] - 1)) for o, i in v] for k, v in plan.items()}
    counts = write_brain_dataset(tmp_path, t1, prob, plan, f=1, size=64)
    assert counts == {k: len(v) for k, v in plan.items()}
    assert (tmp_path / "classes.txt").read_text().split("\n")[:4] == BRAIN_CLASSES
    for split, items in plan.items():
        ids = (tmp_path / "splits" / f"{split}.txt").read_text().split()
        assert ids == [f"{o}_{i:03d}" for o, i in items]
        for sid in ids:
            im, m = Image.open(tmp_path / "images" / f"{sid}.png"), np.array(Image.open(tmp_path / "masks" / f"{sid}.png"))
            assert im.mode == "L" and im.size == (64, 64) and m.max() <= 3
    _, lab = tissue_slice(t1, prob, "axial", 24, f=1, size=64)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="data.brain_image_size=32"): tissue_slice(t1, prob, "axial", 24, f=1, size=32)


@pytest.mark.slow
def test_real_build_is_cached_and_loads(tmp_path):
    pytest.importorskip("nibabel")
    msgs = []
    root = make_brain_dataset(tmp_path, num_labeled=4, size=96, pool=2, log=msgs.append)
    assert any("building the brain MRI data set" in m for m in msgs)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["labeled"] == 4 and "McConnell" in meta["licence"] and len(meta["source_sha256"]) == 3
    msgs.clear(); assert make_brain_dataset(tmp_path, num_labeled=4, size=96, pool=2, log=msgs.append) == root and not msgs
    cfg = load_config("brain", [f"data.cache_dir={tmp_path}", "data.brain_num_labeled=4"])
    ds = build_datasets(cfg)
    assert (len(ds["labeled"]), len(ds["val"])) == (4, meta["counts"]["val"]) and ds["class_names"] == BRAIN_CLASSES
    assert ds["labeled"][0]["image"].shape[0] == 3  # grey slices are read as 3 channels
