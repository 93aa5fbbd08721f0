"""Tests of mpncov.models: parameter counts, published state_dict layout, forward passes."""
import copy

import pytest
import torch
from torch import nn

from mpncov.models import (create_model, list_models, load_published_gsop_net2,
                           convert_gsop_net2_fc)
from mpncov.nn import triu_row_to_col
import mpncov

torch.set_num_threads(min(2, torch.get_num_threads()))

SPEC_COUNTS = {
    "resnet50": 25_557_032,
    "isqrt_cov_resnet50": 56_929_832,
    "isqrt_cov_resnet101": 75_921_960,
    ("gsop_resnet50", 1): 28_285_224,
    ("gsop_resnet50", 2): 58_278_568,
    ("gsop_resnet101", 1): 47_277_352,
    ("gsop_resnet101", 2): 77_270_696,
    "gsop1_resnet50": 28_285_224,
    "gsop2_resnet50": 58_278_568,
    "gsop1_resnet101": 47_277_352,
    "gsop2_resnet101": 77_270_696,
    # torchvision / the published first-order models
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "se_resnet50": 28_088_024,
    "eca_resnet50": 25_557_032 + 16 * 3,
    "gct_resnet50": 25_557_032 + 3 * sum(
        n * (c_in + 2 * p) for n, p, c_in in [(1, 64, 64), (2, 64, 256), (1, 128, 256),
                                               (3, 128, 512), (1, 256, 512), (5, 256, 1024),
                                               (1, 512, 1024), (2, 512, 2048)]),
}


def _build(key, **kw):
    with torch.device("meta"):  # construction only: no memory, fast
        if isinstance(key, tuple):
            return create_model(key[0], mode=key[1], **kw)
        return create_model(key, **kw)


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("key", list(SPEC_COUNTS), ids=str)
def test_parameter_counts(key):
    assert _count(_build(key)) == SPEC_COUNTS[key]


def test_names_listed():
    names = set(list_models())
    for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "gsop_resnet50",
              "gsop_resnet101", "isqrt_cov_resnet50", "isqrt_cov_resnet101", "se_resnet50",
              "gct_resnet50", "eca_resnet50", "cbam_resnet50", "resnet_tiny",
              "isqrt_cov_resnet_tiny", "gsop_resnet_tiny", "se_resnet_tiny"]:
        assert n in names
    with pytest.raises(ValueError):
        create_model("resnet7")


def _published_resnet_keys(layers, gsop_stages=(), head="gap"):
    """The state_dict keys of a torchvision ResNet plus the published extra layers,
    written out independently of the model code."""
    def bn(p):
        return [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var",
                f"{p}.num_batches_tracked"]
    keys = ["conv1.weight"] + bn("bn1")
    for s, n in enumerate(layers, 1):
        for b in range(n):
            p = f"layer{s}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight"] + bn(f"{p}.bn{i}")
            if b == 0:
                keys += [f"{p}.downsample.0.weight"] + bn(f"{p}.downsample.1")
            if s in gsop_stages and b == n - 1:
                keys += [f"{p}.conv_for_DR.weight", f"{p}.conv_for_DR.bias"] + bn(f"{p}.bn_for_DR")
                keys += bn(f"{p}.row_bn") + [f"{p}.row_conv_group.weight", f"{p}.row_conv_group.bias",
                                              f"{p}.fc_adapt_channels.weight",
                                              f"{p}.fc_adapt_channels.bias"]
    if head == "isqrt":
        keys += ["layer_reduce.weight"] + bn("layer_reduce_bn")
    return set(keys + ["fc.weight", "fc.bias"])


@pytest.mark.parametrize("name,layers,gsop,head,fc_in", [
    ("resnet50", [3, 4, 6, 3], (), "gap", 2048),
    ("isqrt_cov_resnet50", [3, 4, 6, 3], (), "isqrt", 32896),
    ("isqrt_cov_resnet101", [3, 4, 23, 3], (), "isqrt", 32896),
    ("gsop1_resnet50", [3, 4, 6, 3], (1, 2, 3, 4), "gap", 2048),
    ("gsop2_resnet50", [3, 4, 6, 3], (1, 2, 3), "isqrt", 32896),
    ("gsop1_resnet101", [3, 4, 23, 3], (1, 2, 3, 4), "gap", 2048),
    ("gsop2_resnet101", [3, 4, 23, 3], (1, 2, 3), "isqrt", 32896),
])
def test_published_state_dict_keys(name, layers, gsop, head, fc_in):
    m = _build(name)
    sd = m.state_dict()
    assert set(sd) == _published_resnet_keys(layers, gsop, head)
    assert tuple(sd["fc.weight"].shape) == (1000, fc_in)
    if gsop:
        assert tuple(sd["layer1.2.conv_for_DR.weight"].shape) == (128, 256, 1, 1)
        assert tuple(sd["layer3.%d.row_conv_group.weight" % (layers[2] - 1)].shape) == (512, 1, 128, 1)
        assert tuple(sd["layer2.3.fc_adapt_channels.weight"].shape) == (512, 512, 1, 1)
        assert m.layer1[2].conv_for_DR.stride == (2, 2)
        assert m.layer2[3].conv_for_DR.stride == (1, 1)
    if head == "isqrt":
        assert tuple(sd["layer_reduce.weight"].shape) == (256, 2048, 1, 1)
        assert m.layer4[0].conv2.stride == (1, 1) and m.layer4[0].downsample[0].stride == (1, 1)
        assert m.head_iters == (3 if name.startswith("gsop") else 5)
    if name.startswith("gsop1"):
        assert m.layer4[0].conv2.stride == (1, 1)


def test_attention_placement():
    m = _build("se_resnet50")
    assert "layer1.0.se.fc1.weight" in m.state_dict()
    assert tuple(m.state_dict()["layer1.0.se.fc1.weight"].shape) == (16, 256, 1, 1)
    m = _build("gct_resnet50")
    assert {"layer1.0.gct1.alpha", "layer1.0.gct2.beta", "layer1.0.gct3.gamma"} <= set(m.state_dict())
    assert m.layer1[0].gct1.alpha.shape == (64,) and m.layer1[1].gct1.alpha.shape == (256,)
    m = _build("eca_resnet50")
    assert tuple(m.state_dict()["layer3.5.se.conv.weight"].shape) == (1, 1, 3)
    m = _build("cbam_resnet50")
    assert "layer4.2.se.spatial.conv.bn.running_var" in m.state_dict()


TINY = [n for n in list_models() if n.endswith("_tiny")]


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    assert y.shape == (2, 5)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in m.parameters() if p.requires_grad)
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_real_models_small_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for name in ("gsop2_resnet50", "isqrt_cov_resnet50"):
        m = create_model(name, num_classes=7).eval()
        with torch.no_grad():
            assert m(x).shape == (2, 7)


def test_gap_head_equals_fixed_avgpool_at_224_map():
    # adaptive pooling == AvgPool2d(14) on the 14x14 map of a 224 input with layer4 stride 1
    f = torch.randn(2, 8, 14, 14)
    torch.testing.assert_close(nn.AdaptiveAvgPool2d(1)(f), nn.AvgPool2d(14)(f))


def test_gsop_net2_column_order_checkpoint():
    torch.manual_seed(0)
    # The published constructors default to GSoP-Net's column-major triangle.
    assert create_model("gsop2_resnet_tiny").triu_order == "col"
    assert create_model("gsop_resnet50", mode=2, num_classes=3).triu_order == "col"
    published = create_model("gsop2_resnet_tiny", num_classes=6).eval()
    with torch.no_grad():
        for m in published.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {"module." + k: v for k, v in published.state_dict().items()}  # DataParallel style
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        y_pub = published(x)
        # the 'col' model really emits the column-major triangle
        f = published.forward_features(x)
        f = published.layer_reduce_relu(published.layer_reduce_bn(published.layer_reduce(f)))
        v_row = mpncov.isqrt_cov(f, published.head_iters)
        torch.testing.assert_close(published.forward_head(published.forward_features(x), pre_logits=True),
                                   triu_row_to_col(v_row, published.head_dim))
    row = create_model("gsop2_resnet_tiny", num_classes=6, triu_order="row").eval()
    load_published_gsop_net2(row, sd)
    col = create_model("gsop2_resnet_tiny", num_classes=6).eval()
    load_published_gsop_net2(col, sd)
    # a plain strict load into the default model, as a user would do it
    plain = create_model("gsop2_resnet_tiny", num_classes=6).eval()
    plain.load_state_dict({k[len("module."):]: v for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(row(x), y_pub, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(col(x), y_pub, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), y_pub, rtol=1e-5, atol=1e-5)
    # and the permutation is not the identity
    conv = convert_gsop_net2_fc(sd, published.head_dim)
    assert not torch.equal(conv["fc.weight"], published.fc.weight)
    assert "triu_index" not in published.state_dict()


def test_channels_last_model_equals_contiguous():
    torch.manual_seed(0)
    for name in ("gsop_resnet_tiny", "isqrt_cov_resnet_tiny"):
        m = create_model(name, num_classes=4)
        m2 = copy.deepcopy(m).to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(m2(x.contiguous(memory_format=torch.channels_last)), m(x),
                                   rtol=1e-4, atol=1e-4)


def test_zero_init_and_gct_identity_model():
    m = create_model("resnet_tiny", zero_init_residual=True)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in
               [m.layer1[0], m.layer2[0], m.layer3[0], m.layer4[0]])
    m = create_model("resnet50", zero_init_residual=True, num_classes=3)
    assert float(m.layer3[2].bn3.weight.detach().abs().sum()) == 0
    # GCT is the identity at init: a GCT ResNet computes what its plain ResNet does
    torch.manual_seed(0)
    plain = create_model("resnet_tiny", num_classes=3).eval()
    gct = create_model("gct_resnet_tiny", num_classes=3).eval()
    missing, unexpected = gct.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".gct" in k for k in missing)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gct(x), plain(x))


def test_sync_bn_conversion_keeps_gsop_working():
    m = create_model("gsop_resnet_tiny", num_classes=3)
    s = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    assert set(s.state_dict()) == set(m.state_dict())
    assert isinstance(s.layer1[0].row_bn, nn.SyncBatchNorm)
