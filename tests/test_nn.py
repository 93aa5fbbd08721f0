"""Tests of mpncov.nn: the pooling modules, the iSQRT-COV head and the attention blocks."""
import copy
import functools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpncov
from mpncov.nn import (CBAM, ECA, GCT, GSoP, MPNCOV, SE, CovPool, Sqrtm, Triuvec, create_attn,
                       triu_col_order_index, triu_row_to_col)

torch.set_num_threads(min(2, torch.get_num_threads()))


def ref_cov(x):
    """Pure-torch biased covariance over the last dims (B, C, ...) -> (B, C, C)."""
    x = x.flatten(2).double()
    xc = x - x.mean(-1, keepdim=True)
    return xc @ xc.transpose(1, 2) / x.shape[-1]


# ------------------------------------------------------------------ pooling modules
def test_modules_match_ops():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 4)
    s = CovPool()(x)
    assert s.shape == (3, 6, 6)
    torch.testing.assert_close(s.double(), ref_cov(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Sqrtm(4)(s), mpncov.sqrtm(s, 4))
    v = Triuvec()(s)
    assert v.shape == (3, 21)
    r, c = torch.triu_indices(6, 6)
    torch.testing.assert_close(v, s[:, r, c])
    with pytest.raises(ValueError):
        Sqrtm(0)


@pytest.mark.parametrize("make, words", [
    (lambda: Sqrtm(2.7), "iters must be an integer, got 2.7"),
    (lambda: Sqrtm(True), "iters must be an integer"),
    (lambda: Sqrtm(0), "iters must be between 1 and 100, got 0"),
    (lambda: Sqrtm(10 ** 19), "iters must be between 1 and 100"),
    (lambda: MPNCOV(iterNum=2.5), "iterNum must be an integer, got 2.5"),
    (lambda: MPNCOV(iterNum=101), "iterNum must be between 1 and 100, got 101"),
    (lambda: MPNCOV(input_dim=0), "input_dim must be >= 1, got 0"),
    (lambda: MPNCOV(input_dim=16.0), "input_dim must be an integer"),
    (lambda: MPNCOV(input_dim=16, dimension_reduction=0), "dimension_reduction must be >= 1, got 0"),
    (lambda: MPNCOV(input_dim=16, dimension_reduction=-4), "dimension_reduction must be >= 1"),
])
def test_pooling_settings_are_validated(make, words):
    # Never silently truncated (2.5 -> 2) or turned into an unreadable conv error.
    with pytest.raises(ValueError, match="^(Sqrtm|MPNCOV): ") as info:
        make()
    assert words in str(info.value)


@pytest.mark.parametrize("dr", [None, 4])
def test_mpncov_head_rejects_features_with_another_channel_count(dr):
    head = MPNCOV(iterNum=3, input_dim=8, dimension_reduction=dr)
    assert head(torch.randn(2, 8, 3, 3)).shape == (2, head.output_dim)
    with pytest.raises(ValueError, match=r"input_dim=8.*\(2, 6, 3, 3\)"):
        head(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("is_sqrt,is_vec,dr", [(True, True, None), (True, True, 8), (True, False, 8),
                                               (False, True, None), (False, False, None)])
def test_mpncov_head(is_sqrt, is_vec, dr):
    torch.manual_seed(0)
    head = MPNCOV(iterNum=3, is_sqrt=is_sqrt, is_vec=is_vec, input_dim=16, dimension_reduction=dr)
    d = dr or 16
    assert head.output_dim == (d * (d + 1) // 2 if is_vec else d * d)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = head(x)
    assert y.shape == (2, head.output_dim)
    # the fused op equals the composition
    f = head.conv_dr_block(x) if dr else x
    s = mpncov.covpool(f)
    if is_sqrt:
        s = mpncov.sqrtm(s, 3)
    ref = mpncov.triuvec(s) if is_vec else s.flatten(1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    if dr:
        names = [n for n, _ in head.named_parameters()]
        assert names == ["conv_dr_block.0.weight", "conv_dr_block.1.weight", "conv_dr_block.1.bias"]
        assert head.conv_dr_block[0].bias is None


def test_triu_col_order():
    d = 5
    a = torch.randn(2, d, d)
    a = a + a.transpose(1, 2)
    row = mpncov.triuvec(a)
    col = triu_row_to_col(row, d)
    # column-major upper triangle == row-major lower triangle
    r, c = torch.tril_indices(d, d)
    torch.testing.assert_close(col, a[:, r, c])
    expected = [a[:, i, j] for j in range(d) for i in range(j + 1)]
    torch.testing.assert_close(col, torch.stack(expected, 1))
    p = triu_col_order_index(d)
    assert sorted(p.tolist()) == list(range(d * (d + 1) // 2))


# ------------------------------------------------------------------------- GSoP
def _gsop_channel_ref(b, u):
    y = F.relu(b.bn_for_DR(b.conv_for_DR(F.relu(u))))
    s = ref_cov(y).float().unsqueeze(-1)
    s = b.fc_adapt_channels(b.row_conv_group(b.row_bn(s)))
    return u * torch.sigmoid(s)


def _gsop_position_ref(b, u):
    y = b.bn_for_DR_spatial(b.conv_for_DR_spatial(F.relu(u)))
    y = F.adaptive_avg_pool2d(y, 8).flatten(2).transpose(1, 2)  # (B, 64, d)
    s = ref_cov(y).float().unsqueeze(-1)  # covariance of positions, centred over d
    s = F.relu(b.row_conv_group_for_spatial(b.row_bn_for_spatial(s)))
    w = torch.sigmoid(b.fc_adapt_channels_for_spatial(s)).view(u.shape[0], 1, 8, 8)
    w = F.adaptive_avg_pool2d(w, u.shape[-2:])
    return F.relu(u * w)


@pytest.mark.parametrize("train", [True, False])
def test_gsop_matches_reference(train):
    torch.manual_seed(0)
    u = torch.randn(4, 32, 12, 12)
    for mode in ("1", "2", "+", "M", "&"):
        b = GSoP(32, att_dim=8, mode=mode).train(train)
        with torch.no_grad():
            for m in b.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2)
        y = b(u)
        b2 = copy.deepcopy(b)  # fresh BN running stats for the reference pass in train mode
        b3 = copy.deepcopy(b)
        chan = _gsop_channel_ref(b2, u) if mode != "2" else None
        pos = _gsop_position_ref(b3, u) if mode != "1" else None
        ref = {"1": lambda: chan, "2": lambda: pos, "+": lambda: chan + pos,
               "M": lambda: torch.maximum(chan, pos),
               "&": lambda: b2.bn_for_concat(b2.dilate_conv_for_concat1(chan)
                                             + b2.dilate_conv_for_concat2(pos))}[mode]()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5, msg=f"mode {mode}")


def test_gsop_structure_and_names():
    b = GSoP(256, mode="1", planes=64)  # stage 1 of a ResNet-50: conv_for_DR stride 2
    assert b.conv_for_DR.stride == (2, 2)
    assert GSoP(512, planes=128).conv_for_DR.stride == (1, 1)
    assert GSoP(256, dr_stride=1, planes=64).conv_for_DR.stride == (1, 1)
    shapes = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert shapes["conv_for_DR.weight"] == (128, 256, 1, 1)
    assert shapes["conv_for_DR.bias"] == (128,)
    assert shapes["row_conv_group.weight"] == (512, 1, 128, 1)
    assert shapes["fc_adapt_channels.weight"] == (256, 512, 1, 1)
    assert {k.split(".")[0] for k in shapes} == {"conv_for_DR", "bn_for_DR", "row_bn",
                                                 "row_conv_group", "fc_adapt_channels"}
    # 641 C + 66688 parameters per channel-mode block (d = 128)
    assert sum(p.numel() for p in b.parameters()) == 641 * 256 + 66688
    p = GSoP(256, mode="&", planes=64)
    names = {k.split(".")[0] for k in p.state_dict()}
    assert names == {"conv_for_DR", "bn_for_DR", "row_bn", "row_conv_group", "fc_adapt_channels",
                     "conv_for_DR_spatial", "bn_for_DR_spatial", "row_bn_for_spatial",
                     "row_conv_group_for_spatial", "fc_adapt_channels_for_spatial",
                     "dilate_conv_for_concat1", "dilate_conv_for_concat2", "bn_for_concat"}
    # groups = 256/64 = 4, k = 2*log2(32/4) + 5 = 11, padding 5
    assert p.dilate_conv_for_concat1.kernel_size == (11, 1)
    assert p.dilate_conv_for_concat1.padding == (5, 0)
    assert p.dilate_conv_for_concat1.groups == 4
    assert p.row_conv_group_for_spatial.weight.shape == (256, 1, 64, 1)
    assert GSoP(64, mode="channel").gsop_mode == "1" and GSoP(64, mode=2).gsop_mode == "2"
    with pytest.raises(ValueError):
        GSoP(64, mode="x")
    # optional activation between the row-wise conv and fc_adapt_channels
    assert isinstance(GSoP(64, mid_act_layer=functools.partial(nn.LeakyReLU, 0.1)).gsop_mid_act,
                      nn.LeakyReLU)


def test_gsop_zero_input_is_finite():
    b = GSoP(16, att_dim=4, mode="+")
    u = torch.zeros(2, 16, 8, 8, requires_grad=True)
    y = b(u)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(u.grad).all()


# ------------------------------------------------------------------- first order
def test_gct_identity_at_init_and_modes():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    for mode in ("l2", "l1"):
        g = GCT(8, mode=mode)
        assert torch.equal(g(x), x)
        assert all(p.ndim == 1 and p.shape == (8,) for p in g.parameters())
        with torch.no_grad():
            g.gamma.fill_(1.0)
            g.beta.fill_(0.1)
        assert not torch.allclose(g(x), x)
    with pytest.raises(ValueError):
        GCT(8, mode="l3")
    # l2 formula
    g = GCT(8)
    with torch.no_grad():
        g.alpha.uniform_(0.5, 1.5), g.gamma.normal_(), g.beta.normal_()
    e = g.alpha.view(1, -1, 1, 1) * (x.pow(2).sum((2, 3), keepdim=True) + 1e-5).sqrt()
    n = g.gamma.view(1, -1, 1, 1) / (e.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(g(x), x * (1 + torch.tanh(e * n + g.beta.view(1, -1, 1, 1))))


def test_eca_kernel_and_forward():
    assert ECA(256).kernel_size == 3
    assert ECA(256, adaptive=True).kernel_size == 5  # |8 + 1| / 2 = 4 -> 5
    assert ECA(64, adaptive=True).kernel_size == 3
    assert ECA(2048, kernel_size=None).kernel_size == 7  # (11 + 1) / 2 = 6 -> 7
    e = ECA(16)
    assert sum(p.numel() for p in e.parameters()) == 3
    x = torch.randn(2, 16, 4, 4)
    w = torch.sigmoid(F.conv1d(x.mean((2, 3))[:, None], e.conv.weight, padding=1))[:, 0]
    torch.testing.assert_close(e(x), x * w[..., None, None])


def test_se_and_cbam():
    se = SE(64)
    assert se.fc1.out_channels == 4 and se.fc1.bias is not None
    assert sum(p.numel() for p in se.parameters()) == 64 * 4 + 4 + 4 * 64 + 64
    assert SE(64, rd_channels=10).fc1.out_channels == 10
    cb = CBAM(64)
    assert cb.spatial.conv.conv.kernel_size == (7, 7)
    x = torch.randn(2, 64, 6, 6)
    assert se(x).shape == x.shape and cb(x).shape == x.shape
    x = torch.randn(2, 64, 6, 6)
    s = torch.sigmoid(se.fc2(F.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * s)


# ------------------------------------------------------------------------- factory
def test_create_attn_keys():
    for name, cls in [("se", SE), ("eca", ECA), ("cbam", CBAM), ("gct", GCT), ("gsop", GSoP),
                      ("SE", SE)]:
        assert type(create_attn(name, 64)) is cls
    assert create_attn(None, 64) is None and create_attn("", 64) is None
    assert type(create_attn(SE, 64)) is SE
    m = create_attn(functools.partial(GSoP, att_dim=8, mode="2"), 64)
    assert isinstance(m, GSoP) and m.att_dim == 8 and m.gsop_mode == "2"
    assert create_attn("gsop", 64, att_dim=16).att_dim == 16
    with pytest.raises(ValueError):
        create_attn("nope", 64)


def _blocks():
    torch.manual_seed(0)
    return {"se": SE(32), "eca": ECA(32), "cbam": CBAM(32), "gct": GCT(32),
            "gsop1": GSoP(32, att_dim=8, mode="1"), "gsop2": GSoP(32, att_dim=8, mode="2"),
            "gsop+": GSoP(32, att_dim=8, mode="+"), "gsopM": GSoP(32, att_dim=8, mode="M"),
            "gsop&": GSoP(32, att_dim=8, mode="&")}


def test_channels_last_equals_contiguous():
    torch.manual_seed(1)
    x = torch.randn(3, 32, 10, 10)
    for name, b in _blocks().items():
        with torch.no_grad():
            for p in b.parameters():  # make GCT non-trivial
                p.add_(0.1 * torch.randn_like(p))
        b2 = copy.deepcopy(b).to(memory_format=torch.channels_last)
        y = b(x)
        y2 = b2(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5, msg=name)


def test_autocast_bf16():
    x = torch.randn(2, 32, 8, 8)
    for name, b in _blocks().items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(x.bfloat16())
        assert y.dtype == torch.bfloat16, name
        assert torch.isfinite(y.float()).all(), name
        y.float().sum().backward()


def test_compiled_gsop_equals_eager():
    torch.manual_seed(0)
    b = GSoP(32, att_dim=8, mode="1")
    b2 = copy.deepcopy(b)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = b(x)
    y.square().sum().backward()
    c = torch.compile(b2, fullgraph=True)
    y2 = c(x2)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b2.conv_for_DR.weight.grad, b.conv_for_DR.weight.grad,
                               rtol=1e-3, atol=1e-4)


def test_sync_batchnorm_conversion():
    for name, b in _blocks().items():
        s = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(b))
        assert set(s.state_dict()) == set(b.state_dict()), name
        assert not any(type(m) is nn.BatchNorm2d for m in s.modules()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_cuda_autocast_channels_last():
    x = torch.randn(4, 32, 12, 12, device="cuda")
    for name, b in _blocks().items():
        b = b.cuda()
        ref = b(x)
        b2 = copy.deepcopy(b).to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            y = b2(x.half().contiguous(memory_format=torch.channels_last))
        assert y.dtype == torch.float16, name
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2, msg=name)
        y.float().sum().backward()
