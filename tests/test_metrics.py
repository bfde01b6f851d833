"""brpg.metrics: mIoU against NumPy / scikit-learn, boundary IoU against a SciPy reference of the same
definition, sliding-window / flip / multi-scale / centre-crop inference, evaluate() on toy and real
models, and the DDP all-reduce of both metrics and of evaluate() with two gloo processes."""
import math, os, tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import confusion_matrix

from brpg.config import Config, ModelConfig
from brpg.metrics import (BoundaryIoU, SegMetric, boundary_width, center_crop, erode, evaluate, infer,
                          sliding_windows)

from _ddp import spawn_gloo

torch.set_num_threads(1)


# ------------------------------------------------------------------ helpers / references
def blobs(shape, C, seed, ignore_frac=0.03):
    g = np.random.default_rng(seed)
    lab = ndimage.zoom(g.integers(0, C, (shape[0] // 6 + 1, shape[1] // 6 + 1)), 6, order=0)[:shape[0], :shape[1]].copy()
    lab[g.random(shape) < ignore_frac] = 255
    return lab


def np_miou(P, T, C, ignore=255):
    keep = T != ignore
    inter = np.array([((P == c) & (T == c) & keep).sum() for c in range(C)], float)
    union = np.array([(((P == c) | (T == c)) & keep).sum() for c in range(C)], float)
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return np.nanmean(iou), iou, (P[keep] == T[keep]).mean()


def np_boundary_iou(preds, tgts, C, ratio, ignore=255):
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


# ------------------------------------------------------------------ mIoU
@pytest.mark.parametrize("C,seed", [(2, 0), (11, 1), (21, 2)])
def test_miou_matches_numpy_and_sklearn(C, seed):
    g = torch.Generator().manual_seed(seed)
    m = SegMetric(C)
    Ps, Ts = [], []
    for _ in range(4):
        T = torch.randint(0, C, (3, 21, 26), generator=g)
        P = torch.where(torch.rand(T.shape, generator=g) < 0.6, T, torch.randint(0, C, T.shape, generator=g))
        T[torch.rand(T.shape, generator=g) < 0.1] = 255
        m.update(P, T); Ps.append(P.numpy().ravel()); Ts.append(T.numpy().ravel())
    P, T = np.concatenate(Ps), np.concatenate(Ts)
    r = m.compute()
    miou, iou, acc = np_miou(P, T, C)
    keep = T != 255
    np.testing.assert_array_equal(m.hist.numpy(), confusion_matrix(T[keep], P[keep], labels=list(range(C))))
    np.testing.assert_allclose(r["iou"], iou); assert r["miou"] == pytest.approx(miou); assert r["acc"] == pytest.approx(acc)


def test_miou_absent_class_is_nan_and_excluded():
    m = SegMetric(4).update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 255]]))
    r = m.compute()
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["acc"] == pytest.approx(2 / 3)


def test_metric_errors_and_reset():
    with pytest.raises(ValueError, match="outside"):
        SegMetric(3).update(torch.tensor([[5]]), torch.tensor([[1]])).compute()
    with pytest.raises(ValueError, match="integer"):
        SegMetric(3).update(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.long))
    m = SegMetric(3).update(torch.tensor([[0]]), torch.tensor([[1]]))
    m.reset(); m.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert m.compute()["miou"] == 1.0
    assert m.reduce() is m  # no process group: no-op


# ------------------------------------------------------------------ boundary IoU
def test_erosion_matches_scipy_many_sizes():
    rng = np.random.default_rng(0)
    for trial in range(6):
        h, w = rng.integers(5, 60, 2)
        mk = ndimage.binary_dilation(rng.random((h, w)) > 0.9, iterations=int(rng.integers(0, 3)))
        for d in (1, 3, 7):
            np.testing.assert_array_equal(erode(torch.from_numpy(mk), d).numpy(),
                                          ndimage.binary_erosion(mk, np.ones((3, 3)), iterations=d, border_value=0))


@pytest.mark.parametrize("ratio,shape", [(0.02, (48, 70)), (0.05, (33, 33)), (0.1, (25, 61)), (0.001, (20, 20))])
def test_boundary_iou_matches_scipy_reference(ratio, shape):
    C = 5
    T = np.stack([blobs(shape, C, s) for s in range(3)])
    P = np.stack([blobs(shape, C, s + 50, 0) for s in range(3)])
    P[1] = np.where(T[1] == 255, 0, T[1])
    b = BoundaryIoU(C, ratio)
    for i in range(3): b.update(torch.from_numpy(P[i:i + 1]), torch.from_numpy(T[i:i + 1]))
    ref, ref_c = np_boundary_iou(P, T, C, ratio)
    r = b.compute()
    assert r["boundary_iou"] == pytest.approx(ref)
    np.testing.assert_allclose(r["iou"], ref_c)


def test_boundary_width_and_band():
    assert boundary_width(1024, 2048) == 46 and boundary_width(10, 10) == 1 and boundary_width(513, 513) == 15
    # a square away from the border: band = square minus its (d)-eroded square
    T = torch.zeros(1, 40, 40, dtype=torch.long); T[0, 10:30, 10:30] = 1
    b = BoundaryIoU(2, 3 / math.sqrt(2 * 40 ** 2)).update(T, T)   # d = 3
    assert b.compute()["boundary_iou"] == 1.0
    P = T.clone(); P[0, 10:30, 10:13] = 0                          # lose the left 3 columns of the square
    r = BoundaryIoU(2, 3 / math.sqrt(2 * 40 ** 2)).update(P, T).compute()
    g_band = 400 - 14 * 14
    p_band = 20 * 17 - 14 * 11
    # class 1 from explicit masks (band sizes checked by hand above)
    G = torch.zeros(40, 40, dtype=torch.bool); G[10:30, 10:30] = True
    Pm = G.clone(); Pm[10:30, 10:13] = False
    gb = G & ~erode(G, 3); pb = Pm & ~erode(Pm, 3)
    assert gb.sum() == g_band and pb.sum() == p_band
    assert r["iou"][1] == pytest.approx(((gb & pb).sum() / (gb | pb).sum()).item())


def test_boundary_iou_ignore_pixels():
    T = torch.zeros(1, 30, 30, dtype=torch.long); T[0, 8:22, 8:22] = 1
    assert BoundaryIoU(2, 0.05).update(T, T).compute()["boundary_iou"] == 1.0
    T2 = T.clone(); T2[0, :, :5] = 255                              # ignore a left strip
    # ignored pixels are never counted: predicting class 1 there (wrong for the image) still scores 1,
    # because the strip is "not class 0" in both the label and the prediction
    P2 = T.clone(); P2[0, :, :5] = 1
    assert BoundaryIoU(2, 0.05).update(P2, T2).compute()["boundary_iou"] == 1.0
    # but ignore pixels are "not class c" when eroding G: next to the strip G(class 0) has a band that a
    # prediction filling the strip with class 0 lacks, so the score drops below 1 (documented choice)
    r = BoundaryIoU(2, 0.05).update(T.clone(), T2).compute()
    assert r["iou"][1] == 1.0 and 0 < r["iou"][0] < 1


# ------------------------------------------------------------------ inference
class Const(nn.Module):
    "Predicts at stride 4 (like a segmenter) a function of position-free content: mean colour per pixel block."
    def __init__(self, C=3):
        super().__init__(); self.conv = nn.Conv2d(3, C, 1)
    def forward(self, x):
        return {"pred": self.conv(F.avg_pool2d(x, 4, ceil_mode=True)), "rep": None}


def test_sliding_equals_whole_for_1x1_conv():
    torch.manual_seed(0)
    toy = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        for H, W, crop, stride in [(50, 70, 24, 0), (50, 70, 24, 7), (23, 90, 32, 0), (31, 31, 31, 0), (10, 12, 16, 5)]:
            x = torch.randn(2, 3, H, W)
            torch.testing.assert_close(infer(toy, x, 4, "sliding", crop_size=crop, stride=stride, window_batch=2),
                                       infer(toy, x, 4, "whole"), atol=1e-5, rtol=1e-5)


def test_sliding_windows_cover_and_stay_inside():
    rng = np.random.default_rng(1)
    for _ in range(50):
        crop = int(rng.integers(3, 40)); H, W = crop + rng.integers(0, 80, 2); s = int(rng.integers(1, crop + 1))
        cov = np.zeros((H, W), int)
        for y0, y1, x0, x1 in sliding_windows(H, W, crop, s):
            assert y1 - y0 == crop and x1 - x0 == crop and y0 >= 0 and x0 >= 0 and y1 <= H and x1 <= W
            cov[y0:y1, x0:x1] += 1
        assert cov.min() >= 1
    assert sliding_windows(1024, 2048, 769, 513) == [(y, y + 769, x, x + 769) for y in (0, 255) for x in (0, 513, 1026, 1279)]


def test_sliding_averages_overlaps():
    # a model whose output depends on the window: the mean of the input window -> overlap average is checkable
    class WinMean(nn.Module):
        def forward(self, x): return {"pred": x[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])}
    x = torch.arange(12.).view(1, 1, 1, 12).expand(1, 3, 8, 12).contiguous()  # H = crop: no padding
    out = infer(WinMean(), x, 1, "sliding", crop_size=8, stride=4)   # windows [0,8) and [4,12)
    m1, m2 = x[0, 0, 0, :8].mean(), x[0, 0, 0, 4:].mean()
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([m1] * 4 + [(m1 + m2) / 2] * 4 + [m2] * 4))


def test_flip_and_scales():
    torch.manual_seed(0)
    asym = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        f = infer(asym, x, 4, flip=True)
        torch.testing.assert_close(f, (asym(x) + asym(x.flip(-1)).flip(-1)) / 2)
        assert (f - asym(x)).abs().max() > 1e-3
        fs = infer(asym, x, 4, "sliding", crop_size=16, flip=True)
        assert fs.shape == (1, 4, 20, 28)
        m = Const()
        up = lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=True)
        x2 = up(x, (40, 56))
        ref = (up(m(x)["pred"], (20, 28)) + up(up(m(x2)["pred"], (40, 56)), (20, 28))) / 2
        torch.testing.assert_close(infer(m, x, 3, scales=(1.0, 2.0)), ref)


def test_center_crop_matches_official_padding():
    x = torch.arange(25.).view(1, 1, 5, 5)
    c = center_crop(x, 8, -1)
    assert c.shape == (1, 1, 8, 8)
    assert torch.equal(c[0, 0, 1:6, 1:6], x[0, 0])  # pad 3 -> 1 before, 2 after
    assert torch.equal(center_crop(torch.arange(16).view(4, 4), 2), torch.tensor([[5, 6], [9, 10]]))


# ------------------------------------------------------------------ evaluate
def _oracle_batches(C=3, n=4, shape=(24, 30)):
    out = []
    for s in range(n):
        lab = torch.from_numpy(blobs(shape, C, s)).long()[None]
        img = F.one_hot(lab % 255, C).permute(0, 3, 1, 2).float()
        out.append({"image": img, "mask": lab})
    return out


class Oracle(nn.Module):
    def forward(self, x): return {"pred": x * 5, "rep": x}


def test_evaluate_oracle_and_model_mode():
    cfg = Config(); cfg.data.num_classes = 3; cfg.eval.mode = "whole"
    batches = _oracle_batches()
    r = evaluate(Oracle(), batches, cfg, "cpu")
    assert r["miou"] == 1.0 and r["acc"] == 1.0 and set(r) >= {"miou", "iou", "acc", "boundary_iou"}
    assert 0 < r["boundary_iou"] < 1    # the ignore pixels shape the predicted bands (see the notebook)
    ref, _ = np_boundary_iou([np.argmax(b["image"][0].numpy(), 0) for b in batches],
                             [b["mask"][0].numpy() for b in batches], 3, cfg.eval.boundary_dilation)
    assert r["boundary_iou"] == pytest.approx(ref)


def test_evaluate_real_segmenter_all_modes():
    from brpg.models import create_segmenter
    torch.manual_seed(0)
    m = create_segmenter(ModelConfig(backbone="resnet18", pretrained=False, output_stride=8), 3).train()
    cfg = Config(); cfg.data.num_classes = 3
    batches = [{"image": torch.randn(2, 3, 45, 53), "mask": torch.randint(0, 3, (2, 45, 53))} for _ in range(2)]
    for mode, flip in [("whole", False), ("sliding", True), ("center_crop", False)]:
        cfg.eval.mode, cfg.eval.crop_size, cfg.eval.flip = mode, 33, flip
        r = evaluate(m, batches, cfg, "cpu")
        assert 0 <= r["miou"] <= 1 and 0 <= r["boundary_iou"] <= 1 and len(r["iou"]) == 3
    assert m.training  # restored


# ------------------------------------------------------------------ DDP (2 gloo processes)
def _rank_data(rank, C=4):
    g = torch.Generator().manual_seed(10 + rank)
    T = torch.from_numpy(np.stack([blobs((30, 36), C, 100 * rank + s) for s in range(2)])).long()
    P = torch.where(torch.rand(T.shape, generator=g) < 0.7, T % 255, torch.randint(0, C, T.shape, generator=g))
    if rank == 1: T[T == 3] = 255                  # class 3 labelled on rank 0 only
    return P, T


def _worker(rank, world, out_dir):
    P, T = _rank_data(rank)
    s, b = SegMetric(4), BoundaryIoU(4, 0.05)
    s.update(P, T); b.update(P, T)
    s.reduce(); b.reduce(); s.reduce()                           # a second reduce is a no-op
    try: s.update(P, T); upd_err = ""
    except RuntimeError as e: upd_err = str(e)
    empty = SegMetric(4)
    if rank == 0: empty.update(P, T)                              # rank 1 saw no batch at all
    empty.reduce()
    cfg = Config(); cfg.data.num_classes = 3; cfg.eval.mode = "whole"
    ev = evaluate(Oracle(), _oracle_batches(n=4)[rank::2], cfg, "cpu")
    torch.save({"seg": s.compute(), "bnd": b.compute(), "upd_err": upd_err, "empty": empty.compute(), "ev": ev},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_reduce_two_processes():
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, d, world=2)
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    (P0, T0), (P1, T1) = _rank_data(0), _rank_data(1)
    s = SegMetric(4).update(P0, T0).update(P1, T1).compute()
    b = BoundaryIoU(4, 0.05).update(P0, T0).update(P1, T1).compute()
    e0 = SegMetric(4).update(P0, T0).compute()
    ev = evaluate(Oracle(), _oracle_batches(n=4), _cfg3(), "cpu")
    for r in res:
        assert r["seg"]["miou"] == pytest.approx(s["miou"]) and r["seg"]["acc"] == pytest.approx(s["acc"])
        np.testing.assert_allclose(r["seg"]["iou"], s["iou"])
        assert r["bnd"]["boundary_iou"] == pytest.approx(b["boundary_iou"])
        np.testing.assert_allclose(r["bnd"]["iou"], b["iou"])
        assert "after reduce" in r["upd_err"]
        assert r["empty"]["miou"] == pytest.approx(e0["miou"])
        assert r["ev"]["miou"] == pytest.approx(ev["miou"]) and r["ev"]["boundary_iou"] == pytest.approx(ev["boundary_iou"])
    # and the reduced result differs from what a single rank sees alone (the reduction did something)
    assert s["miou"] != pytest.approx(e0["miou"])


def _cfg3():
    cfg = Config(); cfg.data.num_classes = 3; cfg.eval.mode = "whole"; return cfg
