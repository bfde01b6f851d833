"""Python-level tests of brpg.views: widget values change the plotted data (asserted on the matplotlib
artists), and the dashboard follows trainer events (synthetic event source and the real Trainer)."""
import json, threading, time

import numpy as np
import pytest
import torch

from brpg.testing import SyntheticBank, SyntheticTrainer, synthetic_features
from brpg.views import (BankSnapshot, ConfidenceStatsView, DriftRecorder, FeatureSpaceView, PrototypeDriftView,
                        TrainingDashboard, confidence_stats, from_checkpoint, open_run, project_2d, read_metrics,
                        snapshot_bank)


@pytest.fixture(scope="module")
def syn():
    return synthetic_features(5, 1500, 32, seed=1)


@pytest.fixture
def bank(syn):
    return SyntheticBank(syn["feats"], syn["labels"], syn["conf"], added_classes=(2,))


@pytest.fixture
def fv(syn, bank):
    return FeatureSpaceView(**syn, bank=bank, sample_size=1000, threshold=0.8)


def n_pts(art): return len(art.get_offsets())


# ---- FeatureSpaceView ------------------------------------------------------------------------------------

def test_threshold_slider_resplits_points_without_reprojecting(fv, syn):
    emb, key, renders = fv._emb.copy(), fv._proj_key, fv.renders
    conf = syn["conf"][fv._idx]
    assert n_pts(fv.artists["high"]) == (conf >= 0.8).sum() and n_pts(fv.artists["low"]) == (conf < 0.8).sum()
    png0 = fv.image.value
    fv.threshold.value = 0.55
    assert fv._proj_key == key and np.array_equal(fv._emb, emb)          # same projection
    np.testing.assert_allclose(fv.artists["high"].get_offsets(), emb[conf >= 0.55])
    np.testing.assert_allclose(fv.artists["low"].get_offsets(), emb[conf < 0.55])
    assert n_pts(fv.artists["high"]) > (conf >= 0.8).sum()
    assert fv.renders == renders + 1 and fv.image.value != png0            # the shown PNG changed


def test_class_filter_hides_points_and_prototypes(fv, syn, bank):
    y = syn["labels"][fv._idx]
    fv.classes.value = (2,)
    assert n_pts(fv.artists["high"]) + n_pts(fv.artists["low"]) == (y == 2).sum()
    np.testing.assert_allclose(np.concatenate([fv.artists["high"].get_offsets(), fv.artists["low"].get_offsets()]).mean(0),
                               fv._emb[y == 2].mean(0), rtol=1e-6, atol=1e-9)
    v = bank.valid[2]
    assert n_pts(fv.artists["proto_high"]) == (v & bank.is_high[2]).sum()
    assert n_pts(fv.artists["proto_low"]) == (v & ~bank.is_high[2]).sum()
    assert n_pts(fv.artists["proto_added"]) == 2                            # class 2 has the APO slots
    fv.classes.value = (0, 1)
    assert n_pts(fv.artists["proto_added"]) == 0
    fv.classes.value = ()
    assert n_pts(fv.artists["high"]) + n_pts(fv.artists["low"]) + n_pts(fv.artists["proto_high"]) == 0


def test_sample_size_slider_reprojects(fv, syn):
    fv.sample_size.value = 400
    assert n_pts(fv.artists["high"]) + n_pts(fv.artists["low"]) == 400 and len(fv._idx) == 400
    assert fv.ax.get_title().startswith("PCA of 400 class-balanced features")
    fv.sample_size.value = 5000                                              # more than N: all rows
    assert n_pts(fv.artists["high"]) + n_pts(fv.artists["low"]) == len(syn["labels"])

# the projection-method switch (PCA <-> UMAP) is tested in test_views_umap.py: UMAP's first fit compiles
# numba code (~7 s idle, ~30 s on a loaded 2-core machine)


def test_projection_fits_features_and_prototypes_together(fv, syn, bank):
    snap = snapshot_bank(bank)
    X = np.concatenate([syn["feats"][fv._idx], snap.protos[snap.valid]])
    np.testing.assert_allclose(np.concatenate([fv._emb, fv._emb_protos]), project_2d(X, "pca"), atol=1e-9)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="labels"): FeatureSpaceView(np.zeros((5, 3)), np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="not one of"): FeatureSpaceView(method="tsne")
    with pytest.raises(KeyError, match="run.pt: no prototype bank"): snapshot_bank({"w": torch.zeros(2)}, where="run.pt")


# ---- confidence statistics ---------------------------------------------------------------------------------

def test_confidence_stats_against_brute_force(syn):
    f, y, c = syn["feats"], syn["labels"], syn["conf"]
    st = confidence_stats(f, y, c, 0.7)
    for k in range(5):
        m = y == k
        centre = f[m].mean(0)
        cos = f[m] @ centre / (np.linalg.norm(f[m], axis=1) * np.linalg.norm(centre))
        np.testing.assert_allclose(st["sim_high"][k], cos[c[m] >= 0.7].mean(), rtol=1e-5)
        np.testing.assert_allclose(st["sim_low"][k], cos[c[m] < 0.7].mean(), rtol=1e-5)
        assert st["hist"][k].sum() == m.sum()


def test_confidence_view_follows_threshold(syn):
    cv = ConfidenceStatsView(**syn)
    h = lambda: np.array([b.get_height() for b in cv.artists["bars_low"]])
    np.testing.assert_allclose(h(), confidence_stats(**syn, threshold=0.8)["sim_low"], rtol=1e-6)
    cv.threshold.value = 0.5
    np.testing.assert_allclose(h(), confidence_stats(**syn, threshold=0.5)["sim_low"], rtol=1e-6)
    cv.bins.value = 10
    assert len(cv.artists["hist"][0]) == 10


# ---- prototype drift ------------------------------------------------------------------------------------------

def test_drift_recorder_matches_direct_cosine(syn):
    b = SyntheticBank(syn["feats"], syn["labels"], syn["conf"])
    rec = DriftRecorder(); rec.reset(b)
    init = b.protos.clone(); prev = []
    for it in range(4):
        prev.append(b.protos.clone())
        b.drift(syn["feats"][it * 100:(it + 1) * 100], syn["labels"][it * 100:(it + 1) * 100], decay=0.8)
        rec.record(it + 1, b)
    assert len(rec._pending) == 4                          # kept on the device until a view asks
    h = rec.history()
    cos = lambda a, c: 1 - torch.nn.functional.cosine_similarity(a, c, dim=-1).numpy()
    v = h["valid"]
    np.testing.assert_allclose(h["from_init"][-1][v], cos(b.protos, init)[v], atol=1e-5)
    np.testing.assert_allclose(h["step"][-1][v], cos(b.protos, prev[-1])[v], atol=1e-5)
    assert h["usage_sum"].sum() == 400 and list(h["iterations"]) == [1, 2, 3, 4]


def test_drift_view_class_dropdown_and_scale(syn):
    b = SyntheticBank(syn["feats"], syn["labels"], syn["conf"], added_classes=(3,))
    rec = DriftRecorder(); rec.reset(b)
    for it in range(6):
        b.drift(syn["feats"][it * 100:(it + 1) * 100], syn["labels"][it * 100:(it + 1) * 100], decay=0.8); rec.record(it, b)
    dv = PrototypeDriftView(rec)
    h = rec.history()
    dv.cls.value = 3
    assert set(dv.artists["from_init"]) == set(np.nonzero(h["valid"][3])[0])
    for s, line in dv.artists["from_init"].items(): np.testing.assert_allclose(line.get_ydata(), h["from_init"][:, 3, s])
    assert sorted(l.get_linewidth() for l in dv.artists["from_init"].values())[-2:] == [2.6, 2.6]   # APO slots
    share = np.array([p.get_height() for p in dv.artists["usage"]])
    np.testing.assert_allclose(share.sum(), 1.0)
    dv.yscale.value = "log"
    assert dv.fig.axes[0].get_yscale() == "log"


# ---- dashboard ---------------------------------------------------------------------------------------------------

def test_dashboard_updates_live_from_background_trainer():
    tr = SyntheticTrainer(iters=250, view_every=25, val_every=50, init_at=10, step_seconds=0.004)
    dash = TrainingDashboard(tr, class_names=tr.class_names, interval=0.1, feature_interval=0.2, max_duty=1.0)
    seen = []
    dash.curves.image.observe(lambda ch: seen.append((dash.state, len(dash.curves.artists["loss"]["loss"].get_xdata()))), "value")
    dash.run()
    assert dash.thread.is_alive()                                   # run() returns while training goes on
    dash.join(timeout=60)
    assert dash.state == "finished" and dash.exception is None
    live = [n for s, n in seen if s == "running"]
    assert len(live) >= 2 and live == sorted(live) and live[-1] < 250, seen   # redrawn during training, growing
    assert dash.curves.artists["loss"]["loss"].get_xdata()[-1] == 250
    assert list(dash.curves.artists["val"]["miou"].get_xdata()) == [50, 100, 150, 200, 250]
    dash.redraw(all_views=True)
    assert n_pts(dash.features.artists["high"]) + n_pts(dash.features.artists["low"]) == 1500
    assert dash.recorder.history()["iterations"][-1] == 250
    assert dash.event_seconds < 2.0


def test_dashboard_throttles_redraws():
    tr = SyntheticTrainer(iters=400, view_every=5, val_every=20, init_at=5, step_seconds=0.002)
    dash = TrainingDashboard(tr, interval=0.5, feature_interval=5.0, max_duty=1.0)
    t0 = time.perf_counter(); dash.run(block=True); el = time.perf_counter() - t0
    assert dash.draws <= el / 0.5 + 2, (dash.draws, el)             # not one redraw per event
    assert dash.features.renders <= el / 5.0 + 2                      # projection at most every feature_interval


def test_dashboard_drawing_duty_cycle_is_bounded():
    tr = SyntheticTrainer(iters=600, view_every=5, val_every=20, init_at=5, step_seconds=0.004)
    dash = TrainingDashboard(tr, interval=0.01, feature_interval=0.0, max_duty=0.1)   # wants to draw constantly
    dash.run()
    dash.tabs.selected_index = 2                                      # the drift tab: redrawn on every update
    t0 = time.perf_counter(); dash.join(timeout=60); el = time.perf_counter() - t0
    per_draw = dash.draw_seconds / max(dash.draws, 1)
    # drawing stays near max_duty of the wall time (+ the first and the final draw)
    assert dash.draw_seconds <= 0.1 * el + 3 * per_draw + 0.2, (dash.draw_seconds, el, dash.draws)


def test_stop_button_stops_cleanly_with_checkpoint(tmp_path):
    tr = SyntheticTrainer(iters=10**6, step_seconds=0.001, out_dir=tmp_path, init_at=5)
    dash = TrainingDashboard(tr, interval=0.2)
    dash.run()
    while tr.iteration < 30: time.sleep(0.01)
    dash.stop_button.click()
    dash.join(timeout=30)
    assert not dash.thread.is_alive() and dash.state == "stopped" and tr.iteration < tr.iters
    assert (tmp_path / "last.pt").exists() and (tmp_path / "views_state.npz").exists()
    assert dash.stop_button.disabled


def test_open_run_roundtrip_and_errors(tmp_path):
    tr = SyntheticTrainer(iters=60, view_every=20, val_every=30, init_at=10, out_dir=tmp_path)
    live = TrainingDashboard(tr, class_names=["a", "b", "c", "d", "e"]); tr.fit()
    od = open_run(tmp_path)
    assert od.class_names == ["a", "b", "c", "d", "e"]
    assert list(od.curves.artists["val"]["miou"].get_xdata()) == [30, 60]
    np.testing.assert_allclose(od.drift.history()["from_init"], live.recorder.history()["from_init"])
    assert n_pts(od.features.artists["proto_added"]) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"): open_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="best.pt not found"): open_run(tmp_path, "best.pt")
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"): read_metrics(tmp_path / "metrics.jsonl")
    torch.save({"iteration": 3, "bank": None}, tmp_path / "sup.pt")     # a run without prototypes
    d = from_checkpoint(tmp_path / "sup.pt", run_dir=tmp_path / "missing")
    assert d.state == "loaded" and d.features.bank is None


def test_real_prototype_bank_snapshot_and_drift():
    from brpg.prototypes import PrototypeBank
    C, D = 4, 8
    b = PrototypeBank(C, D, max_high=3, max_low=3)
    protos = torch.randn(C, 6, D); valid = torch.zeros(C, 6, dtype=torch.bool); valid[:, [0, 1, 3, 4]] = True
    added = torch.zeros(C, 6, dtype=torch.bool); added[1, 2] = True; valid[1, 2] = True
    b.set_prototypes(protos, valid, added)
    s = snapshot_bank(b)
    assert isinstance(s, BankSnapshot) and s.protos.shape == (C, 6, D) and s.added.sum() == 1 and s.valid.sum() == 17
    assert snapshot_bank({"bank": b.state_dict(), "student": {}}).valid.sum() == 17
    rec = DriftRecorder(); rec.reset(b)
    with torch.no_grad(): b.protos.add_(0.5 * torch.randn_like(b.protos))
    rec.record(1, b)
    h = rec.history()
    assert h["from_init"].shape == (1, C, 6) and (h["from_init"][0][s.valid] > 0).all()


@pytest.mark.slow
def test_dashboard_with_real_trainer(tmp_path):
    from brpg.trainer import Trainer
    from brpg.testing import tiny_demo_config
    tr = Trainer(tiny_demo_config("brpg", ["trainer.val_every=4"]), out_dir=tmp_path, overwrite=True)
    dash = TrainingDashboard(tr, interval=0.2, feature_interval=0)
    assert dash.class_names == tr.class_names and dash.features.threshold.value == tr.cfg.method.high_threshold
    dash.run(block=True)
    assert dash.state == "finished" and dash.exception is None, dash.error.outputs
    dash.redraw(all_views=True)
    its = dash.curves.artists["loss"]["loss"].get_xdata()
    assert its[-1] == tr.iteration and len(its) == len([h for h in tr.history if h.get("type") == "train"])
    assert len(dash.curves.artists["val"]["miou"].get_xdata()) >= 2
    h = dash.recorder.history()
    assert len(h["iterations"]) > 0 and h["from_init"].shape[1:] == tuple(tr.method.bank.protos.shape[:2])
    assert n_pts(dash.features.artists["high"]) + n_pts(dash.features.artists["low"]) > 0
    assert n_pts(dash.features.artists["proto_high"]) + n_pts(dash.features.artists["proto_low"]) == int(tr.method.bank.valid.sum())
    od = open_run(tmp_path)                                       # the run's view log: the same drift history
    assert od.class_names == tr.class_names and od.state == "finished"
    np.testing.assert_array_equal(od.drift.history()["iterations"], h["iterations"])
    np.testing.assert_allclose(od.drift.history()["from_init"], h["from_init"], rtol=1e-6, atol=1e-7)
    assert od.features.is_labeled is not None and od.features.sample_meta["phase"] in ("sampling", "prototypes", "semi")
    pt = od.features.patches                                      # each point's image patch came through the log
    b, r, c = pt["where"].T
    assert (pt["pred"][b, r, c] == od.features.labels).all() and pt["images"].dtype == np.uint8
    row = int(np.flatnonzero(od.features.is_labeled)[0]); od.features.inspect(row)
    assert od.features.patch.shown == tuple(pt["where"][row]) and od.features.patch.axes[2].images   # labeled: its truth
    (tmp_path / "views.log").unlink()                             # an older run without a view log: the saved sample ...
    od1 = open_run(tmp_path)
    np.testing.assert_array_equal(od1.features.patches["where"], dash.features.patches["where"])
    (tmp_path / "views_state.npz").unlink()                       # ... nor a saved sample: computed from the checkpoint's model
    od2 = open_run(tmp_path, n_images=2)
    p2 = od2.features.patches; b, r, c = p2["where"].T
    assert len(p2["images"]) == 2 and (p2["truth"][b, r, c] == od2.features.labels).all()
    assert not od2.error.outputs, od2.error.outputs
    assert od2.drift.history()["from_init"].shape == (1,) + tuple(tr.method.bank.protos.shape[:2])
    y = od2.features.labels
    assert len(y) > 0 and y.max() < tr.cfg.data.num_classes and od2.features.feats.shape[1] == tr.cfg.model.rep_dim
    assert n_pts(od2.features.artists["high"]) + n_pts(od2.features.artists["low"]) == len(y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bank_and_sample():
    s = synthetic_features(4, 500, 16)
    b = SyntheticBank(s["feats"], s["labels"], s["conf"], device="cuda")
    rec = DriftRecorder(); rec.reset(b); b.drift(s["feats"][:100], s["labels"][:100]); rec.record(1, b)
    assert rec._pending[0][1].is_cuda and rec.history()["from_init"].shape == (1, 4, 6)
    v = FeatureSpaceView(*(torch.as_tensor(s[k]).cuda() for k in ("feats", "labels", "conf")), bank=b)
    assert n_pts(v.artists["high"]) + n_pts(v.artists["low"]) == 500


@pytest.mark.slow
def test_view_figures_script_on_a_finished_run(tmp_path):
    "scripts/brain_views.py (the figures of experiments/brain_views) on a finished BRPG run: every figure and its facts."
    import subprocess, sys
    from pathlib import Path
    from brpg.trainer import Trainer
    from brpg.testing import tiny_demo_config
    tr = Trainer(tiny_demo_config("brpg", ["trainer.epochs=3"]), out_dir=tmp_path / "run"); tr.fit(); tr.close()
    script = Path(__file__).resolve().parents[1] / "scripts" / "brain_views.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "figs")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = ("curves", "features", "confidence", "drift", "margins", "patch")
    assert all((tmp_path / "figs" / f"{n}.png").stat().st_size > 10_000 for n in names)
    f = json.loads((tmp_path / "figs" / "facts.json").read_text())
    assert list(f["per_class"]) == list(tr.class_names) and f["phase"] == "prototypes"
    counts = sum(v["high"] + v["low"] + v["pseudo"] for v in f["per_class"].values())
    assert counts == f["rows"] and sum(v["prototypes_high"] + v["prototypes_low"] for v in f["per_class"].values()) == int(tr.method.bank.valid.sum())
    (b, y, x), (h, w) = f["patch_where"], f["patch_grid"]
    assert 0 <= y < h and 0 <= x < w and f["patch_margin"] <= 0.5                # a grid position of the sample
    r2 = subprocess.run([sys.executable, str(script), str(tmp_path / "missing"), str(tmp_path / "f2")], capture_output=True, text=True)
    assert r2.returncode != 0 and r2.stderr.strip().splitlines()[-1].startswith("brain_views: run directory")
    assert not (tmp_path / "f2").exists()
