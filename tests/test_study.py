"The study harness end to end on the real brain data (tiny schedule), its records and the CLI entry point."
import json, subprocess, sys
import pytest
from brpg.study import run_study, summarize, paired_delta, results_table

FAST = ["data.brain_pool=2", "data.brain_image_size=96", "data.crop_size=33", "method.grid_num=8", "trainer.epochs=3",
        "trainer.progress=false", "trainer.tensorboard=false", "data.num_workers=0", "method.queue_len=200",
        "model.decoder_channels=32", "model.rep_dim=16", "model.aspp_dilations=[1,2,3]"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    logs = []
    res = run_study(out, "brain", ("supervised", "brpg_random_sampling"), seeds=[0, 1], iters=6, overrides=FAST,
                    n_examples=2, log=logs.append)
    return out, res, logs


@pytest.mark.slow
def test_study_writes_records_and_scores_test(study):
    out, res, logs = study
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "learning_curves.png", "predictions.png", "config.yaml"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "brain" and len(saved["runs"]) == 4
    for r in saved["runs"]:
        for k in ("method", "seed", "test_miou", "test_boundary_iou", "val_best_miou", "iterations", "wall_s"):
            assert r[k] is not None, k
        assert 0 <= r["test_miou"] <= 1 and r["iterations"] == 6 and r["pseudo_final"]["pixels"] > 0
    brpg = [r for r in saved["runs"] if r["method"] == "brpg_random_sampling"]
    assert all(r["method_name"] == "brpg" and r["loss_shares"]["logged"] >= 1 for r in brpg)
    assert "BRPG, random sampling (no CPG)" in (out / "results.md").read_text()
    assert any("[1/4 supervised seed 0]" in l for l in logs)


@pytest.mark.slow
def test_study_reuse_trains_nothing(study):
    out, res, _ = study
    logs = []
    res2 = run_study(out, "brain", ("supervised", "brpg_random_sampling"), seeds=[0, 1], iters=6, overrides=FAST,
                     n_examples=0, reuse=True, log=logs.append)
    assert sum("reused" in l for l in logs) == 4 and not any("training into" in l for l in logs)
    assert [r["test_miou"] for r in res2["runs"]] == [r["test_miou"] for r in res["runs"]]


def test_summary_and_paired_delta():
    runs = [{"method": m, "seed": s, "test_miou": v} for m, vs in (("supervised", (.5, .6, .7)), ("mean_teacher", (.52, .61, .73)))
            for s, v in enumerate(vs)]
    d = paired_delta(runs, "mean_teacher", "supervised")
    assert d["seeds"] == [0, 1, 2] and abs(d["mean"] - 0.02) < 1e-9 and not d["beats_spread"]  # +2 points < 10-point seed std
    assert "| mean teacher | 3 |" in results_table(summarize(runs))


def test_demo_cli_rejects_unknown_method():
    r = subprocess.run([sys.executable, "-m", "brpg.cli", "demo", "--methods", "fixmatch", "--out", "/tmp/x"], capture_output=True, text=True)
    assert r.returncode == 2 and "fixmatch" in r.stderr and "brpg_no_apo" in r.stderr and "unimatch_brpg" in r.stderr


@pytest.mark.slow
def test_study_on_a_dataset_without_test_split(tmp_path):
    "The digits demo has no test split: the table says n/a there and the figure falls back to val images."
    ov = ["data.demo_num_images=48", "data.demo_num_labeled=8", "data.demo_num_val=8", "data.demo_image_size=40",
          "data.crop_size=33", "method.grid_num=8", "model.aspp_dilations=[1,2,3]", "trainer.epochs=3", "trainer.progress=false",
          "trainer.tensorboard=false", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"]
    res = run_study(tmp_path / "out", "demo", ("supervised",), iters=3, overrides=ov, n_examples=2, log=lambda m: None)
    r = res["runs"][0]
    assert "test_miou" not in r and r["val_best_miou"] is not None
    assert "| supervised only | 1 | n/a |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "predictions.png").is_file()


@pytest.mark.slow
def test_study_runs_the_unimatch_methods_and_pairs_them(tmp_path):
    "UniMatch and UniMatch + BRPG join a study like any method; their paired delta is reported."
    res = run_study(tmp_path / "out", "brain", ("unimatch", "unimatch_brpg"), seeds=[0], iters=6, overrides=FAST,
                    n_examples=0, log=lambda m: None)
    by = {r["method"]: r for r in res["runs"]}
    assert set(by) == {"unimatch", "unimatch_brpg"} and all(0 <= r["test_miou"] <= 1 for r in by.values())
    assert by["unimatch_brpg"]["loss_shares"]["logged"] >= 1 and by["unimatch_brpg"]["prototypes_final"] is not None
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "unimatch_brpg-unimatch:test_miou" in saved["deltas"] and "brpg-mean_teacher:test_miou" not in saved["deltas"]
    assert "UniMatch + BRPG − UniMatch" in (tmp_path / "out" / "results.md").read_text()
