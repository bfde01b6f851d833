"""brpg.models: output shapes (odd sizes, both output strides, both decoders), head separation and gradient
flow, parameter groups, SyncBN conversion, local-checkpoint loading (prefixes, wrappers, safetensors,
timm key flattening, errors) and the fast offline error for hub weights."""
import os, time, warnings

import pytest
import torch
import torch.nn as nn
import timm

import brpg.models as M
from brpg.config import ModelConfig
from brpg.models import create_segmenter, convert_sync_bn, load_backbone_weights

torch.set_num_threads(1)
R18 = dict(backbone="resnet18", pretrained=False)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return create_segmenter(ModelConfig(**R18, output_stride=8), 5)


@pytest.mark.parametrize("size,out", [(65, 17), (64, 16), (97, 25), (66, 17)])
def test_stride4_output_sizes(r18, size, out):
    r18.eval()
    with torch.no_grad():
        o = r18(torch.randn(1, 3, size, size + 4))
    assert o["pred"].shape == (1, 5, out, -(-(size + 4) // 4))
    assert o["rep"].shape == (1, 256, out, -(-(size + 4) // 4))


def test_513_crop_gives_129():
    m = create_segmenter(ModelConfig(**R18, output_stride=16, decoder_channels=16, rep_dim=8), 2).eval()
    with torch.no_grad():
        o = m(torch.randn(1, 3, 513, 513))
    assert o["pred"].shape[-2:] == (129, 129) and o["rep"].shape == (1, 8, 129, 129)


@pytest.mark.parametrize("os_,last", [(8, 9), (16, 5), (32, 3)])
def test_output_stride(os_, last):
    m = create_segmenter(ModelConfig(**R18, output_stride=os_, aspp_dilations=[1, 2, 3]), 3).eval()
    with torch.no_grad():
        feats = m.backbone(torch.randn(1, 3, 65, 65))
        assert feats[-1].shape[-1] == last
        assert m(torch.randn(1, 3, 65, 65))["pred"].shape[-2:] == (17, 17)


def test_architecture_matches_spec(r18):
    dec = r18.decoder
    assert dec.aspp.out_channels == 1280
    assert [b[0].dilation[0] for b in dec.aspp.branches] == [1, 12, 24, 36]
    assert dec.head[0][0].in_channels == 1280 and dec.head[0][0].out_channels == 256
    assert isinstance(dec.head[1], nn.Dropout2d)
    assert dec.low[0].in_channels == 64 and dec.low[0].out_channels == 256  # resnet18 layer1 -> 256
    assert dec.out_channels == 512
    for head, cout in [(r18.classifier, 5), (r18.rep_head, 256)]:
        assert head[0][0].in_channels == 512 and head[0][0].kernel_size == (3, 3)
        assert isinstance(head[0][1], nn.BatchNorm2d) and isinstance(head[1], nn.Dropout2d)
        assert head[2][0].kernel_size == (3, 3) and isinstance(head[3], nn.Dropout2d)
        assert isinstance(head[4], nn.Conv2d) and head[4].out_channels == cout and len(head) == 5
    # separate weights
    assert r18.classifier[0][0].weight.data_ptr() != r18.rep_head[0][0].weight.data_ptr()


def test_rep_unnormalised_and_gradients(r18):
    r18.train(); r18.zero_grad()
    o = r18(torch.randn(2, 3, 65, 65))
    assert (o["rep"] < 0).any()                                 # no ReLU after the last 1x1
    o["rep"].pow(2).mean().backward()
    assert all(p.grad is None for p in r18.classifier.parameters())
    assert r18.backbone.conv1.weight.grad.abs().sum() > 0
    assert r18.decoder.aspp.branches[0][0].weight.grad.abs().sum() > 0
    r18.zero_grad()
    r18(torch.randn(2, 3, 65, 65))["pred"].mean().backward()
    assert all(p.grad is None for p in r18.rep_head.parameters())


def test_param_groups(r18):
    bb, hd = r18.param_groups()
    assert {id(p) for p in bb} == {id(p) for p in r18.backbone.parameters()}
    assert {id(p) for p in bb}.isdisjoint(id(p) for p in hd)
    assert len(bb) + len(hd) == len(list(r18.parameters()))
    assert sum(p.numel() for p in bb) == 11_176_512          # timm resnet18 without fc


def test_segformer_pvt():
    m = create_segmenter(ModelConfig(arch="segformer", backbone="pvt_v2_b0", pretrained=False, rep_dim=32,
                                     decoder_channels=64), 4)
    assert m.feat_idx == (0, 1, 2, 3)
    m.train()
    o = m(torch.randn(2, 3, 65, 67))
    assert o["pred"].shape == (2, 4, 17, 17) and o["rep"].shape == (2, 32, 17, 17)
    o["pred"].mean().backward()
    bb, hd = m.param_groups()
    assert len(bb) + len(hd) == len(list(m.parameters()))


def test_segformer_on_resnet_uses_stride4_and_up():
    m = create_segmenter(ModelConfig(arch="segformer", **R18), 3)
    assert m.feat_idx == (1, 2, 3, 4)  # the stride-2 stem feature is skipped


def test_config_errors():
    with pytest.raises(ValueError, match="resnet_typo"):
        create_segmenter(ModelConfig(backbone="resnet_typo", pretrained=False), 3)
    with pytest.raises(ValueError, match="output_stride"):
        create_segmenter(ModelConfig(backbone="pvt_v2_b0", pretrained=False, output_stride=8), 3)
    with pytest.raises(ValueError, match="num_classes"):
        create_segmenter(ModelConfig(**R18), 0)


def test_convert_sync_bn(r18):
    import copy
    m = convert_sync_bn(copy.deepcopy(r18))
    assert not any(type(x) is nn.BatchNorm2d for x in m.modules())
    assert sum(isinstance(x, nn.SyncBatchNorm) for x in m.modules()) == sum(isinstance(x, nn.BatchNorm2d) for x in r18.modules())


# ------------------------------------------------------------------ pretrained weights
def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_pth_with_prefix_and_wrapper(tmp_path, r18):
    p = tmp_path / "bb.pth"
    torch.save({"epoch": 3, "model": {f"module.backbone.{k}": v for k, v in r18.backbone.state_dict().items()}}, p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # a complete checkpoint loads without warnings
        m = create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 5)
    assert _same(m.backbone, r18.backbone)
    assert m.backbone.load_report["missing"] == [] and m.backbone.load_report["unexpected"] == []


def test_local_safetensors_and_plain_timm_checkpoint(tmp_path):
    from safetensors.torch import save_file
    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)   # a classification checkpoint
    p = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    with pytest.warns(UserWarning, match=r"loaded 120/120 tensors; 2 unexpected \(e.g. \['fc.bias', 'fc.weight'\]\)"):
        m = create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 3)
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])


def test_flattened_timm_keys_pvt(tmp_path):
    src = timm.create_model("pvt_v2_b0", pretrained=False)   # keys 'stages.0...' vs features_only 'stages_0...'
    p = tmp_path / "pvt.pth"
    torch.save(src.state_dict(), p)
    with pytest.warns(UserWarning, match="unexpected"):      # head.* is not part of the backbone
        m = create_segmenter(ModelConfig(arch="segformer", backbone="pvt_v2_b0", pretrained=False, pretrained_path=str(p)), 3)
    assert m.backbone.load_report["missing"] == []
    sd = src.state_dict()
    assert torch.equal(m.backbone.state_dict()["stages_2.blocks.1.attn.q.weight"], sd["stages.2.blocks.1.attn.q.weight"])


def test_partial_checkpoint_warns_missing(tmp_path, r18):
    sd = {k: v for k, v in r18.backbone.state_dict().items() if not k.startswith("layer4")}
    p = tmp_path / "part.pt"; torch.save(sd, p)
    with pytest.warns(UserWarning, match="missing"):
        m = create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 5)
    assert all(k.startswith("layer4") for k in m.backbone.load_report["missing"])
    assert torch.equal(m.backbone.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])


def test_checkpoint_errors(tmp_path, r18):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(tmp_path / "nope.pth")), 3)
    p = tmp_path / "other.pth"; torch.save({"foo.weight": torch.zeros(3)}, p)
    with pytest.raises(RuntimeError, match="no key matches backbone 'resnet18'"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 3)
    sd = dict(r18.backbone.state_dict()); sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    p2 = tmp_path / "bad.pth"; torch.save(sd, p2)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p2)), 3)
    p3 = tmp_path / "junk.pth"; p3.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p3)), 3)


def test_offline_error_is_fast_and_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        create_segmenter(ModelConfig(backbone="resnet18", pretrained=True), 3)
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "resnet18" in msg and "pretrained_path" in msg and "pretrained=false" in msg and "\n" not in msg


def test_unreachable_hub_without_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(M, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(RuntimeError, match="resnet18.*pretrained_path"):
        create_segmenter(ModelConfig(backbone="resnet18", pretrained=True), 3)


def test_hub_failure_is_wrapped(monkeypatch):
    monkeypatch.setattr(M, "_timm_weights_available", lambda name: True)  # pretend cached; timm then fails offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load timm pretrained weights.*pretrained_path"):
        create_segmenter(ModelConfig(backbone="resnet18", pretrained=True), 3)


def test_reachable_probe_is_bounded():
    t = time.perf_counter()
    assert M._reachable("https://192.0.2.1", timeout=0.5) is False   # TEST-NET-1: never answers
    assert time.perf_counter() - t < 2
