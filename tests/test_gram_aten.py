"""The Gram-space pipeline in batched ATen ops (csrc/gram_aten.cpp), the CUDA cuBLAS path
of isqrt_cov_gram / isqrt_cov_gram_backward (MPNCOV_CUDA_PRODUCTS=cublas), run here on CPU
tensors through the test-only ops mpncov::_isqrt_cov_gram_aten(_backward) and compared with
the CPU kernels: the same function, the same saved iterates (the backward of either reads
the other's), the same degenerate samples and dtype policy, both feature layouts."""
import pytest
import torch

import mpncov  # noqa: F401  (loads the ops)
from checks import randn as _x, rel_err as _err

F64 = torch.float64
OPS = torch.ops.mpncov

# (B, C, M): M < C, M = C, M > C, M = 1 (zero covariance), C = 1, blockwise sizes (48+).
SHAPES = [(2, 7, 3), (2, 9, 9), (2, 5, 12), (3, 6, 1), (2, 1, 5), (2, 50, 20)]


def _features(shape, layout, seed=0, dtype=F64):
    """(B, C, M) features: contiguous, or tokens (a transposed view of a contiguous
    (B, M, C) tensor, as mpncov.isqrt_cov passes channel_dim=-1 input)."""
    b, c, m = shape
    if layout == "channels_first":
        return _x(shape, seed=seed, dtype=dtype)
    x = _x((b, m, c), seed=seed, dtype=dtype).transpose(1, 2)
    # (with C = 1 or M = 1 the view is contiguous too, and counts as channels first)
    assert x.transpose(1, 2).is_contiguous() and (x.is_contiguous() == (min(c, m) == 1))
    return x


def _both(x, g, iters, recompute_t=False):
    """(vec, saved, dx) of the CPU kernels and of the ATen implementation."""
    results = []
    for fwd, bwd in ((OPS.isqrt_cov_gram, OPS.isqrt_cov_gram_backward),
                     (OPS._isqrt_cov_gram_aten, OPS._isqrt_cov_gram_aten_backward)):
        vec, saved = fwd(x, iters, recompute_t)
        results.append((vec, saved, bwd(g, x, saved, iters)))
    return results


def _grad_for(shape, seed=1, dtype=F64):
    b, c, _ = shape
    return _x((b, c * (c + 1) // 2), seed=seed, dtype=dtype)


@pytest.mark.parametrize("recompute_t", [False, True])
@pytest.mark.parametrize("layout", ["channels_first", "tokens"])
@pytest.mark.parametrize("iters", [1, 2, 3, 4, 5, 6, 7, 8, 12])
@pytest.mark.parametrize("shape", SHAPES)
def test_aten_equals_the_cpu_kernels_in_float64(shape, iters, layout, recompute_t):
    x = _features(shape, layout, seed=shape[1] + shape[2])
    g = _grad_for(shape)
    (vec, saved, dx), (vec_a, saved_a, dx_a) = _both(x, g, iters, recompute_t)
    assert vec_a.dtype == F64 and saved_a.shape == saved.shape and saved_a.dtype == saved.dtype
    assert _err(vec_a, vec) <= 1e-12 and _err(dx_a, dx) <= 1e-12
    if shape[2] == 1:  # one position: zero output and gradient (the CPU leaves saved unset)
        assert not vec_a.any() and not dx_a.any()
        return
    assert _err(saved_a, saved) <= 1e-12
    # the same saved layout: each backward reads the other forward's iterates
    assert _err(OPS._isqrt_cov_gram_aten_backward(g, x, saved, iters), dx) <= 1e-12
    assert _err(OPS.isqrt_cov_gram_backward(g, x, saved_a, iters), dx) <= 1e-12
    # dX in x's layout (token-major for tokens), as the CPU kernel and the fake kernels say
    assert dx_a.stride() == dx.stride()


@pytest.mark.parametrize("iters", [1, 5, 12])
@pytest.mark.parametrize("layout", ["channels_first", "tokens"])
def test_zero_and_nan_samples_next_to_normal_ones(iters, layout):
    x = _features((4, 9, 5), layout, seed=8).clone()  # clone keeps the token strides
    x[1] = 3.0                  # constant features: zero output, zero gradient
    x[2, 4, 2] = float("nan")   # NaN: NaN output and gradient for that sample only
    g = _grad_for((4, 9, 5), seed=9)
    (vec, _, dx), (vec_a, _, dx_a) = _both(x, g, iters)
    assert not vec_a[1].any() and not dx_a[1].any()
    assert torch.isnan(vec_a[2]).all() and torch.isnan(dx_a[2]).all()
    keep = [0, 3]
    assert torch.isfinite(vec_a[keep]).all() and torch.isfinite(dx_a[keep]).all()
    assert _err(vec_a[keep], vec[keep]) <= 1e-12 and _err(dx_a[keep], dx[keep]) <= 1e-12


@pytest.mark.parametrize("layout", ["channels_first", "tokens"])
@pytest.mark.parametrize("iters", [1, 5, 12])
def test_float32_within_float32_tolerance_of_float64(iters, layout):
    shape = (3, 40, 17)
    x = _features(shape, layout, seed=4)
    g = _grad_for(shape, seed=5)
    (vec64, _, dx64), _ = _both(x, g, iters)
    x32, g32 = x.float(), g.float()
    vec, saved = OPS._isqrt_cov_gram_aten(x32, iters)
    dx = OPS._isqrt_cov_gram_aten_backward(g32, x32, saved, iters)
    # long runs compute float32 in float64 (csrc/limits.h), and keep float64 iterates
    assert saved.dtype == (F64 if iters > 8 else torch.float32)
    assert vec.dtype == torch.float32 and dx.dtype == torch.float32
    assert _err(vec, vec64) < 1e-5 and _err(dx, dx64) < 1e-4
    (vec_c, _, dx_c), _ = _both(x32, g32, iters)
    assert _err(vec, vec_c) < 1e-5 and _err(dx, dx_c) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["channels_first", "tokens"])
def test_half_precision_input_is_computed_in_float32(dtype, tol, layout):
    shape = (2, 20, 9)
    x = _features(shape, layout, seed=15, dtype=dtype)
    g = _grad_for(shape, seed=16, dtype=dtype)
    (vec, saved, dx), (vec_a, saved_a, dx_a) = _both(x, g, 5)
    assert vec_a.dtype == dtype and dx_a.dtype == dtype and saved_a.dtype == torch.float32
    # the same float32 computation up to rounding: equal after rounding to `dtype`, or one
    # unit of it apart
    assert _err(vec_a, vec) <= tol and _err(dx_a, dx) <= tol
    (vec64, _, dx64), _ = _both(x.double(), g.double(), 5)
    assert _err(vec_a, vec64) < tol and _err(dx_a, dx64) < 10 * tol


def test_tokens_give_the_values_of_contiguous_features():
    shape = (2, 30, 11)
    x = _features(shape, "tokens", seed=3)
    g = _grad_for(shape, seed=6)
    vec, saved = OPS._isqrt_cov_gram_aten(x, 5)
    dx = OPS._isqrt_cov_gram_aten_backward(g, x, saved, 5)
    xc = x.contiguous()
    vec_c, saved_c = OPS._isqrt_cov_gram_aten(xc, 5)
    dx_c = OPS._isqrt_cov_gram_aten_backward(g, xc, saved_c, 5)
    # other BLAS operand orders: rounding may differ
    assert _err(vec, vec_c) <= 1e-14 and _err(dx, dx_c) <= 1e-14
    assert dx.transpose(1, 2).is_contiguous() and dx_c.is_contiguous()


def test_tiny_and_huge_features_stay_finite_and_accurate():
    x = _x((2, 8, 5), seed=12)
    g = _grad_for((2, 8, 5), seed=13)
    vec1, saved1 = OPS._isqrt_cov_gram_aten(x, 5)
    dx1 = OPS._isqrt_cov_gram_aten_backward(g, x, saved1, 5)
    for scale in (1e-160, 1e200):  # a denormal float64 trace; squares that overflow
        vec, saved = OPS._isqrt_cov_gram_aten(x * scale, 5)
        dx = OPS._isqrt_cov_gram_aten_backward(g, x * scale, saved, 5)
        assert torch.isfinite(vec).all() and torch.isfinite(dx).all()
        assert _err(vec / scale, vec1) < 1e-12 and _err(dx, dx1) < 1e-12
    x32 = (x * 1e-20).float()  # float32: the trace (1e-40) is a denormal
    vec, saved = OPS._isqrt_cov_gram_aten(x32, 5)
    dx = OPS._isqrt_cov_gram_aten_backward(g.float(), x32, saved, 5)
    assert torch.isfinite(vec).all() and torch.isfinite(dx).all() and vec.abs().max() > 0
    assert _err(vec.double() * 1e20, vec1) < 1e-5 and _err(dx.double(), dx1) < 1e-4


def test_empty_batch_and_no_channels():
    vec, saved = OPS._isqrt_cov_gram_aten(torch.zeros(2, 0, 4), 3)
    assert vec.shape == (2, 0) and saved.shape == (2, 7, 4, 4)
    vec, saved = OPS._isqrt_cov_gram_aten(torch.zeros(0, 6, 4, dtype=F64), 3, True)
    assert vec.shape == (0, 21) and saved.shape == (0, 5, 4, 4)
    dx = OPS._isqrt_cov_gram_aten_backward(torch.zeros(0, 21), torch.zeros(0, 6, 4), saved, 3)
    assert dx.shape == (0, 6, 4)


def test_token_features_are_not_copied():
    # The features are never made contiguous: no copy of a (B, C, M) or (B, M, C) tensor
    # except inside baddbmm_ (the CPU's in-place product copies its own result; on CUDA
    # cuBLAS accumulates in place).
    from torch.profiler import profile
    x = _features((2, 30, 11), "tokens", seed=7)
    g = _grad_for((2, 30, 11), seed=8)
    with profile(record_shapes=True) as prof:
        vec, saved = OPS._isqrt_cov_gram_aten(x, 3)
        OPS._isqrt_cov_gram_aten_backward(g, x, saved, 3)
    feature_shapes = ([2, 30, 11], [2, 11, 30])
    copies = [e for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and e.input_shapes and list(e.input_shapes[0]) in feature_shapes
              and (e.cpu_parent is None or e.cpu_parent.name != "aten::baddbmm_")]
    assert not copies, [(e.name, e.input_shapes, e.cpu_parent and e.cpu_parent.name)
                        for e in copies]
    # and the check sees a transposed copy where there is one
    with profile(record_shapes=True) as prof:
        x.contiguous()
    assert any(e.name == "aten::copy_" and list(e.input_shapes[0]) in feature_shapes
               for e in prof.events())


@pytest.mark.parametrize("layout", ["channels_first", "tokens"])
def test_autocast_does_not_reach_the_products(layout):
    # autocast passes the ops through; the ATen ops inside must not run in bfloat16 either
    x = _features((2, 30, 11), layout, seed=9, dtype=torch.float32)
    g = _grad_for((2, 30, 11), seed=10, dtype=torch.float32)
    vec, saved = OPS._isqrt_cov_gram_aten(x, 5)
    dx = OPS._isqrt_cov_gram_aten_backward(g, x, saved, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vec_a, saved_a = OPS._isqrt_cov_gram_aten(x, 5)
        dx_a = OPS._isqrt_cov_gram_aten_backward(g, x, saved_a, 5)
    assert vec_a.dtype == saved_a.dtype == dx_a.dtype == torch.float32
    assert torch.equal(vec_a, vec) and torch.equal(saved_a, saved) and torch.equal(dx_a, dx)
