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
