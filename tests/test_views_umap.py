"""The projection switch of FeatureSpaceView with a real UMAP fit. Separate from test_views.py because UMAP's
first fit in a process compiles numba code (about 7 s on an idle machine, up to ~30 s on a loaded one)."""
import numpy as np
import pytest

from brpg.views import FeatureSpaceView
from brpg.testing import SyntheticBank, synthetic_features

pytestmark = pytest.mark.slow


def test_projection_method_switch_reprojects():
    s = synthetic_features(4, 600, 16, seed=3)
    fv = FeatureSpaceView(**s, bank=SyntheticBank(s["feats"], s["labels"], s["conf"]), sample_size=300)
    pca, pca_protos, renders = fv._emb.copy(), fv._emb_protos.copy(), fv.renders
    fv.method.value = "umap"
    assert fv.ax.get_title().startswith("UMAP of 300 class-balanced features") and fv.renders == renders + 1
    assert fv._emb.shape == pca.shape and not np.allclose(fv._emb, pca)
    assert len(fv._emb_protos) == len(pca_protos)                         # prototypes embedded with the features
    n = lambda k: len(fv.artists[k].get_offsets())
    assert n("high") + n("low") == 300
    np.testing.assert_allclose(fv.artists["high"].get_offsets(), fv._emb[s["conf"][fv._idx] >= 0.8])
    # UMAP keeps each class together: nearest neighbours in the embedding share the label
    y = s["labels"][fv._idx]
    d = ((fv._emb[:, None] - fv._emb[None]) ** 2).sum(-1); np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.9
    fv.method.value = "pca"
    np.testing.assert_allclose(fv._emb, pca)                               # PCA is deterministic
