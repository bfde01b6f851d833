"""Initial-clustering benchmark: `brpg.clustering.batched_kmeans` (new) against a verbatim copy of the
previous implementation (`old`, below), on synthetic clustered queues shaped like prototype initialisation:
2C queues (C=21 VOC, C=81 COCO) of 30000x256 float32 features, each a mixture of 2-4 Gaussians, k = 2
(every third queue k = 3, as APO extras). Prints wall time, new/old ratio, and the summed inertia of
old and new over a subset of queues relative to scikit-learn KMeans(n_init=3, random_state=0).

    OMP_NUM_THREADS=2 python benchmarks/clustering.py --scale both [--queues N] [--sk-queues M] [--skip-old] \
        [--device cuda] [--json PATH]
"""
import argparse, time, types
import numpy as np
import torch
from brpg.clustering import batched_kmeans

_OLD_SRC = r'''
# %% ../nbs/05_clustering.ipynb #7fc1d217
from __future__ import annotations
import math
from typing import NamedTuple
import torch
import torch.nn.functional as F

# %% auto #0
__all__ = ['hash_uniform', 'KMeansResult', 'batched_kmeans']

# %% ../nbs/05_clustering.ipynb #466736ec
_M32 = 0xFFFFFFFF

def _mix32(x: torch.Tensor) -> torch.Tensor:
    "Avalanche hash of int64 tensors holding 32-bit values (all products < 2**63)."
    x = x ^ (x >> 16); x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15); x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 13); x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 16)

# %% ../nbs/05_clustering.ipynb #c04a8971
def hash_uniform(seed: int, *keys: torch.Tensor, device=None) -> torch.Tensor:
    "Uniform floats in (0,1), a pure function of `seed` and the (broadcast) integer tensors `keys`."
    h = _mix32(torch.tensor(int(seed) & _M32, dtype=torch.long, device=device))
    for k in keys: h = _mix32((h ^ (k.to(torch.long) & _M32)) & _M32)
    return ((h >> 8).float() + 0.5) / 2.0 ** 24

# %% ../nbs/05_clustering.ipynb #81b1d558
class KMeansResult(NamedTuple):
    centers: torch.Tensor      # [G, kmax, D] (input dtype); invalid slots are 0
    center_mask: torch.Tensor  # bool [G, kmax]: slot j < k_eff(g) = min(k(g), n_valid(g))
    labels: torch.Tensor       # long [G, N]: centre index per row, -1 for masked rows
    inertia: torch.Tensor      # [G] float32: sum of squared distances of valid rows to their centre

# %% ../nbs/05_clustering.ipynb #7c5d8d8b
def _sqdist(x, xx, c):
    "Squared distances `[G, N, M]` between rows `x[G,N,D]` (norms `xx[G,N]`) and centres `c[G,M,D]`."
    d = torch.baddbmm(xx[:, :, None], x, c.transpose(1, 2), alpha=-2.0)
    return (d + (c * c).sum(-1)[:, None, :]).clamp_min_(0)

# %% ../nbs/05_clustering.ipynb #dc8d24fa
def _n_trials(k: torch.Tensor) -> torch.Tensor:
    "Local trials of greedy k-means++ per group, as scikit-learn: 2 + floor(ln k)."
    return 2 + torch.log(k.clamp_min(1).float()).floor().long()   # ln k is never an integer for k > 1

# %% ../nbs/05_clustering.ipynb #80476fe7
def _kmeanspp(x, xx, valid, R, K, seed, k=None):
    """Greedy k-means++ for every (group, restart): centre row indices `[G, R, K]`.
    `k long[G]` (default K) sets each group's number of local trials, so a group's picks do not depend on kmax."""
    G, N, D = x.shape
    dev, vf = x.device, valid.float()
    Lg = _n_trials(torch.full((G,), K, device=dev) if k is None else k.to(dev))
    L = int(Lg.max())
    r_ar, l_ar = torch.arange(R, device=dev), torch.arange(L, device=dev)
    # first centre: the ceil(u·n_valid)-th valid row; depends only on the order of the valid rows, so
    # compacting away masked rows does not change it
    u0 = hash_uniform(seed, r_ar, torch.zeros(1, dtype=torch.long, device=dev), device=dev)           # [R]
    cs0 = torch.cumsum(vf, -1)                                                                       # [G,N]
    first = torch.searchsorted(cs0.contiguous(), (u0[None] * cs0[:, -1:]).contiguous()).clamp_(max=N - 1)  # [G,R]
    idx = [first]
    c0 = torch.gather(x, 1, first[:, :, None].expand(G, R, D))                                     # [G,R,D]
    closest = _sqdist(x, xx, c0) * vf[:, :, None]                                                   # [G,N,R]
    for j in range(1, K):
        w = closest.transpose(1, 2)                                                                 # [G,R,N]
        tot = w.sum(-1, keepdim=True)
        w = torch.where(tot > 0, w, vf[:, None, :].expand_as(w))   # all remaining mass 0 (duplicates): uniform
        cs = torch.cumsum(w, -1)
        uj = hash_uniform(seed, r_ar[:, None], torch.full((1, 1), j, dtype=torch.long, device=dev), l_ar[None], device=dev)
        cand = torch.searchsorted(cs.contiguous(), (uj[None] * cs[..., -1:]).contiguous()).clamp_(max=N - 1)  # [G,R,L]
        cx = torch.gather(x, 1, cand.reshape(G, R * L, 1).expand(G, R * L, D))
        dist = _sqdist(x, xx, cx).view(G, N, R, L)
        newc = torch.minimum(closest[..., None], dist) * vf[:, :, None, None]
        pot = newc.sum(1).masked_fill(l_ar[None, None] >= Lg[:, None, None], float("inf"))          # [G,R,L]
        best = pot.argmin(-1)                                                                       # [G,R]
        idx.append(torch.gather(cand, 2, best[..., None])[..., 0])
        closest = torch.gather(newc, 3, best[:, None, :, None].expand(G, N, R, 1))[..., 0]
    return torch.stack(idx, -1)

# %% ../nbs/05_clustering.ipynb #16788135
def _assign(x, xx, valid, c, slot_ok):
    "Nearest valid slot per row and restart: `(dmin[G,N,R], lab[G,N,R])`, dmin 0 on masked rows."
    G, R, K, D = c.shape
    d = _sqdist(x, xx, c.reshape(G, R * K, D)).view(G, -1, R, K)
    d = d.masked_fill(~slot_ok[:, None, None, :], float("inf"))
    dmin, lab = d.min(-1)
    return torch.where(valid[:, :, None], dmin, torch.zeros_like(dmin)), lab

# %% ../nbs/05_clustering.ipynb #ba46645e
def _lloyd(x, xx, valid, c, slot_ok, iters, tol, check_every):
    "Lloyd iterations on centres `c[G,R,K,D]`; a (group, restart) freezes once its inertia change <= tol."
    G, R, K, D = c.shape
    N = x.shape[1]
    vf = valid.float()
    done = torch.zeros(G, R, dtype=torch.bool, device=x.device)
    prev = torch.full((G, R), float("inf"), device=x.device)
    for it in range(iters):
        dmin, lab = _assign(x, xx, valid, c, slot_ok)
        inertia = dmin.sum(1)
        if it > 0: done = done | ((prev - inertia).abs() <= tol * prev)
        onehot = F.one_hot(lab, K).to(x.dtype) * vf[:, :, None, None]                  # [G,N,R,K]
        onehot = onehot.view(G, N, R * K)
        sums = torch.bmm(onehot.transpose(1, 2), x).view(G, R, K, D)
        counts = onehot.sum(1).view(G, R, K)
        newc = sums / counts.clamp_min(1)[..., None]
        empty = (counts == 0) & slot_ok[:, None, :]
        # empty cluster -> re-seed at the farthest valid points (j-th empty slot <- j-th farthest point)
        kk = min(K, N)
        far = torch.where(valid[:, :, None], dmin, torch.full_like(dmin, -1.0)).transpose(1, 2).topk(kk, -1).indices
        rank = (torch.cumsum(empty.long(), -1) - 1).clamp(0, kk - 1)
        pick = torch.gather(far, 2, rank)                                                # [G,R,K]
        px = torch.gather(x, 1, pick.view(G, R * K, 1).expand(G, R * K, D)).view(G, R, K, D)
        newc = torch.where(empty[..., None], px, newc)
        c = torch.where(done[:, :, None, None], c, newc)
        prev = inertia
        if check_every and (it + 1) % check_every == 0 and bool(done.all()): break
    return c

# %% ../nbs/05_clustering.ipynb #732e72f1
def batched_kmeans(x: torch.Tensor, mask: torch.Tensor | None = None, k=2, restarts: int = 3, iters: int = 100,
                   tol: float = 1e-4, seed: int = 0, init: torch.Tensor | None = None, check_every: int | None = None,
                   chunk_elems: int = 2 ** 27, dtype=torch.float32) -> KMeansResult:
    """k-means on every group of `x[G,N,D]` at once. `mask bool[G,N]` marks valid rows (None = all);
    `k` is an int or `long[G]` (per-group; kmax = max k). Greedy k-means++ init from a counter-based
    RNG keyed by `seed` (or given `init[G,kmax,D]` centres, then restarts=1), `restarts` runs keeping the
    lowest inertia per group, at most `iters` Lloyd steps, stop when the relative inertia change <= `tol`.
    Groups with fewer than k valid rows get `min(k, n_valid)` centres (the rest invalid in `center_mask`).
    `check_every`: iterations between the (host-syncing) all-converged tests; None = 1 on CPU, 4 elsewhere."""
    if x.ndim != 3: raise ValueError(f"batched_kmeans: x must be [G, N, D], got shape {tuple(x.shape)}")
    G, N, D = x.shape
    dev = x.device
    if mask is None: mask = torch.ones(G, N, dtype=torch.bool, device=dev)
    if mask.shape != (G, N): raise ValueError(f"batched_kmeans: mask must be [{G}, {N}], got {tuple(mask.shape)}")
    mask = mask.to(dev, torch.bool)
    kt = torch.as_tensor(k, dtype=torch.long, device=dev)
    if kt.ndim == 0: kt = kt.expand(G)
    if kt.shape != (G,): raise ValueError(f"batched_kmeans: k must be an int or long[{G}], got shape {tuple(kt.shape)}")
    K = int(kt.max()) if G else 0
    if G and int(kt.min()) < 0: raise ValueError(f"batched_kmeans: k must be >= 0, got {kt.tolist()}")
    if restarts < 1 or iters < 0: raise ValueError(f"batched_kmeans: need restarts >= 1 and iters >= 0, got {restarts}, {iters}")
    if init is not None:
        if init.shape != (G, K, D): raise ValueError(f"batched_kmeans: init must be [{G}, {K}, {D}], got {tuple(init.shape)}")
        restarts = 1
    centers = torch.zeros(G, K, D, dtype=x.dtype, device=dev)
    labels = torch.full((G, N), -1, dtype=torch.long, device=dev)
    inertia = torch.zeros(G, dtype=torch.float32, device=dev)
    n_valid = mask.sum(1)
    keff = torch.minimum(kt, n_valid)
    center_mask = torch.arange(K, device=dev)[None] < keff[:, None]
    if G == 0 or K == 0 or N == 0: return KMeansResult(centers, center_mask, labels, inertia)
    R = restarts
    if check_every is None: check_every = 1 if dev.type == "cpu" else 4
    L = int(_n_trials(kt).max())
    per_group = N * (D + 4 * R * max(K, L)) + R * K * D
    step = max(1, int(chunk_elems // per_group))
    for s in range(0, G, step):
        sl = slice(s, min(G, s + step))
        v = mask[sl]
        # centre each group on its mean; masked rows become exact zeros (whatever they held, NaN included).
        xc = x[sl].to(dtype, copy=True).masked_fill_(~v[..., None], 0)
        mean = xc.sum(1) / v.sum(1).clamp_min(1)[:, None].to(dtype)
        xc.sub_(mean[:, None]).masked_fill_(~v[..., None], 0)
        xx = torch.linalg.vector_norm(xc, dim=-1).square_()
        g = xc.shape[0]
        slot_ok = center_mask[sl]
        if init is None:
            idx = _kmeanspp(xc, xx, v, R, K, seed, kt[sl])                               # [g,R,K]
            c = torch.gather(xc, 1, idx.view(g, R * K, 1).expand(g, R * K, D)).view(g, R, K, D)
        else:
            c = (init[sl].to(dev, dtype) - mean[:, None])[:, None]
        c = _lloyd(xc, xx, v, c, slot_ok, iters, tol, check_every)
        dmin, lab = _assign(xc, xx, v, c, slot_ok)
        best = dmin.sum(1).argmin(-1)                                                    # [g]
        cb = c[torch.arange(g, device=dev), best]                                        # [g,K,D]
        lb = torch.gather(lab, 2, best[:, None, None].expand(g, N, 1))[..., 0]
        inertia[sl] = torch.gather(dmin, 2, best[:, None, None].expand(g, N, 1))[..., 0].sum(1).float()
        labels[sl] = torch.where(v, lb, torch.full_like(lb, -1))
        centers[sl] = torch.where(slot_ok[..., None], cb + mean[:, None], torch.zeros_like(cb)).to(x.dtype)
    return KMeansResult(centers, center_mask, labels, inertia)
'''
old = types.ModuleType("old_clustering")
exec(compile(_OLD_SRC, "old_clustering", "exec"), old.__dict__)


def make_queues(G, Q=30000, D=256, seed=0):
    "G queues [G,Q,D] float32: mixtures of 2-4 Gaussians (random spread, weights, offset); k per queue."
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(G, Q, D)
    for i in range(G):
        nc = int(torch.randint(2, 5, (1,), generator=g))
        cent = torch.randn(nc, D, generator=g) * float(torch.empty(1).uniform_(0.03, 0.3, generator=g))
        lab = torch.multinomial(torch.rand(nc, generator=g) + 0.3, Q, replacement=True, generator=g)
        x[i] = cent[lab] + 0.1 * torch.randn(Q, D, generator=g) + 0.5 * torch.rand(D, generator=g)
    k = torch.full((G,), 2, dtype=torch.long); k[::3] = 3
    return x, k


def _sync(): torch.cuda.synchronize() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def timed(f, *a, **kw):
    _sync(); t = time.perf_counter(); r = f(*a, **kw); _sync(); return r, time.perf_counter() - t


def run(scale, n_queues, sk_queues, skip_old, device="cpu"):
    from sklearn.cluster import KMeans
    G = {"voc": 42, "coco": 162}[scale] if n_queues is None else n_queues
    x, k = make_queues(G, seed={"voc": 0, "coco": 1}[scale])
    x, k = x.to(device), k.to(device)
    for f in (batched_kmeans, old.batched_kmeans): f(x[:1, :3000], None, 2)   # warm-up (threads, allocator)
    new, t_new = timed(batched_kmeans, x, None, k)
    ref, t_old = (None, float("nan")) if skip_old else timed(old.batched_kmeans, x, None, k)
    m = min(sk_queues, G)
    sk = np.array([KMeans(int(k[i]), n_init=3, random_state=0).fit(x[i].cpu().numpy()).inertia_ for i in range(m)])
    r_new = new.inertia[:m].double().sum().item() / sk.sum()
    r_old = float("nan") if ref is None else ref.inertia[:m].double().sum().item() / sk.sum()
    worst = (new.inertia[:m].double().cpu().numpy() / sk).max()
    return dict(scale=scale, device=str(x.device), queues=f"{G}x30000x256", old_s=t_old, new_s=t_new, ratio=t_new / t_old,
                sk=f"{m} queues", inertia_old=r_old, inertia_new=r_new, worst_new=worst)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["voc", "coco", "both"], default="voc")
    ap.add_argument("--queues", type=int, default=None, help="cluster only the first N of the 2C queues")
    ap.add_argument("--sk-queues", type=int, default=6, help="queues compared against scikit-learn (slow)")
    ap.add_argument("--skip-old", action="store_true", help="time only the new implementation")
    ap.add_argument("--device", default="cpu", help="device of the queues and the k-means (cpu, cuda, cuda:N)")
    ap.add_argument("--json", help="also write the result rows to this JSON file")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 queues, k=2 (every 3rd k=3)")
    hdr = ("scale", "queues", "old_s", "new_s", "ratio", "sk", "inertia_old", "inertia_new", "worst_new")
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    rows = []
    for s in (["voc", "coco"] if a.scale == "both" else [a.scale]):
        r = run(s, a.queues, a.sk_queues, a.skip_old, a.device); rows.append(r)
        print("| " + " | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in hdr) + " |", flush=True)
    print("inertia_* = summed inertia / summed sklearn KMeans(n_init=3) inertia over the sk queues; worst_new = worst single queue")
    if a.json:
        import json
        with open(a.json, "w") as f: json.dump([{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()} for r in rows], f, indent=2)
