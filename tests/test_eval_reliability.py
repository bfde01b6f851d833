"""Evaluation reliability (issue items 9, 10, 11, metrics part): the Cityscapes sliding-window protocol at full
resolution against a brute-force reference, boundary IoU on the valid (non-padding) region of padded canvases,
and a clear error for a sliding-window stride larger than the crop."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from brpg.config import Config
from brpg.data import pad_collate
from brpg.metrics import (BoundaryIoU, SegMetric, boundary_width, center_crop, evaluate, infer, padding_mask,
                          sliding_windows)

torch.set_num_threads(1)


# ------------------------------------------------------------------ helpers
class PosConv(nn.Module):
    "A 3×3 conv plus a ramp over the window's own coordinates: each window gives different logits for a pixel."
    def __init__(self, C=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, C, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 1, h)[:, None] + 2 * torch.linspace(0, 1, w)[None]
        return {"pred": self.conv(x) + ramp}


def brute_sliding(model, x, crop, stride):
    "Independent reference: zero-pad to the crop, every window start on the grid plus one ending at the border."
    B, _, H, W = x.shape
    xp = F.pad(x, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    Hp, Wp = xp.shape[-2:]
    starts = lambda n: sorted(set(range(0, n - crop + 1, stride)) | {n - crop})
    out, cnt = None, torch.zeros(Hp, Wp)
    for y in starts(Hp):
        for x0 in starts(Wp):
            lg = model(xp[..., y:y + crop, x0:x0 + crop])["pred"]
            if out is None: out = torch.zeros(B, lg.shape[1], Hp, Wp)
            out[..., y:y + crop, x0:x0 + crop] += lg
            cnt[y:y + crop, x0:x0 + crop] += 1
    assert cnt.min() >= 1
    return (out / cnt)[..., :H, :W]


def blobs(shape, C, seed, block=6):
    g = np.random.default_rng(seed)
    lab = ndimage.zoom(g.integers(0, C, (shape[0] // block + 1, shape[1] // block + 1)), block, order=0)
    return torch.from_numpy(lab[:shape[0], :shape[1]].copy()).long()


def np_boundary_iou(preds, tgts, C, ratio, ignore=255):
    "SciPy reference of the same definition on whole (unpadded) label maps."
    inter, union = np.zeros(C), np.zeros(C)
    for P, T in zip(preds, tgts):
        h, w = T.shape
        d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
        for c in range(C):
            gb = (T == c) & ~ndimage.binary_erosion(T == c, np.ones((3, 3)), iterations=d, border_value=0)
            pb = (P == c) & ~ndimage.binary_erosion(P == c, np.ones((3, 3)), iterations=d, border_value=0)
            gb &= T != ignore; pb &= T != ignore
            inter[c] += (gb & pb).sum(); union[c] += (gb | pb).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return np.nanmean(iou), iou


def centre_pad(m, size, fill):
    "Pad a [H,W] map to size×size, split as center_crop (and data.pad_crop symmetric) do."
    return center_crop(m, size, fill)


class Oracle(nn.Module):
    "Perfect per-pixel model on one-hot images (logit 0 everywhere on zero padding, so it predicts class 0 there)."
    def forward(self, x): return {"pred": x * 5}


# ------------------------------------------------------------------ item 9: sliding window at full resolution
@pytest.mark.parametrize("crop,stride", [(32, 0), (32, 11), (24, 0), (40, 40), (33, 1)])
def test_sliding_matches_brute_force_40x90(crop, stride):
    m = PosConv()
    x = torch.randn(1, 3, 40, 90)
    with torch.no_grad():
        out = infer(m, x, 3, "sliding", crop_size=crop, stride=stride, window_batch=3)
        ref = brute_sliding(m, x, crop, stride or math.ceil(2 * crop / 3))
    assert out.shape == (1, 3, 40, 90) and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_stride_zero_is_two_thirds_of_the_crop():
    m = PosConv(); x = torch.randn(1, 3, 40, 90)
    with torch.no_grad():
        for crop in (24, 32, 769 // 20):
            torch.testing.assert_close(infer(m, x, 3, "sliding", crop_size=crop, stride=0),
                                       infer(m, x, 3, "sliding", crop_size=crop, stride=math.ceil(2 * crop / 3)))
    assert math.ceil(2 * 769 / 3) == 513
    # the Cityscapes grid: 1024×2048 with 769 crops at stride 513, last windows aligned to the border
    wins = sliding_windows(1024, 2048, 769, 513)
    assert max(w[1] for w in wins) == 1024 and max(w[3] for w in wins) == 2048


@pytest.mark.parametrize("H,W,crop", [(41, 97, 33), (37, 53, 16), (769, 1031, 769), (35, 36, 17), (101, 13, 13)])
def test_every_pixel_covered_for_odd_sizes(H, W, crop):
    stride = math.ceil(2 * crop / 3)
    cov = torch.zeros(H, W, dtype=torch.int32)
    wins = sliding_windows(H, W, crop, stride)
    for y0, y1, x0, x1 in wins:
        assert y1 - y0 == crop and x1 - x0 == crop
        cov[y0:y1, x0:x1] += 1
    assert cov.min() >= 1
    assert max(w[1] for w in wins) == H and max(w[3] for w in wins) == W   # last window ends at the border
    if H * W < 10 ** 5:
        m = PosConv()
        with torch.no_grad():
            out = infer(m, torch.randn(1, 3, H, W), 3, "sliding", crop_size=crop, stride=0)
        assert out.shape == (1, 3, H, W) and not torch.isnan(out).any()


def test_image_smaller_than_crop_is_padded_and_cut_back():
    m = PosConv(); x = torch.randn(2, 3, 20, 25)
    with torch.no_grad():
        for crop in (32, 24):   # smaller in both dims, and in one dim only (24 < 25)
            out = infer(m, x, 3, "sliding", crop_size=crop, stride=0)
            assert out.shape == (2, 3, 20, 25) and not torch.isnan(out).any()
            torch.testing.assert_close(out, brute_sliding(m, x, crop, math.ceil(2 * crop / 3)), atol=1e-5, rtol=1e-5)


def _cityscapes_like_cfg(C=3):
    "The Cityscapes eval protocol, scaled down: sliding, stride 0, full-size labels (data.val_crop_size = 0)."
    cfg = Config()
    cfg.data.num_classes = C; cfg.data.val_crop_size = 0
    cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride = "sliding", 32, 0
    return cfg


def test_evaluate_sliding_full_resolution_matches_reference():
    cfg = _cityscapes_like_cfg()
    m = PosConv()
    batches = [{"image": torch.randn(1, 3, 40, 90), "mask": blobs((40, 90), 3, s)[None]} for s in range(2)]
    r = evaluate(m, batches, cfg, "cpu")
    seg, bnd = SegMetric(3), BoundaryIoU(3, cfg.eval.boundary_dilation)
    with torch.no_grad():
        for b in batches:
            pred = brute_sliding(m, b["image"], 32, math.ceil(2 * 32 / 3)).argmax(1)
            assert pred.shape == b["mask"].shape          # scored at full resolution
            seg.update(pred, b["mask"]); bnd.update(pred, b["mask"])
    ref, bref = seg.compute(), bnd.compute()
    assert r["miou"] == pytest.approx(ref["miou"]) and r["acc"] == pytest.approx(ref["acc"])
    assert r["boundary_iou"] == pytest.approx(bref["boundary_iou"])
    # a perfect per-pixel model is perfect at full resolution through the sliding window
    oh = [{"image": F.one_hot(b["mask"], 3).permute(0, 3, 1, 2).float(), "mask": b["mask"]} for b in batches]
    r = evaluate(Oracle(), oh, cfg, "cpu")
    assert (r["miou"], r["acc"], r["boundary_iou"]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------ item 11: stride > crop
def test_stride_larger_than_crop_raises():
    x = torch.randn(1, 3, 40, 90)
    with pytest.raises(ValueError, match=r"eval\.stride.*eval\.crop_size"):
        infer(PosConv(), x, 3, "sliding", crop_size=16, stride=17)
    with pytest.raises(ValueError, match=r"eval\.stride"):
        infer(PosConv(), x, 3, "sliding", crop_size=16, stride=-1)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(40, 90, 16, 17)
    cfg = _cityscapes_like_cfg(); cfg.eval.stride = 33
    with pytest.raises(ValueError, match=r"eval\.stride = 33 with eval\.crop_size = 32"):
        evaluate(PosConv(), [{"image": x, "mask": torch.zeros(1, 40, 90, dtype=torch.long)}], cfg, "cpu")
    with torch.no_grad():   # stride == crop (no overlap) is still fine
        assert not torch.isnan(infer(PosConv(), x, 3, "sliding", crop_size=16, stride=16)).any()


# ------------------------------------------------------------------ item 10: boundary IoU on the valid region
def _padded_case(h=30, w=41, size=48, C=4, seed=7):
    t = blobs((h, w), C, seed); p = blobs((h, w), C, seed + 1)
    T = centre_pad(t, size, 255); Pimp = centre_pad(p, size, 0)
    V = centre_pad(torch.ones(h, w, dtype=torch.uint8), size, 0).bool()
    return t, p, T, Pimp, V


@pytest.mark.parametrize("pad_class", [0, 2])
def test_perfect_padded_prediction_scores_one(pad_class):
    C = 4
    t, _, T, _, V = _padded_case(C=C)
    P = torch.where(V, T, torch.full_like(T, pad_class))   # right on every image pixel, some class in the padding
    for ratio in (0.02, 0.05, 0.005):
        r = BoundaryIoU(C, ratio).update(P[None], T[None], V[None]).compute()
        assert abs(r["boundary_iou"] - 1.0) < 1e-6
    # the canvas-based score (no valid) is biased: the padding border is a band the prediction lacks
    assert BoundaryIoU(C, 0.05).update(P[None], T[None]).compute()["boundary_iou"] < 1 - 1e-3


def test_imperfect_padded_matches_unpadded_crop():
    C = 4
    t, p, T, P, V = _padded_case(C=C)
    for ratio in (0.02, 0.05, 0.1):
        got = BoundaryIoU(C, ratio).update(P[None], T[None], V[None]).compute()
        ref = BoundaryIoU(C, ratio).update(p[None], t[None]).compute()
        sref, sref_c = np_boundary_iou([p.numpy()], [t.numpy()], C, ratio)
        assert 0 < got["boundary_iou"] < 1
        assert got["boundary_iou"] == pytest.approx(ref["boundary_iou"], abs=1e-12)
        assert got["boundary_iou"] == pytest.approx(sref)
        np.testing.assert_allclose(got["iou"], sref_c)


def test_band_width_from_the_valid_region_diagonal():
    # a 20×20 image on a 200×200 canvas: d must be round(r·√800) = 3, not round(r·√80000) = 28
    C, ratio = 2, 0.1
    assert boundary_width(20, 20, ratio) == 3 and boundary_width(200, 200, ratio) == 28
    t = torch.zeros(20, 20, dtype=torch.long); t[4:16, 4:16] = 1
    p = t.clone(); p[4:16, 4:6] = 0
    T = torch.full((200, 200), 255); T[:20, :20] = t
    P = torch.zeros(200, 200, dtype=torch.long); P[:20, :20] = p
    V = torch.zeros(200, 200, dtype=torch.bool); V[:20, :20] = True
    got = BoundaryIoU(C, ratio).update(P[None], T[None], V[None]).compute()
    ref, ref_c = np_boundary_iou([p.numpy()], [t.numpy()], C, ratio)
    assert got["boundary_iou"] == pytest.approx(ref); np.testing.assert_allclose(got["iou"], ref_c)


def test_pad_collate_batch_equals_separate_unpadded_images():
    C, ratio = 3, 0.05
    items = []
    for s, (h, w) in enumerate([(30, 44), (21, 37), (30, 30)]):
        lab = blobs((h, w), C, s + 20); lab[torch.rand(h, w, generator=torch.Generator().manual_seed(s)) < 0.03] = 255
        items.append({"image": torch.randn(3, h, w), "mask": lab, "pred": blobs((h, w), C, s + 40)})
    batch = pad_collate(items, 255)
    V = padding_mask(batch["image"], batch["mask"], 255)
    got = BoundaryIoU(C, ratio).update(batch["pred"], batch["mask"], V).compute()
    ref = BoundaryIoU(C, ratio)
    for it in items: ref.update(it["pred"][None], it["mask"][None])
    ref = ref.compute()
    assert got["boundary_iou"] == pytest.approx(ref["boundary_iou"], abs=1e-12)
    np.testing.assert_allclose(got["iou"], ref["iou"])


def test_padding_mask_keeps_interior_ignore_and_black_pixels():
    img = torch.randn(1, 3, 10, 12); img[..., 8:, :] = 0; img[..., :, 10:] = 0       # padding bottom/right
    img[..., 2, 3] = 0                                                              # a black image pixel
    lab = torch.randint(0, 3, (1, 10, 12)); lab[..., 8:, :] = 255; lab[..., :, 10:] = 255
    lab[..., 0, :] = 255                                                            # an ignored image row
    v = padding_mask(img, lab, 255)
    assert v[0, :8, :10].all() and not v[0, 8:].any() and not v[0, :, 10:].any()
    # without padding, a valid mask that is all True changes nothing (and neither does omitting it)
    T = blobs((24, 30), 3, 3); P = blobs((24, 30), 3, 4)
    a = BoundaryIoU(3, 0.05).update(P[None], T[None]).compute()
    b = BoundaryIoU(3, 0.05).update(P[None], T[None], torch.ones(1, 24, 30, dtype=torch.bool)).compute()
    assert a["boundary_iou"] == b["boundary_iou"]; np.testing.assert_array_equal(a["iou"], b["iou"])
    with pytest.raises(ValueError, match="valid shape"):
        BoundaryIoU(3).update(P[None], T[None], torch.ones(1, 24, 29, dtype=torch.bool))


@pytest.mark.parametrize("mode,crop", [("center_crop", 64), ("whole", 0)])
def test_evaluate_perfect_model_on_padded_canvases(mode, crop):
    "VOC/COCO centre-crop padding and pad_collate padding of mixed-size eval batches: a perfect model scores 1."
    cfg = Config(); cfg.data.num_classes = 3; cfg.eval.mode = mode
    if crop: cfg.eval.crop_size = crop
    for dil in (0.02, 0.005):
        cfg.eval.boundary_dilation = dil
        items = []
        for s, (h, w) in enumerate([(40, 52), (29, 47)]):
            lab = blobs((h, w), 3, s + 60)
            items.append({"image": F.one_hot(lab, 3).permute(2, 0, 1).float(), "mask": lab})
        loader = [pad_collate(items, 255)] if mode == "whole" else [{k: v[None] for k, v in it.items()} for it in items]
        r = evaluate(Oracle(), loader, cfg, "cpu")
        assert r["miou"] == 1.0 and abs(r["boundary_iou"] - 1.0) < 1e-6
