"""brpg.sampling beyond the notebook: 2-process DDP gathering into identical queues, full VOC-size
geometry (513 crop / 129 map) for the grid and the unlabeled pick, wide randomised queue checks,
and the same checks on CUDA when one is present."""
import collections

import pytest
import torch
import torch.nn.functional as F

from brpg.sampling import (ClassQueues, all_gather_rows, labeled_candidates, labeled_grid, queue_candidates,
                           unlabeled_candidates, unlabeled_pick)

from _ddp import spawn_gloo

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ddp_worker(rank, world, out_dir):
    torch.manual_seed(100 + rank)              # different data on each rank
    C, D = 5, 8
    high = ClassQueues(C, D, 40)
    gen = torch.Generator().manual_seed(rank)
    for step in range(4):
        pred, rep = torch.randn(2, C, 9, 9) * 4, torch.randn(2, D, 9, 9)
        gt = pred.argmax(1).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :33, :33]
        n_rows = 3 + rank * 7 + step          # unequal row counts across ranks
        hf, hl, hc, *_ = queue_candidates(labeled_candidates(pred, rep, gt), None, 1, n_rows, generator=gen)
        mine = (hf.clone(), hl.clone(), hc.clone())
        hf, hl, hc = all_gather_rows(hf, hl, hc)
        high.push(hf, hl, hc)
        torch.save({"mine": mine, "gathered": (hf, hl, hc)}, f"{out_dir}/step{step}_rank{rank}.pt")
    torch.save(high.state_dict(), f"{out_dir}/queues_rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_all_gather_rows_gives_identical_queues(tmp_path):
    world = 2
    spawn_gloo(_ddp_worker, str(tmp_path), world=world)
    q = [torch.load(tmp_path / f"queues_rank{r}.pt") for r in range(world)]
    for k in ("buffer", "conf", "ptr", "counts"):
        assert torch.equal(q[0][k], q[1][k]), k
    assert int(q[0]["counts"].sum()) > 0
    for step in range(4):
        s = [torch.load(tmp_path / f"step{step}_rank{r}.pt") for r in range(world)]
        for i in range(3):   # gathered = rank 0 rows then rank 1 rows, unequal sizes preserved
            assert torch.equal(s[0]["gathered"][i], torch.cat([s[0]["mine"][i], s[1]["mine"][i]]))
        assert s[0]["mine"][0].shape[0] != s[1]["mine"][0].shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_queues_random_against_deques(device):
    g = torch.Generator().manual_seed(0)
    for C, D, Q in [(1, 1, 1), (3, 2, 1), (7, 4, 13), (21, 3, 50)]:
        q = ClassQueues(C, D, Q, device=device)
        ref = [collections.deque(maxlen=Q) for _ in range(C)]
        for _ in range(25):
            n = int(torch.randint(0, 4 * Q * C + 2, (1,), generator=g))
            f = torch.randn(n, D, generator=g)
            lab = torch.randint(-2, C + 3, (n,), generator=g)
            q.push(f.to(device), lab.to(device))
            for i in range(n):
                if 0 <= lab[i] < C: ref[int(lab[i])].append(f[i])
            assert q.counts.tolist() == [len(r) for r in ref]
            for c in range(C):
                got = q.get(c).cpu()
                want = torch.stack(list(ref[c])) if ref[c] else torch.zeros(0, D)
                assert torch.equal(got, want), (C, D, Q, c)
            assert q.buffer.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_voc_geometry_grid_and_pick(device):
    "513 crop, 129 stride-4 map: grid indexes the map exactly; pick equals upsample+gather (small D)."
    torch.manual_seed(0)
    B, D, h, H = 2, 4, 129, 513
    rep = torch.randn(B, D, h, h, device=device, requires_grad=True)
    gt = torch.randint(0, 21, (B, H, H), device=device)
    up = F.interpolate(rep, size=(H, H), mode="bilinear", align_corners=True)
    f, l = labeled_grid(rep, gt, 32)
    rows = list(range(0, 32 * 16, 16)) + [512]
    assert torch.equal(f, up[:, :, rows][:, :, :, rows].permute(0, 2, 3, 1).reshape(-1, D))
    assert torch.equal(l, gt[:, rows][:, :, rows].reshape(-1))
    conf = torch.rand(B, H, H, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    pf, pl = unlabeled_pick(rep, conf, gt, 0.9, B * 1000, generator=gen)
    assert pf.shape == (B * 1000, D) and (pl != 255).all()
    # recover the picked pixels: redo the key draw
    keys = torch.rand(B * H * H, generator=torch.Generator(device=device).manual_seed(0), device=device)
    keys = torch.where(conf.flatten() >= 0.9, keys, torch.full_like(keys, 2.0))
    sel = keys.topk(B * 1000, largest=False).indices.sort().values
    ref = up.permute(0, 2, 3, 1).reshape(-1, D)[sel]
    assert torch.allclose(pf, ref, atol=1e-6)
    assert torch.equal(pl, gt.flatten()[sel]) and (conf.flatten()[sel] >= 0.9).all()
    g1, = torch.autograd.grad(pf.sum(), rep, retain_graph=True)
    g2, = torch.autograd.grad(ref.sum(), rep)
    assert torch.allclose(g1, g2, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_voc_size(device):
    "A VOC-size sampling step (B=4, 129x129, D=32): caps respected, everything stays on the device."
    torch.manual_seed(0)
    B, C, D, h = 4, 21, 32, 129
    pred = torch.randn(B, C, h, h, device=device) * 6
    rep = torch.randn(B, D, h, h, device=device)
    gt = pred.argmax(1).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :513, :513]
    lab = labeled_candidates(pred, rep, gt, 0.8)
    unl = unlabeled_candidates(torch.softmax(torch.randn(B, C, h, h, device=device) * 6, 1), rep, 0.8)
    hf, hl, hc, lf, ll, lc = queue_candidates(lab, unl, B, 5000)
    assert hf.shape[0] == min(5000 * 2 * B, lab[0].shape[0] + unl[0].shape[0]) and lf.shape[0] <= 5000 * B
    high = ClassQueues(C, D, 30000, device=device, dtype=torch.float16)
    high.push(hf, hl, hc)
    assert int(high.counts.sum()) == hf.shape[0]
    assert all(t.device.type == device for t in (hf, hl, hc, lf, ll, lc, high.buffer))
    # every stored row is a real candidate of its class
    c = int(hl[0]); got = high.get(c).float()
    assert torch.allclose(got, hf[hl == c].half().float())
