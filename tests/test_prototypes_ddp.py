"""PrototypeBank.ema_update under DDP: two CPU processes (gloo) with different local features.

sync=True: the per-slot sums are all-reduced, so both ranks end with identical prototypes, equal to a
single-process update on the union of the two ranks' pixels. sync=False (official behaviour): each rank
updates from its own pixels only, so the ranks' prototypes differ (and each equals a local update).
"""
import os, tempfile

import pytest
import torch
import torch.distributed as dist

from brpg.prototypes import PrototypeBank

from _ddp import spawn_gloo

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

C, D, MH, ML, N = 5, 16, 3, 3, 200


def _bank():
    g = torch.Generator().manual_seed(0)
    kh = torch.tensor([1, 2, 3, 2, 1]); kl = torch.tensor([2, 1, 3, 3, 1])
    valid = torch.cat([torch.arange(MH)[None] < kh[:, None], torch.arange(ML)[None] < kl[:, None]], 1)
    return PrototypeBank(C, D, MH, ML).set_prototypes(torch.randn(C, MH + ML, D, generator=g) * 2, valid)


def _local_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    feats = torch.randn(N, D, generator=g) * (1 + rank) + rank       # different distributions per rank
    labels = torch.randint(0, C, (N,), generator=g)
    labels[: 10 * (rank + 1)] = 255                                   # some ignored pixels
    if rank == 1: labels[labels == 4] = 0                              # class 4 only on rank 0
    return feats, labels


def _worker(rank, world, out_dir):
    res = {}
    for sync in (True, False):
        bank = _bank()
        feats, labels = _local_data(rank)
        for _ in range(3):                                        # a few steps, so drift accumulates
            bank.ema_update(feats, labels, decay=0.9, sync=sync, fault_weight=2.0)
        res[sync] = {"protos": bank.protos, "usage": bank.usage}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks():
    "Both ranks' results for sync=True and sync=False (one spawn of 2 processes for the whole module)."
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, d, world=2)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sync_true_ranks_identical_and_equal_union(ranks):
    r0, r1 = ranks[0][True], ranks[1][True]
    assert torch.equal(r0["protos"], r1["protos"])
    assert torch.equal(r0["usage"], r1["usage"])
    ref = _bank()
    (f0, l0), (f1, l1) = _local_data(0), _local_data(1)
    for _ in range(3):
        ref.ema_update(torch.cat([f0, f1]), torch.cat([l0, l1]), decay=0.9, sync=False, fault_weight=2.0)
    torch.testing.assert_close(r0["protos"], ref.protos, rtol=1e-5, atol=1e-5)
    assert torch.equal(r0["usage"], ref.usage)
    assert int(r0["usage"].sum()) == int(((l0 != 255).sum() + (l1 != 255).sum()))
    assert not torch.allclose(ref.protos, _bank().protos)              # the update did move prototypes


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sync_false_ranks_drift(ranks):
    r0, r1 = ranks[0][False], ranks[1][False]
    assert not torch.allclose(r0["protos"], r1["protos"])
    for rank, r in enumerate((r0, r1)):                               # each rank = a purely local update
        ref = _bank()
        f, l = _local_data(rank)
        for _ in range(3): ref.ema_update(f, l, decay=0.9, sync=False, fault_weight=2.0)
        torch.testing.assert_close(r["protos"], ref.protos, rtol=1e-5, atol=1e-5)
    # class 4 appears only on rank 0: rank 1 leaves its prototypes at the initial values
    torch.testing.assert_close(r1["protos"][4], _bank().protos[4])
    assert not torch.allclose(r0["protos"][4], _bank().protos[4])
