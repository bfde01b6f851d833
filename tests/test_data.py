"""brpg.data end to end: the four on-disk layouts built as tiny fake trees, every bad-input error, the validation
report, seeded determinism (also across worker counts), the demo generator and its cache, CutMix, split writing."""
import os, time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brpg.config import Config, DataConfig, EvalConfig, TrainerConfig
from brpg.data import (COCO_CLASSES, CITYSCAPES_CLASSES, DEMO_CLASSES, VOC_CLASSES, DatasetError, SeededSampler,
                       apply_cutmix, build_datasets, build_loaders, colorize, cutmix_masks, dataset_catalog,
                       denormalize, load_mask, read_split, validate_dataset, voc_palette)
from brpg.demo_data import make_demo_dataset
from brpg.splits import write_splits
from brpg.cli import main as cli_main
from torch.utils.data import DistributedSampler


def splits_main(args):
    "`brpg splits ARGS` in-process; returns the exit code."
    return cli_main(["splits", *args])


# ----------------------------------------------------------------------------------------------- fake trees
def rgb(path, h, w, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return a

def pmask(path, m):
    "Palette PNG (VOC style): the file stores indices, the palette maps them to colours."
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(m, np.uint8), "P"); im.putpalette(voc_palette().flatten().tolist()); im.save(path)

def lmask(path, m):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(m, np.uint8), "L").save(path)

def rand_mask(h, w, C, seed=0, ignore=True):
    m = np.random.default_rng(seed + 100).integers(0, C, (h, w)).astype(np.uint8)
    if ignore: m[0, :] = 255
    return m

def write(path, lines, trailing=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if trailing else ""))

def dcfg(**kw):
    base = dict(crop_size=16, val_crop_size=0, num_workers=0, batch_size_labeled=2, batch_size_unlabeled=2)
    base.update(kw)
    return Config(data=DataConfig(**base), trainer=TrainerConfig(seed=0))

def folder_tree(root, n_lab=3, n_unl=5, n_val=2, h=12, w=14, C=4, unl_masks=False):
    ids = [f"im{i}" for i in range(n_lab + n_unl + n_val)]
    masks = {}
    for i, sid in enumerate(ids):
        rgb(root / "images" / f"{sid}{'.jpg' if i % 2 else '.png'}", h, w, seed=i)
        is_unl = n_lab <= i < n_lab + n_unl
        if not is_unl or unl_masks:
            masks[sid] = rand_mask(h, w, C, seed=i); lmask(root / "masks" / f"{sid}.png", masks[sid])
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(C)) + "\n")
    write(root / "splits/labeled.txt", ids[:n_lab])
    write(root / "splits/unlabeled.txt", ids[n_lab:n_lab + n_unl])
    write(root / "splits/val.txt", ids[n_lab + n_unl:], trailing=False)
    return ids, masks


# ----------------------------------------------------------------------------------------------- layouts
def test_folder_dataset_items(tmp_path):
    ids, masks = folder_tree(tmp_path)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4, crop_size=12, scale_range=[1.0, 1.0], flip_prob=0.0)
    ds = build_datasets(cfg)
    assert ds["class_names"] == ["c0", "c1", "c2", "c3"]
    assert (len(ds["labeled"]), len(ds["unlabeled"]), len(ds["val"])) == (3, 5, 2)
    it = ds["labeled"][(0, 123)]
    assert it["id"] == "im0" and it["image"].dtype == torch.float32 and it["mask"].dtype == torch.long
    assert it["image"].shape == (3, 12, 12) and it["mask"].shape == (12, 12)
    # scale 1, no flip: the crop is a window of the file's mask, ignore value kept as 255
    full = torch.from_numpy(masks["im0"].astype(np.int64))
    assert any(torch.equal(it["mask"], full[:, x:x + 12]) for x in range(3))
    u = ds["unlabeled"][(0, 1)]  # unlabeled images have no mask on disk: none needed
    assert set(u) == {"weak", "strong", "valid", "id"} and u["valid"].dtype == torch.long
    v = ds["val"][1]
    assert v["id"] == "im9" and torch.equal(v["mask"], torch.from_numpy(masks["im9"].astype(np.int64)))
    img = np.asarray(Image.open(tmp_path / "images/im9.jpg").convert("RGB"))
    np.testing.assert_allclose(denormalize(v["image"]).permute(1, 2, 0).numpy() * 255, img, atol=1e-3)


def test_voc_layout(tmp_path):
    ids = [f"2007_00{i:04d}" for i in range(8)]
    for i, sid in enumerate(ids):
        rgb(tmp_path / "JPEGImages" / f"{sid}.jpg", 10, 13, seed=i, fmt="JPEG")
        m = rand_mask(10, 13, 21, seed=i); m[1, 1] = 20
        pmask(tmp_path / "SegmentationClassAug" / f"{sid}.png", m)
    write(tmp_path / "ImageSets/Segmentation/val.txt", ids[6:], trailing=False)
    split = tmp_path / "lists" / "366"
    write(split / "labeled.txt", ids[:2], trailing=False)  # official files have no trailing newline
    write(split / "unlabeled.txt", ids[2:6], trailing=False)
    cfg = dcfg(dataset="voc", root=str(tmp_path), split_dir=str(split), num_classes=21, validate=True)
    ds = build_datasets(cfg)
    assert ds["class_names"] == VOC_CLASSES and (len(ds["labeled"]), len(ds["unlabeled"]), len(ds["val"])) == (2, 4, 2)
    v = ds["val"][0]
    assert v["id"] == ids[6] and v["mask"][1, 1] == 20 and v["mask"].max() == 255  # indices, not palette colours
    assert ds["labeled"][(1, 0)]["mask"].shape == (16, 16)
    # the official layout keeps val.txt one level above the per-split folders: it wins over ImageSets
    write(tmp_path / "lists" / "val.txt", ids[7:], trailing=False)
    assert [s.id for s in dataset_catalog(cfg).val] == ids[7:]
    # SegmentationClass is the fallback when there is no Aug folder
    (tmp_path / "SegmentationClassAug").rename(tmp_path / "SegmentationClass")
    assert dataset_catalog(cfg).labeled[0].mask == tmp_path / "SegmentationClass" / f"{ids[0]}.png"
    # write_splits: pool = masked ids minus val ids, official line format (bare ids)
    (tmp_path / "lists" / "val.txt").unlink()
    pl, pu = write_splits(cfg, 3, seed=0, out_dir=tmp_path / "new")
    lab = [f[0] for _, f in read_split(pl)]; unl = [f[0] for _, f in read_split(pu)]
    assert len(lab) == 3 and sorted(lab + unl) == ids[:6]  # ImageSets val ids excluded from the pool


def test_cityscapes_layout(tmp_path):
    def make(split, city, i, h=8, w=16):
        name = f"{city}_000000_{i:06d}"
        rgb(tmp_path / f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png", h, w, seed=i)
        lmask(tmp_path / f"gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png", rand_mask(h, w, 19, seed=i))
        return f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png"
    train = [make("train", "aachen", i) for i in range(4)] + [make("train", "bremen", i) for i in range(4, 6)]
    val = [make("val", "frankfurt", i) for i in range(10, 13)]
    write(tmp_path / "splits/labeled.txt", train[:2]); write(tmp_path / "splits/unlabeled.txt", train[2:])
    cfg = dcfg(dataset="cityscapes", root=str(tmp_path), num_classes=19, val_crop_size=8)
    ds = build_datasets(cfg)
    assert ds["class_names"] == CITYSCAPES_CLASSES
    assert [s.id for s in ds["val"].samples] == [Path(v).name.removesuffix("_leftImg8bit.png") for v in val]  # enumerated
    assert ds["labeled"][(0, 0)]["id"] == "aachen_000000_000000"
    assert ds["val"][0]["mask"].shape == (8, 8) and ds["val"][0]["image"].shape == (3, 8, 8)  # centre crop
    assert validate_dataset(cfg) == []
    pl, pu = write_splits(cfg, 2, seed=1, out_dir=tmp_path / "s2")
    assert all(l.startswith("leftImg8bit/train/") for _, (l,) in read_split(pl) + read_split(pu))
    assert len(read_split(pl)) + len(read_split(pu)) == 6


def test_coco_layout(tmp_path):
    for i in range(6):
        rgb(tmp_path / f"train2017/{i:012d}.jpg", 9, 11, seed=i, fmt="JPEG")
        m = rand_mask(9, 11, 81, seed=i); m[2, 2] = 80
        lmask(tmp_path / f"masks/{i:012d}.png", m)
    for i in range(100, 102):
        rgb(tmp_path / f"val2017/{i:012d}.jpg", 9, 11, seed=i, fmt="JPEG"); lmask(tmp_path / f"masks/{i:012d}.png", rand_mask(9, 11, 81, i))
    write(tmp_path / "splits/labeled.txt", [f"train2017/{i:012d}.jpg masks/{i:012d}.png" for i in range(2)], trailing=False)
    write(tmp_path / "splits/unlabeled.txt", [f"train2017/{i:012d}.jpg" for i in range(2, 6)])
    cfg = dcfg(dataset="coco", root=str(tmp_path), num_classes=81, validate=True)
    ds = build_datasets(cfg)
    assert ds["class_names"] == COCO_CLASSES and len(ds["val"]) == 2
    assert ds["labeled"].read(0)[1][2, 2] == 80  # class 80 is valid with 81 classes
    assert ds["labeled"].samples[0].mask == tmp_path / "masks/000000000000.png"
    assert ds["unlabeled"].samples[0].mask is None
    assert int(ds["val"][1]["mask"].max()) == 255
    pl, pu = write_splits(cfg, 2, seed=0, out_dir=tmp_path / "s2")
    line = read_split(pl)[0][1]
    assert len(line) == 2 and line[0].startswith("train2017/") and line[1].startswith("masks/")


def test_num_classes_mismatch_names_key(tmp_path):
    folder_tree(tmp_path, C=4)
    with pytest.raises(DatasetError, match=r"has 4 classes .*classes.txt.* data.num_classes = 5"):
        build_datasets(dcfg(dataset="folder", root=str(tmp_path), num_classes=5))
    with pytest.raises(DatasetError, match="data.root"):
        build_datasets(dcfg(dataset="voc", root=str(tmp_path / "nowhere"), num_classes=21))


# ----------------------------------------------------------------------------------------------- bad input
def _break(root, kind):
    "Damage sample im1 (line 2 of labeled.txt) in one way; return the path that the error must name."
    if kind == "missing image":
        p = root / "images/im1.jpg"; p.unlink(); return "images/im1"
    if kind == "unreadable image":
        p = root / "images/im1.jpg"; p.write_bytes(b"\xff\xd8 truncated"); return str(p)
    if kind == "mask size":
        p = root / "masks/im1.png"; lmask(p, np.zeros((5, 5), np.uint8)); return str(p)
    if kind == "mask values":
        p = root / "masks/im1.png"; m = np.zeros((12, 14), np.uint8); m[3, 3] = 7; m[4, 4] = 200; lmask(p, m); return str(p)
    if kind == "rgb mask":
        p = root / "masks/im1.png"; Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(p); return str(p)
    if kind == "missing mask":
        p = root / "masks/im1.png"; p.unlink(); return str(p)
    raise ValueError(kind)

MESSAGES = {"missing image": "not found", "unreadable image": "cannot be read", "mask size": r"is 5x5 \(WxH\) but its image is 14x12",
            "mask values": r"values \[7, 200\] outside \[0, 4\)", "rgb mask": "mode RGB", "missing mask": "not found"}

@pytest.mark.parametrize("kind", list(MESSAGES))
def test_bad_input_names_file_line_path(tmp_path, kind):
    folder_tree(tmp_path)
    path = _break(tmp_path, kind)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    ds = build_datasets(cfg)  # validate off: the error comes when the sample is read
    ds["labeled"][(0, 0)]  # the intact sample still loads
    with pytest.raises(DatasetError, match=MESSAGES[kind]) as e:
        ds["labeled"][(1, 0)]
    msg = str(e.value)
    assert f"{tmp_path / 'splits' / 'labeled.txt'}, line 2" in msg and path in msg
    probs = validate_dataset(cfg)
    assert len(probs) == 1 and "labeled.txt, line 2" in probs[0] and path in probs[0]


def test_empty_and_missing_split_files(tmp_path):
    folder_tree(tmp_path)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    (tmp_path / "splits/unlabeled.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"unlabeled.txt' lists no samples \(empty split\)"):
        build_datasets(cfg)
    (tmp_path / "splits/unlabeled.txt").unlink()
    with pytest.raises(DatasetError, match=r"unlabeled.txt' not found.*brpg splits"):
        build_datasets(cfg)


def test_validate_reports_all_problems_at_once(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "images/im0.png").unlink()                                            # labeled line 1
    lmask(tmp_path / "masks/im2.png", np.full((12, 14), 9, np.uint8))                 # labeled line 3
    (tmp_path / "images/im4.png").write_bytes(b"garbage")                              # unlabeled line 2
    lmask(tmp_path / "masks/im9.png", np.zeros((3, 3), np.uint8))                     # val line 2
    with open(tmp_path / "splits/val.txt", "a") as f: f.write("\nghost")                # val line 3: missing image
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4, validate=True)
    probs = validate_dataset(cfg)
    assert len(probs) == 6, probs  # ghost: image and mask both missing
    for where in ["labeled.txt, line 1", "labeled.txt, line 3", "unlabeled.txt, line 2", "val.txt, line 2", "val.txt, line 3"]:
        assert any(where in p for p in probs), where
    with pytest.raises(DatasetError, match="6 problem") as e:
        build_datasets(cfg)
    assert all(p in str(e.value) for p in probs)
    # structural problems are collected too
    (tmp_path / "splits/labeled.txt").write_text("a b c\n")
    assert any("expected 1 or 2 fields" in p for p in validate_dataset(cfg))


# ----------------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("pad", [255, 0])
def test_label_pad_value(tmp_path, pad):
    _, masks = folder_tree(tmp_path, h=6, w=6, C=4)
    for sid in ("im0", "im1", "im2"): lmask(tmp_path / f"masks/{sid}.png", np.full((6, 6), 1, np.uint8))
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4, crop_size=20, scale_range=[1.0, 1.0], label_pad_value=pad,
               val_crop_size=10)
    ds = build_datasets(cfg)
    m = ds["labeled"][(0, 3)]["mask"]
    assert (m == 1).sum() == 36 and (m == pad).sum() == 400 - 36
    img = ds["labeled"][(0, 3)]["image"]
    assert img[:, m == pad].abs().max() == 0  # normalised image padded with 0 (= mean colour)
    vm = ds["val"][0]["mask"]
    border = torch.ones(10, 10, dtype=torch.bool); border[2:8, 2:8] = False
    assert vm.shape == (10, 10) and vm[border].eq(pad).all()  # centre crop pads the label with the same value
    assert torch.equal(vm[2:8, 2:8], torch.from_numpy(masks["im8"].astype(np.int64)))


def test_loaders_deterministic_and_worker_independent(tmp_path):
    folder_tree(tmp_path, n_lab=3, n_unl=8, n_val=3)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    ds = build_datasets(cfg)
    def batches(cfg_, seed, epochs=2):
        L = build_loaders(cfg_, ds, seed=seed)
        return [(b["id"], b["weak"], b["strong"], b["valid"]) for _ in range(epochs) for b in L["unlabeled"]] + \
               [(b["id"], b["image"], b["mask"]) for b in L["labeled"]]
    a, b = batches(cfg, 5), batches(cfg, 5)
    cfg2 = replace(cfg, data=replace(cfg.data, num_workers=2))
    c = batches(cfg2, 5)  # two seeded worker processes give the very same batches
    d = batches(cfg, 6)
    eq = lambda x, y: all(xi == yi if isinstance(xi, list) else torch.equal(xi, yi) for xi, yi in zip(x, y))
    assert len(a) == len(c) == 2 * 4 + 4
    assert all(eq(x, y) for x, y in zip(a, b)) and all(eq(x, y) for x, y in zip(a, c))
    assert not all(eq(x, y) for x, y in zip(a, d))
    assert not eq(a[0], a[4])  # the second epoch is reshuffled and re-augmented


def test_loader_lengths_resampling_and_ddp(tmp_path):
    folder_tree(tmp_path, n_lab=3, n_unl=9, n_val=3)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    cfg = replace(cfg, eval=EvalConfig(batch_size=2))
    ds = build_datasets(cfg)
    L = build_loaders(cfg, ds, seed=0)
    assert len(L["unlabeled"]) == 9 // 2 and len(L["labeled"]) == 9 // 2 and len(L["val"]) == 2
    ids = [i for b in L["labeled"] for i in b["id"]]
    assert set(ids) == {"im0", "im1", "im2"} and len(ids) == 8  # 3 repeated 3x, 9 drawn, drop_last -> 8
    for r in (0, 1):
        Lr = build_loaders(cfg, ds, rank=r, world_size=2, seed=0)
        assert isinstance(Lr["unlabeled"].sampler, SeededSampler) and isinstance(Lr["unlabeled"].sampler.inner, DistributedSampler)
        assert len(Lr["unlabeled"]) == 5 // 2  # ceil(9/2)=5 per rank, batches of 2
    vids = [[i for b in build_loaders(cfg, ds, rank=r, world_size=2, seed=0)["val"] for i in b["id"]] for r in (0, 1)]
    assert sorted(vids[0] + vids[1]) == ["im12", "im13", "im14"]  # disjoint, unpadded shards


# ----------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_deterministic_cached_and_fast(tmp_path):
    t0 = time.time(); p1 = make_demo_dataset(tmp_path / "a", num_images=400, size=96, seed=0); gen_s = time.time() - t0
    assert gen_s < 15, gen_s
    p2 = make_demo_dataset(tmp_path / "b", num_images=400, size=96, seed=0)
    for sub in ("images/00000.png", "masks/00399.png", "splits/labeled.txt", "classes.txt"):
        assert (p1 / sub).read_bytes() == (p2 / sub).read_bytes()
    assert (p1 / "classes.txt").read_text().splitlines() == DEMO_CLASSES
    mt = (p1 / "images/00007.png").stat().st_mtime_ns
    t0 = time.time(); assert make_demo_dataset(tmp_path / "a", num_images=400, size=96, seed=0) == p1
    assert time.time() - t0 < 0.1 and (p1 / "images/00007.png").stat().st_mtime_ns == mt  # cached, not rewritten
    assert [q.name for q in (tmp_path / "a").iterdir()] == [p1.name]  # no temporary folders left behind
    p3 = make_demo_dataset(tmp_path / "a", num_images=400, size=96, seed=1)
    assert p3 != p1 and (p3 / "images/00000.png").read_bytes() != (p1 / "images/00000.png").read_bytes()
    # splits and labels
    assert [len(read_split(p1 / f"splits/{s}.txt")) for s in ("val", "labeled", "unlabeled")] == [80, 20, 300]
    counts = np.zeros(256, np.int64)
    for i in range(0, 400, 4): counts += np.bincount(load_mask(p1 / f"masks/{i:05d}.png").ravel(), minlength=256)
    assert counts[11:].sum() == 0 and (counts[1:11] > 0).all() and 0.02 < counts[1:11].sum() / counts.sum() < 0.3


def test_demo_through_config(tmp_path):
    cfg = Config(data=DataConfig(dataset="demo", cache_dir=str(tmp_path), demo_num_images=30, demo_image_size=48, demo_num_val=5,
                                 demo_num_labeled=4, crop_size=33, val_crop_size=0, num_workers=0, validate=True))
    ds = build_datasets(cfg)
    assert ds["class_names"] == DEMO_CLASSES and (len(ds["labeled"]), len(ds["unlabeled"]), len(ds["val"])) == (4, 21, 5)
    assert ds["val"][0]["image"].shape == (3, 48, 48)
    assert splits_main(["--set", f"data.cache_dir={tmp_path}", "--set", "data.demo_num_images=30", "--set", "data.demo_image_size=48",
                        "--set", "data.demo_num_val=5", "--set", "data.demo_num_labeled=4", "--n-labeled", "8",
                        "--out", str(tmp_path / "s")]) == 0
    assert len(read_split(tmp_path / "s/labeled.txt")) == 8 and len(read_split(tmp_path / "s/unlabeled.txt")) == 17
    ds8 = build_datasets(replace(cfg, data=replace(cfg.data, split_dir=str(tmp_path / "s"))))  # val.txt: the generated one
    assert (len(ds8["labeled"]), len(ds8["unlabeled"]), len(ds8["val"])) == (8, 17, 5)


def test_splits_main_errors(tmp_path, capsys):
    folder_tree(tmp_path)
    assert splits_main(["--dataset", "folder", "--root", str(tmp_path), "--n-labeled", "99", "--out", str(tmp_path / "o")]) == 2
    assert "n_labeled = 99" in capsys.readouterr().err
    # only images with masks can be labeled: the 5 unlabeled images have none
    assert splits_main(["--dataset", "folder", "--root", str(tmp_path), "--n-labeled", "3", "--seed", "4", "--out", str(tmp_path / "o")]) == 0
    assert sorted(f[0] for _, f in read_split(tmp_path / "o/labeled.txt")) == ["im0", "im1", "im2"]
    a = (tmp_path / "o/unlabeled.txt").read_text()
    splits_main(["--dataset", "folder", "--root", str(tmp_path), "--n-labeled", "3", "--seed", "4", "--out", str(tmp_path / "o")])
    assert (tmp_path / "o/unlabeled.txt").read_text() == a


# ----------------------------------------------------------------------------------------------- CutMix
def test_cutmix_area_and_semantics():
    g = torch.Generator().manual_seed(0)
    B, H, W = 16, 65, 81
    m = cutmix_masks(B, H, W, generator=g)
    assert m.dtype == torch.bool and m.shape == (B, H, W)
    area = m.flatten(1).sum(1)
    assert ((area - H * W / 2).abs() <= W / 2 + 1).all()
    for i in range(B):  # each mask is one axis-aligned box with W/2 < w < W
        ys, xs = m[i].nonzero(as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert h * w == int(area[i]) and W // 2 + 1 <= w <= W - 1
    img = torch.randn(B, 3, H, W); lab = torch.randint(0, 5, (B, H, W)); conf = torch.rand(B, H, W)
    mi, ml, mc = apply_cutmix(img, m), apply_cutmix(lab, m), apply_cutmix(conf, m)
    j = (torch.arange(B) + 1) % B
    for i in range(B):
        assert torch.equal(mi[i][:, m[i]], img[j[i]][:, m[i]]) and torch.equal(mi[i][:, ~m[i]], img[i][:, ~m[i]])
        assert torch.equal(ml[i][m[i]], lab[j[i]][m[i]]) and torch.equal(mc[i][~m[i]], conf[i][~m[i]])
    assert torch.equal(cutmix_masks(B, H, W, torch.Generator().manual_seed(1)), cutmix_masks(B, H, W, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="does not match"):
        apply_cutmix(torch.zeros(B, 3, H, W + 1), m)


def test_colorize_any_class_count():
    m = torch.arange(300).view(15, 20)
    c = colorize(m)
    assert c.shape == (15, 20, 3) and len({tuple(v) for v in c.view(-1, 3).tolist()}) == 300


def test_loader_parts_pickle_for_spawn(tmp_path):
    "Workers started with 'spawn' (macOS, Windows) pickle the dataset, sampler output and collate function."
    import pickle
    folder_tree(tmp_path)
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    L = build_loaders(cfg, build_datasets(cfg), seed=0)
    for name in ("labeled", "unlabeled", "val"):
        ds2 = pickle.loads(pickle.dumps(L[name].dataset))
        key = next(iter(L[name].sampler))
        a, b = L[name].dataset[key], ds2[key]
        assert a["id"] == b["id"] and all(torch.equal(a[k], b[k]) for k in a if k != "id")
        pickle.dumps(L[name].collate_fn); pickle.dumps(L[name].worker_init_fn)


# ----------------------------------------------------------------------------------------------- loader stumbles on real data
def voc_tree(root, n=8, train=None, val=None):
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, sid in enumerate(ids):
        rgb(root / "JPEGImages" / f"{sid}.jpg", 10, 13, seed=i, fmt="JPEG")
        pmask(root / "SegmentationClassAug" / f"{sid}.png", rand_mask(10, 13, 21, seed=i))
    if train is not None: write(root / "ImageSets/Segmentation/train.txt", [ids[i] for i in train], trailing=False)
    if val is not None: write(root / "ImageSets/Segmentation/val.txt", [ids[i] for i in val], trailing=False)
    return ids


def test_voc_pool_is_imagesets_train(tmp_path, capsys):
    "`brpg splits` on VOC draws from ImageSets/Segmentation/train.txt (minus val ids, only ids with masks)."
    ids = voc_tree(tmp_path, train=[0, 1, 2, 3, 6], val=[6, 7])
    (tmp_path / "SegmentationClassAug" / f"{ids[3]}.png").unlink()          # listed in train.txt but no mask
    assert splits_main(["--dataset", "voc", "--root", str(tmp_path), "--set", "data.num_classes=21", "--n-labeled", "2"]) == 0
    lab = [f[0] for _, f in read_split(tmp_path / "splits/labeled.txt")]
    unl = [f[0] for _, f in read_split(tmp_path / "splits/unlabeled.txt")]
    assert sorted(lab + unl) == ids[:3]          # not ids[4], ids[5] (masks on disk, not in train.txt), not 3 / 6


def test_voc_missing_labeled_split_says_how_to_create_it(tmp_path):
    voc_tree(tmp_path, train=[0, 1, 2], val=[6, 7])
    with pytest.raises(DatasetError) as e:
        build_datasets(dcfg(dataset="voc", root=str(tmp_path), num_classes=21))
    msg = str(e.value).splitlines()[1]
    assert "labeled.txt' not found" in msg and "brpg splits --config" in msg and "--n-labeled N" in msg, msg
    assert str(tmp_path / "ImageSets/Segmentation/train.txt") in msg, msg


def test_voc_val_falls_back_to_imagesets_val(tmp_path):
    ids = voc_tree(tmp_path, val=[5, 7])
    write(tmp_path / "splits/labeled.txt", ids[:2]); write(tmp_path / "splits/unlabeled.txt", ids[2:5])
    cat = dataset_catalog(dcfg(dataset="voc", root=str(tmp_path), num_classes=21))
    assert cat.problems == [] and [s.id for s in cat.val] == [ids[5], ids[7]]
    assert cat.val[0].source.startswith(str(tmp_path / "ImageSets/Segmentation/val.txt"))


def test_supervised_needs_no_unlabeled_split(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "splits/unlabeled.txt").unlink()
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    sup = replace(cfg, method=replace(cfg.method, name="supervised"))
    ds = build_datasets(sup)
    assert (len(ds["labeled"]), len(ds["unlabeled"]), len(ds["val"])) == (3, 0, 2)
    loaders = build_loaders(sup, ds)
    assert loaders["unlabeled"] is None and len(loaders["labeled"]) == 1          # 3 labeled, batch 2, drop_last
    for method in ("mean_teacher", "brpg"):
        with pytest.raises(DatasetError, match=f"method.name={method} needs an unlabeled split: '.*unlabeled.txt' not found"):
            build_datasets(replace(cfg, method=replace(cfg.method, name=method)))


def test_num_classes_zero_is_auto(tmp_path):
    from brpg.data import resolve_num_classes
    folder_tree(tmp_path / "f", C=4)
    cfg = dcfg(dataset="folder", root=str(tmp_path / "f"), num_classes=0)
    assert cfg.data.num_classes == 0 and resolve_num_classes(cfg).data.num_classes == 4
    ds = build_datasets(cfg)
    assert ds["class_names"] == ["c0", "c1", "c2", "c3"] and ds["labeled"].dc.num_classes == 4
    assert resolve_num_classes(dcfg(dataset="voc", root=str(tmp_path), num_classes=0)).data.num_classes == 21
    assert resolve_num_classes(dcfg(dataset="cityscapes", root=str(tmp_path), num_classes=0)).data.num_classes == 19
    (tmp_path / "f/classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"data.num_classes = 0 \(auto\) needs the class list '.*classes.txt'"):
        build_datasets(cfg)
    assert DataConfig().num_classes == 11                                          # the default is unchanged


def test_data_report_names_grayscale_images(tmp_path):
    from brpg.data import data_report
    ids, _ = folder_tree(tmp_path)
    ds = build_datasets(dcfg(dataset="folder", root=str(tmp_path), num_classes=4))
    assert data_report(dcfg(), ds) == "data: demo, 3 labeled, 5 unlabeled, 2 val images, 4 classes"
    for p in (tmp_path / "images").iterdir():                                      # the same images, single-channel
        Image.open(p).convert("L").save(tmp_path / "images" / f"{p.stem}.png"); p.suffix == ".jpg" and p.unlink()
    cfg = dcfg(dataset="folder", root=str(tmp_path), num_classes=4)
    ds = build_datasets(cfg)
    rep = data_report(cfg, ds)
    assert rep.startswith("data: folder, 3 labeled, 5 unlabeled, 2 val images, 4 classes; grayscale images (labeled, "
                          "unlabeled, val) are replicated to 3 channels and normalised with data.mean/std"), rep
    assert ds["labeled"][(0, 1)]["image"].shape[0] == 3
