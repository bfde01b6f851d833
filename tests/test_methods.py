"""Tests over the method registry (as timm tests over its model registry): every registered method trains through
its phases, logs the terms it declares and resumes; a new method is one registered class."""
import json

import pytest
import torch

from brpg.checkpoint import read_checkpoint
from brpg.config import ConfigError
from brpg.methods import METHODS, MeanTeacher, Method, method_class, register_method
from brpg.testing import tiny_demo_config
from brpg.trainer import Trainer

BUILTIN = ("supervised", "mean_teacher", "brpg", "unimatch", "unimatch_brpg")
PHASES = {"supervised": ["supervised"] * 5, "mean_teacher": ["sup_only"] * 2 + ["semi"] * 3,
          "brpg": ["sup_only"] * 2 + ["sampling"] * 2 + ["prototypes"],
          "unimatch": ["sup_only"] * 2 + ["semi"] * 3,
          "unimatch_brpg": ["sup_only"] * 2 + ["sampling"] * 2 + ["prototypes"]}      # 2 iterations per epoch, S = D = T = 1


def test_registry_holds_the_builtin_methods():
    assert list(METHODS)[:len(BUILTIN)] == list(BUILTIN)
    assert all(issubclass(c, Method) and c.terms[0] == "loss" for c in METHODS.values())
    with pytest.raises(ConfigError, match="'method.name'.*not one of"): method_class("nope")
    with pytest.raises(ConfigError, match="method.name"): tiny_demo_config("nope")
    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        register_method(type("Nameless", (Method,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (Method,), {"name": "brpg"}))


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_trains_logs_its_terms_and_resumes(tmp_path, name):
    cls = METHODS[name]
    tr = Trainer(tiny_demo_config(name, ["trainer.max_iters=5"]), out_dir=tmp_path)
    tr.fit()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert all(set(cls.terms) <= set(r) for r in train) and [r["phase"] for r in train] == PHASES[name]
    undeclared = {"loss_unsup", "loss_proto"} - set(cls.terms)
    assert not any(k in r for r in train for k in undeclared)
    ck = read_checkpoint(tmp_path / "last.pt")
    assert ck["method"] == name and ck["inference"] == tr.method.inference_name(5)
    r = Trainer(tiny_demo_config(name, ["trainer.max_iters=6"]), out_dir=tmp_path, resume=True)
    assert r.iteration == 5 and r.fit()["iterations"] == 6


def test_a_new_method_is_one_registered_class(tmp_path):
    @register_method
    class Twice(MeanTeacher):
        "The mean teacher with its unsupervised term counted twice, logged as a term of its own."
        name, terms = "test_twice", ("loss", "loss_sup", "loss_unsup", "loss_twice")
        def step(self, batch, it):
            t = MeanTeacher.step(self, batch, it)
            return {**t, "loss": t["loss"] + self.m.unsup_weight * t["loss_unsup"], "loss_twice": t["loss_unsup"]}
    try:
        tr = Trainer(tiny_demo_config("test_twice", ["trainer.max_iters=3"]), out_dir=tmp_path)
        tr.fit()
        last = [h for h in tr.history if h["type"] == "train"][-1]
        assert last["phase"] == "semi" and last["loss_twice"] == last["loss_unsup"] > 0
        assert read_checkpoint(tmp_path / "last.pt")["teacher"] is not None
    finally:
        del METHODS["test_twice"]


def test_a_step_missing_a_declared_term_is_named(tmp_path):
    @register_method
    class Forgetful(Method):
        name, terms = "test_forgetful", ("loss", "loss_sup", "loss_extra")
    try:
        tr = Trainer(tiny_demo_config("test_forgetful", ["trainer.max_iters=1"]), out_dir=tmp_path)
        with pytest.raises(Exception, match=r"test_forgetful.*\['loss_extra'\]"): tr.fit()
    finally:
        del METHODS["test_forgetful"]


@pytest.mark.parametrize("config,expected", [
    ("voc/unimatch_366", {"method.name": "unimatch", "data.crop_size": 321, "data.batch_size_unlabeled": 2,
                          "model.output_stride": 16, "model.aspp_dilations": [6, 12, 18], "method.ce_weight": 1.0,
                          "method.ohem_weight": 0.0, "eval.mode": "whole", "trainer.epochs": 80, "trainer.head_lr_mult": 10.0}),
    ("cityscapes/unimatch_744", {"method.name": "unimatch", "data.crop_size": 801, "data.batch_size_unlabeled": 1,
                                 "model.output_stride": 8, "method.ce_weight": 0.0, "method.ohem_weight": 1.0,
                                 "method.ohem_min_kept": 100000, "trainer.epochs": 240, "trainer.lr": 0.005,
                                 "trainer.head_lr_mult": 1.0, "trainer.weight_decay": 0.0001}),
])
def test_unimatch_configs_mirror_the_published_settings(config, expected):
    from brpg.config import check_crop_keys, load_config
    cfg = load_config(config)
    common = {"method.sup_only_epochs": 0, "method.unimatch_threshold": 0.95, "method.unimatch_fp_dropout": 0.5,
              "method.unimatch_box_prob": 0.5, "trainer.lr": cfg.trainer.lr}
    for key, want in {**common, **expected}.items():
        sec, field = key.split(".")
        assert getattr(getattr(cfg, sec), field) == want, key
    check_crop_keys(load_config(config, ["method.name=unimatch_brpg"]), warn=False)   # switching to the BRPG variant just works


def test_unimatch_keys_are_checked():
    from brpg.config import load_config
    for key in ("unimatch_threshold", "unimatch_fp_dropout", "unimatch_box_prob"):
        with pytest.raises(ConfigError, match=f"method.{key}.*outside"):
            load_config("demo", [f"method.{key}=1.5"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unimatch", "unimatch_brpg"])
def test_unimatch_methods_feed_the_views(tmp_path, name):
    "The views' events come from the UniMatch methods as from the others: feature samples with unlabeled pixels, the bank."
    class Watch:
        def __init__(self): self.samples, self.inits = [], 0
        def on_features_sampled(self, trainer, sample): self.samples.append(sample)
        def on_prototypes_initialized(self, trainer, bank): self.inits += 1
    w = Watch()
    tr = Trainer(tiny_demo_config(name, ["trainer.max_iters=5", "trainer.view_every=1", "method.pseudo_threshold=0.0"]), callbacks=[w], out_dir=tmp_path)
    tr.fit(); tr.close()
    semi = [s for s in w.samples if s["phase"] != "sup_only"]
    assert len(w.samples) == 5 and semi and all((~s["is_labeled"]).any() for s in semi)
    for s in semi:       # the patches: the unlabeled points sit in the weak views, where the prediction is their label
        b, r, c = s["where"].long().T; u = ~s["is_labeled"]
        assert (b[u] >= len(s["truth"])).all() and (s["pred"][b, r, c].long() == s["labels"]).all()
        assert s["images"].shape[:3] == s["pred"].shape and s["images"].dtype == torch.uint8
    assert w.inits == (1 if name == "unimatch_brpg" else 0)
