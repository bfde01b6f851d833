"""`method.queue_device` / `method.queue_dtype`: where the CPG queues live and in what precision.

The initial prototypes clustered from half-precision queues must be as good as from float32 ones: the k-means
objective (measured on the float32 rows) within 1 %. A training with host bfloat16 queues runs, resumes exactly
while the queues are live, and bad values get one-line errors naming the key."""
import pytest
import torch

from brpg.config import ConfigError, MethodConfig, apply_overrides
from brpg.methods import QUEUE_DTYPES
from brpg.prototypes import PrototypeBank
from brpg.sampling import ClassQueues
from brpg.testing import synthetic_features, tiny_demo_config
from brpg.trainer import Trainer
from brpg.checkpoint import read_checkpoint

from test_trainer import StopAt, _state, _assert_same


def _objective(bank, x, y):
    "Sum of squared distances of float32 rows to the nearest valid prototype of their class."
    d = torch.cdist(x[:, None], bank.protos[y].float())[:, 0]
    return float(d.masked_fill(~bank.valid[y], float("inf")).min(1).values.square().sum())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_queues_keep_the_initial_prototypes(dtype):
    "21 classes x 2 queues of 1500 rows, 128-d (VOC's class count, smaller queues): objective within 1 % of float32."
    C, D = 21, 128
    m = MethodConfig(queue_len=1500, kmeans_seed=0)
    sf = synthetic_features(C, n=2 * C * 1500, dim=D, seed=3)
    x, y, conf = (torch.from_numpy(sf[k]) for k in ("feats", "labels", "conf"))
    hi = conf >= m.high_threshold
    objective = {}
    for dt in ("float32", dtype):
        q = {k: ClassQueues(C, D, m.queue_len, dtype=QUEUE_DTYPES[dt]) for k in ("high", "low")}
        q["high"].push(x[hi], y[hi]); q["low"].push(x[~hi], y[~hi])
        assert q["high"].buffer.dtype == QUEUE_DTYPES[dt]
        bank = PrototypeBank.from_config(C, D, m)
        bank.init_from_queues(q["high"], q["low"], m)
        assert bool(bank.valid.any(1).all()) and torch.isfinite(bank.protos).all()
        objective[dt] = _objective(bank, x, y)
    assert objective[dtype] <= 1.01 * objective["float32"], objective


def test_queue_storage_is_configured_and_checked():
    cfg = tiny_demo_config("brpg", ["method.queue_device=cpu", "method.queue_dtype=bfloat16"])
    tr = Trainer(cfg)
    q = tr.method.new_queues()
    assert {(v.device.type, v.dtype) for v in q.values()} == {("cpu", torch.bfloat16)}
    # default: the training device, float32
    q = Trainer(tiny_demo_config("brpg")).method.new_queues()
    assert {(v.device.type, v.dtype) for v in q.values()} == {(tr.device.type, torch.float32)}
    for bad, key in (("method.queue_dtype=float64", "method.queue_dtype"), ("method.queue_device=gpu", "method.queue_device")):
        with pytest.raises(ConfigError) as e: apply_overrides(cfg, [bad])
        msg = str(e.value)
        assert key in msg and "\n" not in msg, msg


@pytest.mark.slow
def test_host_bf16_queues_train_and_resume_exactly(tmp_path):
    "8 iterations straight == 3 + stop (queues live, saved in bfloat16) + resume, with cpu/bfloat16 queues."
    cfg = tiny_demo_config("brpg", ["trainer.epochs=4", "method.queue_device=cpu", "method.queue_dtype=bfloat16"])
    straight = Trainer(cfg, out_dir=tmp_path / "a")
    straight.fit()
    assert straight.iteration == 8 and bool(straight.method.bank.initialized)
    assert torch.isfinite(straight.method.bank.protos).all()
    tr = Trainer(cfg, callbacks=[StopAt(3)], out_dir=tmp_path / "b")
    tr.fit()
    ck = read_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["queues"]["high"]["buffer"].dtype == torch.bfloat16
    tr = Trainer(cfg, out_dir=tmp_path / "b", resume=True)
    assert tr.method.queues["high"].dtype == torch.bfloat16 and tr.method.queues["high"].device.type == "cpu"
    tr.fit()
    _assert_same(_state(straight), _state(tr))
