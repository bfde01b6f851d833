"""`brpg.losses.prototype_step` (one gather, one matmul) against today's chain, kept here as the reference:
`labeled_grid(rep[:B_l])` + `unlabeled_pick(rep[B_l:])` + `prototype_loss` + `bank.ema_update(sims=...)`, as
`BRPG.prototype_terms` runs it (copied from brpg/sampling.py and brpg/losses.py before the change).

Same picks, two ways: with `sync_free=True` the new step draws with the reference's own rule (keys + topk) from
the same generator; with the CPU rule (nonzero + random subset) the reference gets a confidence map where exactly
the pixels the new step picked are confident. Compared: loss, d loss / d rep, the stats, and a PrototypeBank
after the EMA (each side on its own deep copy)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from brpg.losses import prototype_step
from brpg.prototypes import PrototypeBank
from brpg.sampling import pick_confident


# ---------------------------------------------------------------- reference: today's chain, verbatim
def _ref_src_coord(pos, H, h):
    if H < 2: return torch.zeros_like(pos, dtype=torch.float32)
    scale = torch.tensor(h - 1, dtype=torch.float32) / torch.tensor(H - 1, dtype=torch.float32)
    return pos.float() * scale.to(pos.device)


def _ref_grid_positions(H, h, grid_num=32):
    s = (H - 1) // grid_num
    pos = torch.cat([torch.arange(grid_num) * s, torch.tensor([H - 1])])
    return pos, _ref_src_coord(pos, H, h)


def _ref_bilinear_points(rep, b, ys, xs):
    B, D, h, w = rep.shape
    y0 = ys.floor().long().clamp(0, h - 1); x0 = xs.floor().long().clamp(0, w - 1)
    y1 = (y0 + 1).clamp(max=h - 1); x1 = (x0 + 1).clamp(max=w - 1)
    wy = (ys.float() - y0)[:, None]; wx = (xs.float() - x0)[:, None]
    pos = torch.cat([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    v = rep.flatten(2)[b.repeat(4), :, pos].float().reshape(4, -1, D)
    out = (1 - wy) * ((1 - wx) * v[0] + wx * v[1]) + wy * ((1 - wx) * v[2] + wx * v[3])
    return out.to(rep.dtype)


def _ref_labeled_grid(rep, gt, grid_num=32):
    B, D, h, w = rep.shape
    H, W = gt.shape[-2:]
    py, sy = _ref_grid_positions(H, h, grid_num); px, sx = _ref_grid_positions(W, w, grid_num)
    labels = gt[:, py.to(gt.device)][:, :, px.to(gt.device)].reshape(-1)
    if bool((sy == sy.round()).all() and (sx == sx.round()).all()):
        iy, ix = sy.round().long().to(rep.device), sx.round().long().to(rep.device)
        feats = rep[:, :, iy[:, None], ix[None, :]].permute(0, 2, 3, 1).reshape(-1, D)
    else:
        G1, G2 = len(py), len(px)
        b = torch.arange(B, device=rep.device).repeat_interleave(G1 * G2)
        ys = sy.to(rep.device).repeat_interleave(G2).repeat(B); xs = sx.to(rep.device).repeat(G1 * B)
        feats = _ref_bilinear_points(rep, b, ys, xs)
    return feats, labels


def _ref_unlabeled_pick(rep, conf, labels, thr, max_n, generator=None, ignore_index=255):
    B, D, h, w = rep.shape
    H, W = conf.shape[-2:]
    n = min(int(max_n), B * H * W)
    if n <= 0:
        return rep.new_zeros(0, D), labels.new_zeros(0)
    dev = generator.device if generator is not None else conf.device
    keys = torch.rand(B * H * W, generator=generator, device=dev).to(conf.device)
    ok = (conf >= thr).flatten()
    keys = torch.where(ok, keys, torch.full_like(keys, 2.0))
    sel = torch.topk(keys, n, largest=False, sorted=False).indices.sort().values
    valid = ok[sel]
    lab = torch.where(valid, labels.flatten()[sel], torch.full_like(sel, ignore_index).to(labels.dtype))
    b, rem = sel // (H * W), sel % (H * W)
    y, x = rem // W, rem % W
    ys, xs = _ref_src_coord(y, H, h), _ref_src_coord(x, W, w)
    return _ref_bilinear_points(rep, b.to(rep.device), ys.to(rep.device), xs.to(rep.device)), lab


def _ref_masked_mean(x, keep):
    keep = keep.to(x.dtype)
    return (torch.where(keep > 0, x, torch.zeros_like(x)) * keep).sum() / keep.sum().clamp_min(1)


def _ref_proto_term(bank, feats, labels, temperature, ignore_index):
    labels = labels.reshape(-1).long()
    C = bank.num_classes
    inr = (labels >= 0) & (labels < C) & (labels != ignore_index)
    safe = torch.where(inr, labels, torch.zeros_like(labels))
    keep = inr & bank.class_valid[safe]
    sims = bank.similarities(feats)
    logits = (sims.max(dim=-1).values / temperature).float()
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, safe[:, None]).squeeze(1)
    loss = _ref_masked_mean(nll, keep)
    with torch.no_grad():
        n = keep.sum()
        correct = ((logits.argmax(1) == safe) & keep).sum()
    return loss, n, correct, sims.detach()


def _ref_prototype_loss(bank, feats_l, labels_l, feats_u, labels_u, temperature=0.1, ignore_index=255):
    loss_l, n_l, c_l, s_l = _ref_proto_term(bank, feats_l, labels_l, temperature, ignore_index)
    loss_u, n_u, c_u, s_u = _ref_proto_term(bank, feats_u, labels_u, temperature, ignore_index)
    n = (n_l + n_u).clamp_min(1)
    stats = {"loss_pro_l": loss_l.detach(), "loss_pro_u": loss_u.detach(), "n_labeled": n_l, "n_unlabeled": n_u,
             "proto_acc_l": c_l / n_l.clamp_min(1), "proto_acc_u": c_u / n_u.clamp_min(1),
             "proto_acc": (c_l + c_u) / n, "sims": torch.cat([s_l, s_u])}
    return loss_l + loss_u, stats


EMA = dict(decay=0.9, sync=False, fault_weight=0.5, ignore_index=255)


def ref_step(rep, B_l, y_l, conf_u, yhat_u, bank, thr, grid_num, max_n, tau, ign, generator=None):
    "`BRPG.prototype_terms` before the change (EMA included)."
    f_l, l_l = _ref_labeled_grid(rep[:B_l], y_l, grid_num)
    f_u, l_u = _ref_unlabeled_pick(rep[B_l:], conf_u, yhat_u, thr, max_n, generator=generator, ignore_index=ign)
    loss, st = _ref_prototype_loss(bank, f_l.float(), l_l, f_u.float(), l_u, tau, ign)
    bank.ema_update(torch.cat([f_l, f_u]).float(), torch.cat([l_l, l_u]), sims=st["sims"], **EMA)
    return loss, st


def new_step(rep, B_l, y_l, conf_u, yhat_u, bank, thr, grid_num, max_n, tau, ign, generator=None, sync_free=None):
    "What the trainer runs now: `prototype_step` + the EMA on its rows and similarities."
    loss, st = prototype_step(rep, B_l, y_l, conf_u, yhat_u, bank, thr, grid_num, max_n, tau, ign,
                              generator=generator, sync_free=sync_free)
    bank.ema_update(st["feats"], st["labels"], sims=st["sims"], **EMA)
    return loss, st


# ---------------------------------------------------------------- fixtures
def _bank(C, D, seed, one_class=False):
    g = torch.Generator().manual_seed(seed)
    kh = torch.randint(1, 4, (C,), generator=g); kl = torch.randint(0, 3, (C,), generator=g)
    valid = torch.cat([torch.arange(3)[None] < kh[:, None], torch.arange(3)[None] < kl[:, None]], 1)
    valid[1] = False                                     # a class without prototypes
    if one_class: valid[:] = False; valid[0, :2] = True
    return PrototypeBank(C, D, 3, 3).set_prototypes(torch.randn(C, 6, D, generator=g), valid)


GEOM = {"exact": (33, 8), "bilinear": (31, 6)}           # full-res H and grid_num on a 9x9 map


def _inputs(geom, dtype, seed=0, C=5, B_l=2, B_u=2, D=8, h=9, conf_scale=1.0, one_label=False):
    H, grid_num = GEOM[geom]
    g = torch.Generator().manual_seed(seed)
    rep = torch.randn(B_l + B_u, D, h, h, generator=g, dtype=torch.float64).to(dtype)
    y_l = torch.randint(0, C, (B_l, H, H), generator=g); y_l[:, :3] = 255
    conf = torch.rand(B_u, H, H, generator=g) * conf_scale
    yhat = torch.randint(0, C, (B_u, H, H), generator=g)
    if one_label: y_l[y_l != 255] = 0; yhat[:] = 0
    return rep, y_l, conf, yhat, grid_num


def _run_both(rep, B_l, y_l, conf, yhat, bank, thr, grid_num, max_n, rule, seed=0):
    r1 = rep.detach().clone().requires_grad_(); r2 = rep.detach().clone().requires_grad_()
    b1, b2 = copy.deepcopy(bank), copy.deepcopy(bank)
    if rule == "sync_free":                              # the reference's own rule, same generator
        loss_n, st_n = new_step(r2, B_l, y_l, conf, yhat, b2, thr, grid_num, max_n, 0.1, 255,
                                generator=torch.Generator().manual_seed(seed), sync_free=True)
        loss_r, st_r = ref_step(r1, B_l, y_l, conf, yhat, b1, thr, grid_num, max_n, 0.1, 255,
                                generator=torch.Generator().manual_seed(seed))
    else:                                                # CPU rule: the reference sees exactly the picked pixels
        loss_n, st_n = new_step(r2, B_l, y_l, conf, yhat, b2, thr, grid_num, max_n, 0.1, 255,
                                generator=torch.Generator().manual_seed(seed))
        sel = st_n["pixels_u"]
        conf_ref = torch.zeros_like(conf).flatten(); conf_ref[sel] = 1.0
        loss_r, st_r = ref_step(r1, B_l, y_l, conf_ref.view_as(conf), yhat, b1, 0.5, grid_num, sel.numel(),
                                0.1, 255, generator=torch.Generator().manual_seed(seed))
    (g_r,) = torch.autograd.grad(loss_r, r1); (g_n,) = torch.autograd.grad(loss_n, r2)
    return (loss_r, st_r, g_r, b1), (loss_n, st_n, g_n, b2)


def _check(ref, new, rule, dtype):
    (loss_r, st_r, g_r, b1), (loss_n, st_n, g_n, b2) = ref, new
    atol = 1e-6                                          # float32 or float64 map: both compute L_pro in float32
    assert torch.isfinite(loss_n) and torch.allclose(loss_n, loss_r, atol=atol, rtol=1e-6)
    assert g_n.dtype == g_r.dtype == dtype and g_n.shape == g_r.shape and g_n.is_contiguous()
    assert torch.allclose(g_n, g_r, atol=1e-7, rtol=1e-5), (g_n - g_r).abs().max()
    for k in ("loss_pro_l", "loss_pro_u", "proto_acc_l", "proto_acc_u", "proto_acc"):
        assert torch.allclose(st_n[k], st_r[k], atol=atol, rtol=1e-6), k
    for k in ("n_labeled", "n_unlabeled"): assert int(st_n[k]) == int(st_r[k]), k
    if rule == "sync_free":                              # same rows: the similarities match too
        assert torch.allclose(st_n["sims"], st_r["sims"], atol=1e-6)
    else:                                                # CPU rule: no surplus ignore rows
        n = st_n["labels"].numel()
        assert torch.allclose(st_n["sims"], st_r["sims"][:n], atol=1e-6)
        assert (st_r["labels"] if "labels" in st_r else None) is None   # (the reference returns no rows)
    assert torch.allclose(b2.protos, b1.protos, atol=1e-6, rtol=1e-6)
    assert torch.equal(b2.usage, b1.usage) and torch.equal(b2.valid, b1.valid)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", ["exact", "bilinear"])
@pytest.mark.parametrize("rule", ["sync_free", "cpu"])
def test_matches_todays_chain(dtype, geom, rule):
    rep, y_l, conf, yhat, grid_num = _inputs(geom, dtype, seed={"exact": 0, "bilinear": 1}[geom] + 10 * (rule == "cpu"))
    bank = _bank(5, rep.shape[1], seed=1)
    for max_n in (40, 10**5):                            # cap binding; cap above the confident count
        ref, new = _run_both(rep, 2, y_l, conf, yhat, bank, 0.7, grid_num, max_n, rule)
        _check(ref, new, rule, dtype)
        if max_n == 40: assert new[1]["pixels_u"].numel() == 40 and (new[1]["labels"][-40:] != 255).all()


@pytest.mark.parametrize("rule", ["sync_free", "cpu"])
def test_no_confident_pixel(rule):
    rep, y_l, conf, yhat, grid_num = _inputs("exact", torch.float32, conf_scale=0.5)
    bank = _bank(5, rep.shape[1], seed=2)
    ref, new = _run_both(rep, 2, y_l, conf, yhat, bank, 0.7, grid_num, 40, rule)
    _check(ref, new, rule, torch.float32)
    assert int(new[1]["n_unlabeled"]) == 0 and float(new[1]["loss_pro_u"]) == 0.0
    if rule == "cpu": assert new[1]["pixels_u"].numel() == 0
    ref, new = _run_both(rep, 2, y_l, conf, yhat, bank, 0.7, grid_num, 0, rule)   # max_unlabeled = 0
    _check(ref, new, rule, torch.float32)


@pytest.mark.parametrize("rule", ["sync_free", "cpu"])
def test_one_class_only(rule):
    rep, y_l, conf, yhat, grid_num = _inputs("bilinear", torch.float32, one_label=True)
    for bank in (_bank(5, rep.shape[1], seed=3), _bank(5, rep.shape[1], seed=3, one_class=True)):
        ref, new = _run_both(rep, 2, y_l, conf, yhat, bank, 0.7, grid_num, 40, rule)
        _check(ref, new, rule, torch.float32)
    # only class 0 has prototypes, labels are another class: nothing counts, loss 0, finite zero gradient
    rep, y_l, conf, yhat, grid_num = _inputs("exact", torch.float32)
    y_l[y_l != 255] = 2; yhat[:] = 3
    bank = _bank(5, rep.shape[1], seed=3, one_class=True)
    ref, new = _run_both(rep, 2, y_l, conf, yhat, bank, 0.7, grid_num, 40, rule)
    _check(ref, new, rule, torch.float32)
    assert float(new[0].detach()) == 0.0 and float(new[2].abs().sum()) == 0.0


def test_cpu_rule_draws_confident_pixels_uniformly():
    ok = torch.zeros(2, 7, 7, dtype=torch.bool); ok.view(-1)[torch.tensor([0, 5, 17, 30, 48, 60, 97])] = True
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(ok.numel())
    for _ in range(3000):
        sel, valid = pick_confident(ok, 3, g)
        assert valid.all() and ok.view(-1)[sel].all() and torch.equal(sel, sel.unique())
        hits[sel] += 1
    assert torch.allclose(hits[ok.view(-1)] / 3000, torch.full((7,), 3 / 7), atol=0.04)
    assert hits[~ok.view(-1)].sum() == 0


def test_sync_free_rule_is_todays_pick():
    rep, y_l, conf, yhat, grid_num = _inputs("exact", torch.float32)
    _, lab = _ref_unlabeled_pick(rep[2:], conf, yhat, 0.7, 40, generator=torch.Generator().manual_seed(5))
    sel, valid = pick_confident(conf >= 0.7, 40, torch.Generator().manual_seed(5), sync_free=True)
    assert torch.equal(torch.where(valid, yhat.flatten()[sel], torch.full_like(sel, 255)), lab)


def test_channels_last_map_and_autocast():
    rep, y_l, conf, yhat, grid_num = _inputs("bilinear", torch.float32)
    bank = _bank(5, rep.shape[1], seed=4)
    r1 = rep.clone().requires_grad_()
    r2 = rep.contiguous(memory_format=torch.channels_last).requires_grad_()
    l1, s1 = prototype_step(r1, 2, y_l, conf, yhat, bank, 0.7, grid_num, 40, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l2, s2 = prototype_step(r2, 2, y_l, conf, yhat, bank, 0.7, grid_num, 40, generator=torch.Generator().manual_seed(0))
    assert l2.dtype == torch.float32 and torch.allclose(l1, l2, atol=1e-6)
    (g1,) = torch.autograd.grad(l1, r1); (g2,) = torch.autograd.grad(l2, r2)
    assert g2.is_contiguous(memory_format=torch.channels_last) and torch.allclose(g1, g2, atol=1e-7)
    with pytest.raises(ValueError, match="y_l must be"):
        prototype_step(r1, 3, y_l, conf, yhat, bank, 0.7, grid_num, 40)
