"""Features as tokens (channel_dim=-1): (B, N, C) and (B, H, W, C) for covpool, isqrt_cov
in both spaces and the MPNCOV head; the CPU kernels read that layout without a copy and
return the gradient in it (csrc/cpu/features.h)."""
import os
import subprocess
import sys

import pytest
import torch

import mpncov
from mpncov.nn import MPNCOV, CovPool
from checks import output_and_grad as _grad, randn as _x, rel_err as _err
from reference import covpool_ref, isqrt_cov_ref

F64 = torch.float64
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# (B, N, C): N positions (tokens), C channels; M < C, M = C, M > C, one token, one channel.
TOKEN_SHAPES = [(2, 7, 5), (2, 5, 7), (2, 6, 6), (2, 1, 4), (2, 9, 1), (2, 50, 130), (1, 197, 48)]


@pytest.mark.parametrize("shape", TOKEN_SHAPES)
def test_covpool_of_tokens_is_covpool_of_channels_first(shape):
    tokens = _x(shape)
    g = _x((shape[0], shape[2], shape[2]), seed=1)  # not symmetric
    out, dx = _grad(lambda t: mpncov.covpool(t, channel_dim=-1), tokens, g)
    out_r, dx_r = _grad(lambda t: covpool_ref(t.transpose(1, 2)), tokens, g)
    assert _err(out, out_r) <= 1e-12 and _err(dx, dx_r) <= 1e-12
    assert dx.shape == tokens.shape and dx.is_contiguous()  # in the tokens' own layout


@pytest.mark.parametrize("space", ["cov", "gram"])
@pytest.mark.parametrize("iters", [1, 5, 12])
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
def test_isqrt_cov_of_tokens(shape, iters, space):
    tokens = _x(shape, seed=2)
    c = shape[2]
    g = _x((shape[0], c * (c + 1) // 2), seed=3)
    out, dx = _grad(lambda t: mpncov.isqrt_cov(t, iters, channel_dim=-1, space=space), tokens, g)
    if shape[1] == 1:
        assert not out.any() and not dx.any()
        return
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t.transpose(1, 2), iters), tokens, g)
    assert _err(out, out_r) <= 1e-12 and _err(dx, dx_r) <= 1e-10
    assert dx.is_contiguous()


@pytest.mark.parametrize("space", ["cov", "gram"])
def test_gradgradcheck_of_tokens(space):
    tokens = _x((2, 3, 5), seed=25).requires_grad_()  # (B, N, C)
    assert torch.autograd.gradgradcheck(
        lambda t: mpncov.isqrt_cov(t, 3, channel_dim=-1, space=space), (tokens,))
    assert torch.autograd.gradgradcheck(lambda t: mpncov.covpool(t, channel_dim=-1), (tokens,))


def test_four_dimensional_tokens_and_channels_last():
    x = _x((2, 6, 3, 4), seed=4)                     # (B, C, H, W)
    nhwc = x.permute(0, 2, 3, 1).contiguous()        # (B, H, W, C)
    for space in ("cov", "gram"):
        a = mpncov.isqrt_cov(x, 3, space=space)
        for other in (mpncov.isqrt_cov(nhwc, 3, channel_dim=-1, space=space),
                      mpncov.isqrt_cov(nhwc, 3, channel_dim=3, space=space),
                      mpncov.isqrt_cov(x.to(memory_format=torch.channels_last), 3, space=space)):
            assert _err(other, a) <= 1e-14
    assert _err(mpncov.covpool(nhwc, channel_dim=-1), mpncov.covpool(x)) <= 1e-14
    # the gradient of a channels_last input comes back channels_last
    xl = x.to(memory_format=torch.channels_last).requires_grad_()
    mpncov.isqrt_cov(xl, 3, space="gram").sum().backward()
    assert xl.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("space", ["cov", "gram"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-3),
                                       (torch.bfloat16, 2e-2)])
def test_low_precision_tokens(space, dtype, tol):
    tokens = _x((2, 9, 20), seed=26)
    g = _x((2, 210), seed=27)
    ref = _grad(lambda t: isqrt_cov_ref(t.transpose(1, 2), 5), tokens.to(dtype).double(), g)
    out, dx = _grad(lambda t: mpncov.isqrt_cov(t, 5, channel_dim=-1, space=space),
                    tokens.to(dtype), g.to(dtype))
    assert out.dtype == dtype and dx.dtype == dtype and dx.is_contiguous()
    assert _err(out, ref[0]) < tol and _err(dx, ref[1]) < 10 * tol


@pytest.mark.parametrize("space", ["cov", "gram"])
def test_empty_batch_of_tokens(space):
    tokens = torch.zeros(0, 7, 5, dtype=F64, requires_grad=True)
    out = mpncov.isqrt_cov(tokens, 3, channel_dim=-1, space=space)
    assert out.shape == (0, 15)
    out.sum().backward()
    assert tokens.grad.shape == tokens.shape
    assert mpncov.covpool(tokens.detach(), channel_dim=-1).shape == (0, 5, 5)


def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("space", ["cov", "gram"])
def test_token_major_features_are_not_copied(space):
    # float32 tokens go to the kernels as they are: no copy, contiguous() or clone anywhere
    # in the forward or the backward of the pipeline.
    tokens = _x((4, 30, 40), seed=5, dtype=torch.float32).requires_grad_()
    g = _x((4, 820), seed=6, dtype=torch.float32)
    names = _ops_run(lambda: torch.autograd.grad(
        mpncov.isqrt_cov(tokens, 5, channel_dim=-1, space=space), tokens, g))
    assert names & {"aten::copy_", "aten::clone", "aten::contiguous"} == set(), names
    names = _ops_run(lambda: torch.autograd.grad(mpncov.covpool(tokens, channel_dim=-1), tokens,
                                                 torch.ones(4, 40, 40)))
    assert names & {"aten::copy_", "aten::clone", "aten::contiguous"} == set(), names


def test_opcheck_with_token_major_features():
    tokens = _x((2, 7, 5), seed=7).transpose(1, 2)
    g = _x((2, 5, 5), seed=8)
    torch.library.opcheck(torch.ops.mpncov.covpool.default, (tokens.requires_grad_(),))
    torch.library.opcheck(torch.ops.mpncov.covpool_backward.default, (g, tokens.detach()))
    vec, cov, saved = torch.ops.mpncov.isqrt_cov(tokens.detach(), 3)
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_backward.default,
                          (_x(vec.shape, seed=9), tokens.detach(), cov, saved, 3))


@pytest.mark.parametrize("channel_dim, shape, words", [
    (0, (2, 3, 4), "channel_dim must be 1 (channels first"),
    (2, (2, 3, 4, 5), "got 2"),
    (-2, (2, 3, 4), "got -2"),
    (-1, (2, 3), "x must be (B, N, C) or (B, H, W, C), got shape (2, 3)"),
    (-1, (2, 0, 3), "at least one position"),
])
def test_bad_channel_dim_or_token_shape(channel_dim, shape, words):
    for fn in (lambda t: mpncov.covpool(t, channel_dim=channel_dim),
               lambda t: mpncov.isqrt_cov(t, 3, channel_dim=channel_dim)):
        with pytest.raises(ValueError) as info:
            fn(torch.zeros(shape))
        assert words in str(info.value)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        mpncov.covpool(torch.zeros(2, 3, 4), channel_dim=True)


# ----------------------------------------------------------------------- the head

def _head_pair(dr=6, input_dim=10, iters=3, space="auto"):
    torch.manual_seed(0)
    conv_head = MPNCOV(iterNum=iters, input_dim=input_dim, dimension_reduction=dr,
                       space=space).double()
    token_head = MPNCOV(iterNum=iters, input_dim=input_dim, dimension_reduction=dr,
                        channel_dim=-1, space=space).double()
    assert isinstance(token_head.conv_dr_block[0], torch.nn.Linear)
    with torch.no_grad():
        token_head.conv_dr_block[0].weight.copy_(conv_head.conv_dr_block[0].weight[:, :, 0, 0])
    return conv_head, token_head


@pytest.mark.parametrize("space", ["cov", "gram"])
@pytest.mark.parametrize("train", [True, False])
def test_token_head_computes_the_conv_head(space, train):
    conv_head, token_head = _head_pair(space=space)
    conv_head.train(train)
    token_head.train(train)
    x = _x((3, 10, 4, 5), seed=10).requires_grad_()
    tokens = x.detach().flatten(2).transpose(1, 2).contiguous().requires_grad_()  # (B, N, C)
    a, b = conv_head(x), token_head(tokens)
    assert a.shape == b.shape == (3, 21)
    assert _err(b, a) <= 1e-12
    g = _x(a.shape, seed=11)
    a.backward(g)
    b.backward(g)
    assert _err(tokens.grad, x.grad.flatten(2).transpose(1, 2)) <= 1e-12
    assert _err(token_head.conv_dr_block[0].weight.grad,
                conv_head.conv_dr_block[0].weight.grad[:, :, 0, 0]) <= 1e-12
    if train:  # the running statistics follow too
        assert _err(token_head.conv_dr_block[1].running_var,
                    conv_head.conv_dr_block[1].running_var) <= 1e-12


def test_token_head_without_reduction_and_unfused_paths():
    tokens = _x((2, 9, 5), seed=12)
    for is_sqrt, is_vec in [(True, True), (True, False), (False, True), (False, False)]:
        head = MPNCOV(iterNum=3, is_sqrt=is_sqrt, is_vec=is_vec, input_dim=5, channel_dim=-1)
        ref = MPNCOV(iterNum=3, is_sqrt=is_sqrt, is_vec=is_vec, input_dim=5)
        assert _err(head(tokens), ref(tokens.transpose(1, 2))) <= 1e-14
    assert _err(CovPool(channel_dim=-1)(tokens), CovPool()(tokens.transpose(1, 2))) <= 1e-14


def test_head_settings_are_checked():
    with pytest.raises(ValueError, match="channel_dim must be 1 .* or -1"):
        MPNCOV(input_dim=4, channel_dim=2)
    with pytest.raises(ValueError, match="space must be one of"):
        MPNCOV(input_dim=4, space="eigh")
    with pytest.raises(ValueError, match=r"expected \(B, N, input_dim=4\)"):
        MPNCOV(input_dim=4, channel_dim=-1)(torch.zeros(2, 4, 3))
    assert "channel_dim=-1" in repr(MPNCOV(input_dim=4, channel_dim=-1, space="gram"))


# -------------------------------------------------------- the ATen product path

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import mpncov
from reference import covpool_ref
for dtype in (torch.float64, torch.float32):
    for b, n, c in ((2, 11, 7), (2, 50, 130)):
        g = torch.Generator().manual_seed(c)
        t = torch.randn(b, n, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        gc = torch.randn(b, c, c, generator=g, dtype=torch.float64).to(dtype)
        out = mpncov.covpool(t, channel_dim=-1)
        (dt,) = torch.autograd.grad(out, t, gc)
        tr = t.detach().double().requires_grad_()
        out_r = covpool_ref(tr.transpose(1, 2))
        (dt_r,) = torch.autograd.grad(out_r, tr, gc.double())
        tol = 1e-12 if dtype == torch.float64 else 1e-4
        for a, r in ((out, out_r), (dt, dt_r)):
            err = (a.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
            assert err < tol, (dtype, c, err)
print("ok")
"""


def test_tokens_on_the_aten_product_path():
    r = subprocess.run([sys.executable, "-c", _SCRIPT, TESTS_DIR],
                       env=dict(os.environ, MPNCOV_CPU_DIRECT_BLAS="0"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
