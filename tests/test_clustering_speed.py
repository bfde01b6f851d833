"""The faster initial clustering (sample-then-refine `batched_kmeans`): inertia against scikit-learn on
clustered data big enough to take the sampled path, determinism, and the NaN/inf guard of the bank."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from brpg.clustering import batched_kmeans
from brpg.config import MethodConfig
from brpg.prototypes import PrototypeBank


def _mixture(G, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(G, N, D)
    for i in range(G):
        nc = int(torch.randint(2, 5, (1,), generator=g))
        cent = torch.randn(nc, D, generator=g) * float(torch.empty(1).uniform_(0.05, 0.5, generator=g))
        lab = torch.multinomial(torch.rand(nc, generator=g) + 0.3, N, replacement=True, generator=g)
        x[i] = cent[lab] + 0.1 * torch.randn(N, D, generator=g) + 2.0
    return x


@pytest.mark.parametrize("seed", range(4))
def test_sampled_path_inertia_within_1pct_of_sklearn(seed):
    x = _mixture(3, 5000, 32, seed)                       # N > sample=2048: seeding/restarts on a sample
    k = torch.tensor([2, 3, 2])
    res = batched_kmeans(x, None, k, seed=seed)
    sk = np.array([KMeans(int(k[i]), n_init=3, random_state=seed).fit(x[i].numpy()).inertia_ for i in range(3)])
    assert res.inertia.double().sum().item() <= 1.01 * sk.sum(), (res.inertia, sk)
    # returned inertia is the true one for the returned centres and labels
    c = res.centers.gather(1, res.labels[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(res.inertia, (x - c).square().sum((1, 2)), rtol=1e-3, atol=1e-2)


def test_sampled_path_masks_and_determinism():
    x = _mixture(4, 5000, 16, 7)
    mask = torch.rand(4, 5000, generator=torch.Generator().manual_seed(0)) < 0.8
    x_garbage = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    r1, r2 = batched_kmeans(x_garbage, mask, 2, seed=3), batched_kmeans(x_garbage, mask, 2, seed=3)
    for f in r1._fields: assert torch.equal(getattr(r1, f), getattr(r2, f)), f
    assert torch.isfinite(r1.centers).all()
    ra = batched_kmeans(x, None, 2, seed=3)               # no mask: the copy-free path, same determinism
    assert torch.equal(ra.centers, batched_kmeans(x, None, 2, seed=3).centers)
    for i in range(4):                                    # batched = one by one on the compacted rows
        one = batched_kmeans(x[i:i + 1, mask[i]], None, 2, seed=3)
        torch.testing.assert_close(r1.centers[i].sort(0).values, one.centers[0].sort(0).values, rtol=1e-4, atol=1e-4)


def test_batched_kmeans_rejects_non_finite_valid_rows():
    x = torch.randn(3, 100, 4); x[2, 5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"group\(s\) \[2\]"):
        batched_kmeans(x, None, 2)


@pytest.mark.parametrize("queue,bad", [("high", float("nan")), ("low", float("inf"))])
def test_bank_init_names_class_and_queue(queue, bad):
    C, Q, D = 4, 60, 8
    hf, lf = torch.randn(C, Q, D), torch.randn(C, Q, D)
    hm = lm = torch.ones(C, Q, dtype=torch.bool)
    (hf if queue == "high" else lf)[2, 7, 3] = bad
    cfg = MethodConfig()
    with pytest.raises(ValueError) as e:
        PrototypeBank.from_config(C, D, cfg).init_from_tensors(hf, hm, lf, lm, cfg)
    msg = str(e.value)
    assert f"class 2 ({queue} queue)" in msg and "\n" not in msg and "class 0" not in msg
