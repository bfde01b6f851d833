"""Dataset and checkpoint errors as the user meets them: a corrupt file read in a DataLoader worker, a too-small
unlabeled split, evaluation on a dataset with the val split alone, the whole validation report, and a checkpoint
file of random bytes."""
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from brpg.checkpoint import CheckpointError, read_checkpoint
from brpg.cli import main as cli_main
from brpg.config import Config, DataConfig, TrainerConfig
from brpg.data import (DatasetError, build_datasets, build_loaders, dataset_catalog, format_problems, loader_pass,
                       validate_dataset)


def folder(root, n_lab=3, n_unl=4, n_val=2, h=12, w=14, C=4):
    "A folder-format dataset: images/, masks/, classes.txt and the three split files; returns the ids."
    (root / "images").mkdir(parents=True); (root / "masks").mkdir(); (root / "splits").mkdir()
    ids = [f"im{i}" for i in range(n_lab + n_unl + n_val)]
    rng = np.random.default_rng(0)
    for sid in ids:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{sid}.png")
        Image.fromarray(rng.integers(0, C, (h, w), dtype=np.uint8), "L").save(root / "masks" / f"{sid}.png")
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(C)))
    (root / "splits/labeled.txt").write_text("\n".join(ids[:n_lab]) + "\n")
    (root / "splits/unlabeled.txt").write_text("\n".join(ids[n_lab:n_lab + n_unl]) + "\n")
    (root / "splits/val.txt").write_text("\n".join(ids[n_lab + n_unl:]) + "\n")
    return ids


def cfg_for(root, **kw):
    d = dict(dataset="folder", root=str(root), num_classes=4, crop_size=12, val_crop_size=0, num_workers=0,
             batch_size_labeled=2, batch_size_unlabeled=2)
    d.update(kw)
    return Config(data=DataConfig(**d), trainer=TrainerConfig(seed=0))


def first_error(make_iter):
    "The DatasetError raised while iterating `make_iter()` to the end."
    with pytest.raises(DatasetError) as e:
        for _ in make_iter(): pass
    return str(e.value)


# ------------------------------------------------------------------------------ 15: errors in worker processes
@pytest.mark.parametrize("kind", ["corrupt image", "mask values"])
def test_worker_error_is_the_one_line_message(tmp_path, kind):
    folder(tmp_path)
    if kind == "corrupt image":
        bad = tmp_path / "images/im1.png"; bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        expect = f"image '{bad}' cannot be read"
    else:
        bad = tmp_path / "masks/im1.png"; m = np.zeros((12, 14), np.uint8); m[2, 2] = 9
        Image.fromarray(m, "L").save(bad)
        expect = f"mask '{bad}' has values [9] outside [0, 4)"
    cfg = cfg_for(tmp_path, num_workers=1)
    ds = build_datasets(cfg)
    # what torch itself hands the main process: the worker's traceback as the message
    raw = first_error(lambda: DataLoader(ds["labeled"], batch_size=3, num_workers=1))
    assert "Traceback" in raw and len(raw.splitlines()) > 3
    L = build_loaders(cfg, ds, seed=0)
    msgs = [first_error(lambda: L["labeled"]), first_error(lambda: loader_pass(L["labeled"], 0, 0))]   # the trainer's way
    for e in range(10):                  # resumed mid-epoch (skip=1): a new loader; im1 may sit in the skipped batch
        try:
            for _ in loader_pass(L["labeled"], e, 1): pass
        except DatasetError as x: msgs.append(str(x))
    assert len(msgs) > 2
    for msg in msgs:
        assert len(msg.splitlines()) == 1 and "Traceback" not in msg and "DataLoader worker" not in msg, msg
        assert expect in msg and "labeled.txt, line 2" in msg, msg
    # the same message as without workers
    L0 = build_loaders(replace(cfg, data=replace(cfg.data, num_workers=0)), ds, seed=0)
    assert first_error(lambda: L0["labeled"]) == first_error(lambda: L["labeled"])


def test_worker_error_in_validation_loader(tmp_path):
    folder(tmp_path)
    cfg = cfg_for(tmp_path, num_workers=1)
    ds = build_datasets(cfg)
    bad = ds["val"].samples[1].image; bad.write_bytes(b"not an image")
    msg = first_error(lambda: build_loaders(cfg, ds, seed=0)["val"])
    assert len(msg.splitlines()) == 1 and f"'{bad}' cannot be read" in msg and "val.txt, line 2" in msg, msg


# ------------------------------------------------------------------------------ 17a: a too-small unlabeled split
def test_small_unlabeled_split_is_named(tmp_path):
    folder(tmp_path, n_lab=5, n_unl=1)
    cfg = cfg_for(tmp_path)
    with pytest.raises(DatasetError) as e:
        build_loaders(cfg, build_datasets(cfg), seed=0)
    msg = str(e.value)
    assert msg.startswith("the unlabeled split has 1 image(s)") and "data.batch_size_unlabeled=2" in msg, msg
    assert "labeled split" not in msg.replace("unlabeled split", ""), msg


def test_unlabeled_split_too_small_for_a_labeled_batch(tmp_path):
    folder(tmp_path, n_lab=8, n_unl=3)
    cfg = cfg_for(tmp_path, batch_size_labeled=4)    # 3 unlabeled images fill a batch of 2, but the labeled set is resampled to 3
    with pytest.raises(DatasetError) as e:
        build_loaders(cfg, build_datasets(cfg), seed=0)
    msg = str(e.value)
    assert msg.startswith("the unlabeled split has 3 image(s)") and "data.batch_size_labeled=4" in msg, msg
    L = build_loaders(replace(cfg, data=replace(cfg.data, batch_size_labeled=3)), build_datasets(cfg), seed=0)
    assert len(L["labeled"]) == 1 and len(L["unlabeled"]) == 1


def test_small_splits_under_ddp(tmp_path):
    folder(tmp_path, n_lab=4, n_unl=3)
    cfg = cfg_for(tmp_path, batch_size_unlabeled=3)     # 3 images fill one batch of 3 alone, not on each of 2 processes
    build_loaders(cfg, build_datasets(cfg), seed=0)
    with pytest.raises(DatasetError, match=r"the unlabeled split has 3 image\(s\) \(2 per process over 2 processes\), "
                                           r"fewer than one batch of data.batch_size_unlabeled=3"):
        build_loaders(cfg, build_datasets(cfg), rank=0, world_size=2, seed=0)
    sup = replace(cfg_for(tmp_path), method=replace(cfg.method, name="supervised"))
    (tmp_path / "splits/unlabeled.txt").unlink(); (tmp_path / "splits/labeled.txt").write_text("im0\n")
    with pytest.raises(DatasetError, match=r"the labeled split has 1 image\(s\), fewer than one batch of data.batch_size_labeled=2"):
        build_loaders(sup, build_datasets(sup), seed=0)


# ------------------------------------------------------------------------------ 17b: evaluation needs the val split alone
def test_val_only_datasets_need_no_train_splits(tmp_path):
    folder(tmp_path)
    (tmp_path / "splits/labeled.txt").unlink(); (tmp_path / "splits/unlabeled.txt").unlink()
    cfg = cfg_for(tmp_path, validate=True)
    with pytest.raises(DatasetError, match="labeled.txt' not found"):
        build_datasets(cfg)
    ds = build_datasets(cfg, splits=("val",))
    assert list(ds) == ["val", "class_names"] and len(ds["val"]) == 2 and ds["class_names"] == ["c0", "c1", "c2", "c3"]
    assert ds["val"][0]["mask"].shape == (12, 14)
    cat = dataset_catalog(cfg, splits=("val",))
    assert cat.problems == [] and (cat.labeled, cat.unlabeled) == ([], [])
    # a broken val image is still found by validation of the val split
    (tmp_path / "images/im8.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"failed validation: 1 problem\(s\):\n  .*val.txt, line 2"):
        build_datasets(cfg, splits=("val",))
    with pytest.raises(ValueError, match="splits=\\('test',\\)"):
        build_datasets(cfg, splits=("test",))


# ------------------------------------------------------------------------------ 17c: every problem at once
def test_format_problems_lists_every_problem(tmp_path):
    folder(tmp_path)
    (tmp_path / "images/im0.png").unlink()                                               # labeled line 1
    Image.fromarray(np.full((12, 14), 7, np.uint8), "L").save(tmp_path / "masks/im2.png")  # labeled line 3
    (tmp_path / "images/im4.png").write_bytes(b"garbage")                                # unlabeled line 2
    Image.fromarray(np.zeros((3, 3), np.uint8), "L").save(tmp_path / "masks/im8.png")      # val line 2
    cfg = cfg_for(tmp_path, validate=True)
    probs = validate_dataset(cfg)
    assert len(probs) == 4, probs
    text = format_problems(probs, "dataset 'folder'")
    lines = text.splitlines()
    assert lines[0] == "dataset 'folder': 4 problem(s):" and len(lines) == 5
    for ln, where in zip(lines[1:], ["labeled.txt, line 1", "labeled.txt, line 3", "unlabeled.txt, line 2", "val.txt, line 2"]):
        assert ln.startswith("  ") and where in ln, (ln, where)
    with pytest.raises(DatasetError) as e:
        build_datasets(cfg)
    assert str(e.value).splitlines()[1:] == lines[1:]                  # build_datasets raises the same list
    many = format_problems([f"problem {i}" for i in range(120)])
    assert len(many.splitlines()) == 121 and many.splitlines()[-1] == "  problem 119"
    assert format_problems([]) == ""


# ------------------------------------------------------------------------------ 17d: a checkpoint of random bytes
def test_random_bytes_checkpoint_says_what_it_is(tmp_path, capsys):
    f = tmp_path / "x.pt"; f.write_bytes(random.Random(1).randbytes(2048))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    msg = str(e.value)
    assert msg == (f"checkpoint '{f}' is not a readable torch checkpoint: the file (2048 bytes) is not a torch "
                   "checkpoint (truncated, or not written by brpg/torch)"), msg
    assert cli_main(["eval", "--checkpoint", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.pt" in err[0] and "is not a readable torch checkpoint" in err[0], err
    assert "weights_only" not in err[0] and "truncated, or not written by brpg/torch" in err[0], err


def test_truncated_checkpoint(tmp_path):
    f = tmp_path / "last.pt"; torch.save({"student": {"w": torch.zeros(100)}}, f)
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"last.pt' is not a readable torch checkpoint: the file \(300 bytes\) is a truncated"):
        read_checkpoint(tmp_path)
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is not a readable torch checkpoint: the file is empty"):
        read_checkpoint(f)
