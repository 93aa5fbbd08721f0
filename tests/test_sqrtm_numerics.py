"""The numerical contract of sqrtm and the pipeline (SPEC section 2): one function of any
input (the symmetric part) with its exact gradient at every C, accuracy no worse than the
plain recurrence at every iteration count, and the degenerate traces (zero, tiny,
negative), plus float16/bfloat16 features whose covariance does not fit float16."""
import pytest
import torch

import mpncov
from reference import covpool_ref, isqrt_cov_ref, spd, sqrtm_ref

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _nonsymmetric_spd(b, c, seed=0):
    """A matrix whose symmetric part is positive definite but which is not symmetric."""
    s = spd(b, c, seed=seed) + 0.1 * torch.eye(c, dtype=F64)
    return s + 0.05 * _randn(b, c, c, seed=seed + 1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------ one function for every C and path

# C < 48 multiplies whole matrices, C >= 48 in row blocks of 32 (csrc/cpu/matrix_product):
# both must compute iSQRT of the symmetric part.
@pytest.mark.parametrize("c", [5, 47, 48, 64, 130])
def test_sqrtm_of_nonsymmetric_input_is_sqrtm_of_its_symmetric_part(c, device):
    s = _nonsymmetric_spd(2, c).to(device)
    assert not torch.equal(s, s.mT)
    for iters in (1, 3, 5, 12):
        out = mpncov.sqrtm(s, iters)
        assert torch.equal(out, mpncov.sqrtm((s + s.mT) / 2, iters))
        assert _rel(out, sqrtm_ref((s + s.mT) / 2, iters)) < 1e-13


@pytest.mark.parametrize("c", [5, 47, 48, 64, 130])
def test_gradcheck_sqrtm_nonsymmetric_input_every_c(c, device):
    # gradcheck perturbs one entry at a time (C >= 47: along random directions), i.e. in
    # non-symmetric directions, at a non-symmetric point.
    s = _nonsymmetric_spd(1, c, seed=c).to(device).requires_grad_()
    for iters in (3, 12):
        assert torch.autograd.gradcheck(lambda t: mpncov.sqrtm(t, iters), (s,),
                                        fast_mode=c > 5)


@pytest.mark.parametrize("c", [5, 48, 130])
def test_directional_derivative_along_a_nonsymmetric_direction(c):
    s = _nonsymmetric_spd(2, c, seed=3)
    v = _randn(2, c, c, seed=4)  # not symmetric
    g = _randn(2, c, c, seed=5)  # not symmetric
    h = 1e-6
    fd = ((mpncov.sqrtm(s + h * v, 5) - mpncov.sqrtm(s - h * v, 5)) * g).sum() / (2 * h)
    s_ = s.clone().requires_grad_()
    (d,) = torch.autograd.grad(mpncov.sqrtm(s_, 5), s_, g)
    assert torch.allclose(d, d.mT)  # the gradient of f(sym(S)) is symmetric
    assert abs((d * v).sum().item() - fd.item()) <= 1e-6 * abs(fd.item())


# ------------------------------------- accuracy at every number of iterations

def _eigh_root(s):
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.mT


# Full rank (M > C) and rank deficient (M < C: the usual head, e.g. C=256 at 14x14),
# features with unequal channel scales.
RANK_CASES = [(64, 200), (64, 40), (130, 47), (256, 196)]


@pytest.mark.parametrize("c,m", RANK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_less_accurate_than_the_plain_recurrence_at_every_iters(c, m, dtype):
    x = _randn(2, c, m, seed=c + m) * torch.rand(2, c, 1, generator=torch.Generator().manual_seed(1),
                                                 dtype=F64)
    s = covpool_ref(x)
    s = (s + s.mT) / 2
    exact = _eigh_root(s)
    s_low = s.to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    checked = 0
    for iters in range(1, 31):
        err_plain = _rel(sqrtm_ref(s_low, iters), exact)
        err = _rel(mpncov.sqrtm(s_low, iters), exact)
        if err_plain == err_plain:  # not NaN: once the plain recurrence is NaN, anything is
            assert err <= 1.5 * err_plain + tol, (iters, err, err_plain)
            checked += 1
    assert checked >= 28


def test_many_iterations_on_the_published_head_shape_stay_accurate():
    # The case from the bug report: C=256, 14x14, float32, iters 20-24 (was off by 4.0
    # at 20 and overflowed at 22-24).
    x = _randn(2, 256, 196, seed=11)
    s = covpool_ref(x)
    s = (s + s.mT) / 2
    exact = _eigh_root(s)
    for iters in (20, 22, 24):
        assert _rel(mpncov.sqrtm(s.float(), iters), exact) < 1e-3
        assert _rel(mpncov.isqrt_cov(x.float(), iters),
                    exact[:, *torch.triu_indices(256, 256)]) < 1e-3


@pytest.mark.parametrize("iters", [10, 20])
def test_gradient_at_many_iterations_matches_autograd_of_the_plain_recurrence(iters):
    x = _randn(2, 64, 40, seed=2)  # rank deficient
    s = covpool_ref(x)
    s = ((s + s.mT) / 2).requires_grad_()
    g = _randn(2, 64, 64, seed=3)
    (exact,) = torch.autograd.grad(sqrtm_ref(s, iters), s, g)
    s32 = s.detach().float().requires_grad_()
    (plain,) = torch.autograd.grad(sqrtm_ref(s32, iters), s32, g.float())
    (ours,) = torch.autograd.grad(mpncov.sqrtm(s32, iters), s32, g.float())
    assert _rel(ours, exact) <= 1.5 * _rel(plain, exact) + 1e-6


# --------------------------------------------------------------- degenerate traces

def test_tiny_float32_trace_gives_finite_results():
    # Features of scale 1e-20: a covariance of about 1e-40, below float32's smallest
    # normal number; its trace and every sample's result must stay finite.
    x = (_randn(3, 6, 20, seed=1) * 1e-20).float().requires_grad_()
    s = mpncov.covpool(x)
    assert 0 < s.diagonal(dim1=1, dim2=2).sum(-1).max() < 1e-37
    out = mpncov.isqrt_cov(x, 5)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.isfinite(dx).all()
    sd = s.detach().requires_grad_()
    root = mpncov.sqrtm(sd, 5)
    (ds,) = torch.autograd.grad(root, sd, torch.ones_like(root))
    assert torch.isfinite(root).all() and torch.isfinite(ds).all()


def test_denormal_float64_trace_gives_finite_and_scaled_results():
    s = spd(2, 5)
    scale = 1e-310  # the trace becomes a float64 denormal
    tiny = (s * scale).requires_grad_()
    assert 0 < tiny.diagonal(dim1=1, dim2=2).sum(-1).max() < 2.3e-308
    out = mpncov.sqrtm(tiny, 5)
    (d,) = torch.autograd.grad(out, tiny, torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(d).all()
    # sqrtm(c S) = sqrt(c) sqrtm(S); denormals keep only a few digits of S.
    assert _rel(out / scale ** 0.5, mpncov.sqrtm(s, 5)) < 1e-3


def test_zero_and_negative_traces_follow_one_rule_per_sample(device):
    s = spd(4, 6, device=device).requires_grad_(False)
    s[1] = 0                     # zero trace: zero output, zero gradient
    s[2] = -s[2]                 # negative trace: NaN output, NaN gradient
    s = s.requires_grad_()
    for iters in (1, 5, 12):
        out = mpncov.sqrtm(s, iters)
        (d,) = torch.autograd.grad(out, s, torch.ones_like(out))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(d[1], torch.zeros_like(d[1]))
        assert torch.isnan(out[2]).all() and torch.isnan(d[2]).all()
        for i in (0, 3):  # the other samples are untouched
            assert torch.isfinite(out[i]).all() and torch.isfinite(d[i]).all()
            assert _rel(out[i], sqrtm_ref(s[i:i + 1].detach(), iters)[0]) < 1e-12


# ------------------------------------------------------ half-precision features

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [255.0, 1e-4])
def test_half_precision_features_whose_covariance_does_not_fit_half(dtype, magnitude):
    # 255^2 = 65025 is beyond float16's range once summed; (1e-4)^2 is far below its
    # smallest normal number. The pipeline keeps everything between its parts in float32.
    x = (_randn(2, 9, 30, seed=7) * magnitude).to(dtype)
    g = _randn(2, 45, seed=8)
    ref = isqrt_cov_ref(x.double(), 5)
    xr = x.double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(isqrt_cov_ref(xr, 5), xr, g)
    xh = x.clone().requires_grad_()
    out = mpncov.isqrt_cov(xh, 5)
    (dx,) = torch.autograd.grad(out, xh, g.to(dtype))
    assert out.dtype == dtype and dx.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert _rel(out, ref) < tol
    assert _rel(dx, dx_ref) < 10 * tol
