"""Queue storage (`method.queue_dtype`, `method.queue_device`) at VOC / COCO scale: memory and prototype quality.

For each storage dtype: the bytes the 2 x C x Q x D queues take, the time of the initial APO + k-means
(`PrototypeBank.init_from_queues`, on this process's device), and the k-means objective of the resulting
prototypes measured on the float32 rows (sum over rows of the squared distance to the nearest prototype of the
row's class), as a ratio to float32's. The rows are synthetic clustered features (`brpg.testing`), pushed once
into float32 queues and once into each half-precision queue. Nothing is asserted (tests/test_queue_storage.py
checks the 1 % bound at a smaller size).

    OMP_NUM_THREADS=2 python benchmarks/queue_storage.py --scale voc --queue-len 30000
    python benchmarks/queue_storage.py --scale both --device cuda
"""
import argparse, time

import torch

from brpg.config import MethodConfig
from brpg.methods import QUEUE_DTYPES
from brpg.prototypes import PrototypeBank
from brpg.sampling import ClassQueues
from brpg.testing import synthetic_features

SCALES = {"voc": 21, "coco": 81}


def objective(bank, x, y, block=65536):
    "k-means objective of `bank` on float32 rows `x` with classes `y`, in row blocks."
    tot = 0.0
    for a in range(0, len(x), block):
        xb, yb = x[a:a + block], y[a:a + block]
        d = ((xb[:, None] - bank.protos[yb].float()) ** 2).sum(-1).masked_fill(~bank.valid[yb], float("inf"))
        tot += float(d.min(1).values.sum())
    return tot


def run(C, Q, D, device, seed):
    m = MethodConfig(queue_len=Q, kmeans_seed=seed)
    sf = synthetic_features(C, n=2 * C * Q, dim=D, seed=seed)
    x, y, conf = (torch.from_numpy(sf[k]).to(device) for k in ("feats", "labels", "conf"))
    hi = conf >= m.high_threshold
    rows = {}
    for dt in ("float32", "bfloat16", "float16"):
        q = {k: ClassQueues(C, D, Q, device=device, dtype=QUEUE_DTYPES[dt]) for k in ("high", "low")}
        q["high"].push(x[hi], y[hi]); q["low"].push(x[~hi], y[~hi])
        nbytes = sum(v._feats.numel() * v._feats.element_size() for v in q.values())
        bank = PrototypeBank.from_config(C, D, m).to(device)
        if device.type == "cuda": torch.cuda.synchronize()
        t = time.perf_counter()
        bank.init_from_queues(q["high"], q["low"], m)
        if device.type == "cuda": torch.cuda.synchronize()
        rows[dt] = (nbytes / 2 ** 20, time.perf_counter() - t, objective(bank, x, y))
        del q
    ref = rows["float32"][2]
    for dt, (mib, s, obj) in rows.items():
        print(f"C={C:3d} Q={Q} D={D} {dt:9s} queues {mib:8.1f} MiB  init {s:6.2f} s  objective/float32 {obj / ref:.5f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("voc", "coco", "both"), default="voc")
    ap.add_argument("--queue-len", type=int, default=30000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for s in (("voc", "coco") if a.scale == "both" else (a.scale,)):
        run(SCALES[s], a.queue_len, a.dim, torch.device(a.device), a.seed)


if __name__ == "__main__":
    main()
