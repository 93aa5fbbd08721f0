"""The iSQRT-COV pipeline in the M x M Gram space (SPEC section 8, csrc/cpu/
isqrt_cov_gram_cpu.cpp) against the float64 references of tests/reference.py and against
the C x C covariance space: the same function, its exact gradient, every code path
(short and long iteration runs, M < C, M = C, M > C, M = 1, degenerate samples,
half-precision input), and the automatic choice of the space (mpncov/_space.py)."""
import os
import subprocess
import sys

import pytest
import torch

import mpncov
from mpncov import _space
from checks import output_and_grad as _grad, randn as _x, rel_err as _err
from reference import covpool_ref, isqrt_cov_ref, sqrtm_ref, triuvec_ref

F64 = torch.float64
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# (B, C, M): M < C (the Gram space's case), M = C, M > C, M = 1, C = 1, C at and around
# the size where symmetric products go blockwise (48), ragged blocks (130).
SHAPES = [(2, 7, 3), (2, 16, 5), (2, 9, 9), (2, 5, 12), (3, 6, 1), (2, 1, 5), (2, 47, 20),
          (2, 48, 48), (2, 130, 50), (1, 40, 60), (2, 60, 130)]


def _pipeline(space, iters):
    return lambda t: mpncov.isqrt_cov(t, iters, space=space)


# -------------------------------------------------- the same function, in float64

@pytest.mark.parametrize("iters", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_both_spaces_agree_with_the_reference_and_each_other(shape, iters):
    b, c, m = shape
    x = _x(shape, seed=c + m)
    g = _x((b, c * (c + 1) // 2), seed=1)
    out_g, dx_g = _grad(_pipeline("gram", iters), x, g)
    out_c, dx_c = _grad(_pipeline("cov", iters), x, g)
    if m == 1:  # one position: the covariance is zero, where the reference divides 0 by 0
        for t in (out_g, dx_g, out_c, dx_c):
            assert not t.any()
        return
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, iters), x, g)
    assert _err(out_g, out_c) <= 1e-12 and _err(dx_g, dx_c) <= 1e-12
    assert _err(out_g, out_r) <= 1e-12 and _err(dx_g, dx_r) <= 1e-11


@pytest.mark.parametrize("iters", [9, 12, 20])
@pytest.mark.parametrize("shape", [(2, 30, 12), (2, 12, 30)])
def test_long_runs_agree_in_float64(shape, iters):
    x = _x(shape, seed=3)
    g = _x((shape[0], shape[1] * (shape[1] + 1) // 2), seed=4)
    out_g, dx_g = _grad(_pipeline("gram", iters), x, g)
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, iters), x, g)
    assert _err(out_g, out_r) <= 1e-12 and _err(dx_g, dx_r) <= 1e-10


@pytest.mark.parametrize("iters", range(1, 9))
@pytest.mark.parametrize("shape", [(2, 6, 4), (2, 4, 7)])
def test_gradcheck_gram(shape, iters):
    x = _x(shape, seed=iters).requires_grad_()
    assert torch.autograd.gradcheck(_pipeline("gram", iters), (x,))


@pytest.mark.parametrize("space", ["cov", "gram"])
@pytest.mark.parametrize("iters", [1, 3, 5])
def test_gradgradcheck_pipeline_in_both_spaces(space, iters):
    x = _x((2, 5, 3), seed=2).requires_grad_()
    assert torch.autograd.gradgradcheck(_pipeline(space, iters), (x,))


def test_gradgradcheck_raw_gram_ops():
    x = _x((2, 5, 3), seed=5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.mpncov.isqrt_cov_gram(t, 3)[0], (x,))


def test_opcheck_gram_ops():
    x = _x((2, 6, 4)).requires_grad_()
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(x.detach(), 3)
    g = _x(vec.shape, seed=6)
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram.default, (x, 3))
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram_backward.default,
                          (g, x.detach(), saved, 3))
    tokens = _x((2, 4, 6), seed=7).transpose(1, 2).requires_grad_()  # token-major x
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram.default, (tokens, 12))
    _, saved_t = torch.ops.mpncov.isqrt_cov_gram(tokens.detach(), 12)
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram_backward.default,
                          (g, tokens.detach(), saved_t, 12))


def _gram_with(recompute_t, iters):
    return lambda t: mpncov._autograd.IsqrtCovGram.apply(t, iters, recompute_t)[0]


@pytest.mark.parametrize("iters", [1, 2, 3, 5, 8, 9, 12])
@pytest.mark.parametrize("shape", [(2, 30, 12), (2, 9, 9), (2, 12, 30), (2, 130, 50)])
def test_recomputing_t_in_the_backward_gives_the_same_gradient(shape, iters):
    x = _x(shape, seed=iters)
    g = _x((shape[0], shape[1] * (shape[1] + 1) // 2), seed=22)
    out_k, dx_k = _grad(_gram_with(False, iters), x, g)
    out_r, dx_r = _grad(_gram_with(True, iters), x, g)
    out_ref, dx_ref = _grad(lambda t: isqrt_cov_ref(t, iters), x, g)
    # the same computation (BLAS may round differently where the matrices lie elsewhere)
    assert _err(out_k, out_r) <= 1e-14
    assert _err(dx_r, dx_k) <= 1e-13 and _err(dx_r, dx_ref) <= 1e-10


@pytest.mark.parametrize("iters", [2, 5])
def test_gradcheck_and_opcheck_without_kept_t(iters):
    x = _x((2, 6, 4), seed=23).requires_grad_()
    assert torch.autograd.gradcheck(_gram_with(True, iters), (x,))
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram.default, (x, iters, True))
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(x.detach(), iters, True)
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram_backward.default,
                          (_x(vec.shape, seed=24), x.detach(), saved, iters))


def test_auto_keeps_fewer_iterates_where_recomputing_costs_little():
    # C much larger than M: the C x M and C x C products dominate
    assert _space.recompute_t(300, 10, 5) and not _space.recompute_t(256, 196, 5)
    assert not _space.recompute_t(300, 10, 1)  # nothing to recompute
    x = _x((2, 300, 10), dtype=torch.float32).requires_grad_()
    out = mpncov.isqrt_cov(x, 5)
    saved = out.grad_fn.saved_tensors[1]
    assert saved.shape == (2, 9, 10, 10)  # 2N-1 instead of 3N-2


def test_saved_iterates_are_m_by_m():
    for iters, count in [(1, 1), (2, 4), (5, 13)]:
        _, saved = torch.ops.mpncov.isqrt_cov_gram(_x((3, 20, 7)), iters)
        assert saved.shape == (3, count, 7, 7)
        _, saved = torch.ops.mpncov.isqrt_cov_gram(_x((3, 20, 7)), iters, True)
        assert saved.shape == (3, 2 * iters - 1, 7, 7)
    _, saved = torch.ops.mpncov.isqrt_cov_gram(_x((3, 20, 7), dtype=torch.float32), 9)
    assert saved.dtype == F64  # long runs compute float32 in float64
    _, saved = torch.ops.mpncov.isqrt_cov_gram(_x((3, 20, 7), dtype=torch.float16), 3)
    assert saved.dtype == torch.float32


# ------------------------------------------- accuracy at every number of iterations

def _eigh_root(s):
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.mT


# As tests/test_sqrtm_numerics.py: full rank and rank deficient covariances, so the Gram
# matrix is rank deficient (M > C) or has only the null vector 1 (M < C).
@pytest.mark.parametrize("c,m", [(64, 200), (64, 40), (130, 47), (256, 196), (48, 64)])
def test_gram_is_no_less_accurate_than_the_plain_recurrence_at_every_iters(c, m):
    x = _x((2, c, m), seed=c + m) * torch.rand(2, c, 1, generator=torch.Generator().manual_seed(1),
                                               dtype=F64)
    s = covpool_ref(x)
    s = (s + s.mT) / 2
    exact = triuvec_ref(_eigh_root(s))
    checked = 0
    for iters in range(1, 31):
        plain = triuvec_ref(sqrtm_ref(s.float(), iters)).double()
        ours = mpncov.isqrt_cov(x.float(), iters, space="gram").double()
        err_plain = (plain - exact).norm() / exact.norm()
        err = (ours - exact).norm() / exact.norm()
        if err_plain == err_plain:  # not NaN
            assert err <= 1.5 * err_plain + 1e-6, (iters, err.item(), err_plain.item())
            checked += 1
    assert checked >= 28


# ----------------------------------------------------------------- degenerate samples

@pytest.mark.parametrize("iters", [1, 5, 12])
def test_zero_nan_and_normal_samples_are_independent(iters):
    x = _x((4, 9, 5), seed=8)
    x[1] = 3.0                  # constant features: zero output, zero gradient
    x[2, 4, 2] = float("nan")   # NaN: NaN output and gradient for that sample only
    g = _x((4, 45), seed=9)
    out, dx = _grad(_pipeline("gram", iters), x, g)
    assert not out[1].any() and not dx[1].any()
    assert torch.isnan(out[2]).all() and torch.isnan(dx[2]).all()
    keep = [0, 3]
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, iters), x[keep], g[keep])
    assert _err(out[keep], out_r) <= 1e-12 and _err(dx[keep], dx_r) <= 1e-11
    # the covariance space follows the same rules
    out_c, dx_c = _grad(_pipeline("cov", iters), x, g)
    assert not out_c[1].any() and not dx_c[1].any()
    assert torch.isnan(out_c[2]).all() and torch.isnan(dx_c[2]).all()
    assert _err(out[keep], out_c[keep]) <= 1e-12 and _err(dx[keep], dx_c[keep]) <= 1e-12


@pytest.mark.parametrize("recompute_t", [False, True])
@pytest.mark.parametrize("iters", [1, 3, 12])
def test_saved_iterates_of_a_degenerate_sample_are_defined(iters, recompute_t):
    # The CPU buffer cache hands out memory that held NaN iterates a moment ago; a sample
    # with constant features must still get its own (finite) iterates, those of W = 0 that
    # the ATen form and the CUDA kernels store, so that either backward may read them.
    x = _x((2, 9, 6), seed=12)
    stale = torch.ops.mpncov.isqrt_cov_gram(torch.full_like(x, float("nan")), iters, recompute_t)
    del stale
    x[1] = 2.0
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(x, iters, recompute_t)
    assert not vec[1].any()
    assert torch.isfinite(saved[1]).all() and not saved[1, 0].any()  # slot 0 is G = 0
    _, saved_aten = torch.ops.mpncov._isqrt_cov_gram_aten(x, iters, recompute_t)
    assert _err(saved, saved_aten) <= 1e-12


def test_tiny_float32_features_give_finite_results():
    x = (_x((3, 12, 5), seed=10) * 1e-20).float()
    g = _x((3, 78), seed=11).float()
    out, dx = _grad(_pipeline("gram", 5), x, g)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and out.abs().max() > 0
    ref, dref = _grad(lambda t: isqrt_cov_ref(t, 5), x.double() * 1e20, g.double())
    assert _err(out.double() * 1e20, ref) < 1e-5
    assert _err(dx.double(), dref) < 1e-4  # the gradient does not depend on the scale


def test_denormal_float64_trace_gives_accurate_results():
    x = _x((2, 8, 5), seed=12)
    tiny = x * 1e-160           # trace about 1e-320: a denormal
    out = mpncov.isqrt_cov(tiny, 5, space="gram")
    assert torch.isfinite(out).all()
    assert _err(out / 1e-160, mpncov.isqrt_cov(x, 5, space="gram")) < 1e-12
    g = _x((2, 36), seed=13)
    _, dx = _grad(_pipeline("gram", 5), tiny, g)
    _, dx1 = _grad(_pipeline("gram", 5), x, g)
    assert _err(dx, dx1) < 1e-12


def test_huge_float64_features_do_not_overflow():
    x = _x((2, 8, 5), seed=14)
    out = mpncov.isqrt_cov(x * 1e200, 5, space="gram")
    assert _err(out / 1e200, mpncov.isqrt_cov(x, 5, space="gram")) < 1e-12


# --------------------------------------------------------- dtypes, layouts, batches

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-3),
                                       (torch.bfloat16, 2e-2)])
def test_low_precision_features(dtype, tol):
    x = _x((2, 20, 9), seed=15)
    g = _x((2, 210), seed=16)
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, 5), x.to(dtype).double(), g)
    out, dx = _grad(_pipeline("gram", 5), x.to(dtype), g.to(dtype))
    assert out.dtype == dtype and dx.dtype == dtype
    assert _err(out, out_r) < tol and _err(dx, dx_r) < 10 * tol


def test_empty_batch_and_no_channels():
    x = torch.zeros(0, 6, 4, dtype=F64, requires_grad=True)
    out = mpncov.isqrt_cov(x, 3, space="gram")
    assert out.shape == (0, 21)
    out.sum().backward()
    assert x.grad.shape == x.shape
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(torch.zeros(2, 0, 4), 3)
    assert vec.shape == (2, 0) and saved.shape == (2, 7, 4, 4)


def test_non_contiguous_and_channels_last_equal_contiguous():
    x = _x((2, 12, 3, 2), seed=17)
    g = _x((2, 78), seed=18)
    ref = _grad(_pipeline("gram", 5), x, g)
    for y in (x.to(memory_format=torch.channels_last), _x((2, 24, 3, 2))[:, ::2].copy_(x),
              x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not y.is_contiguous()
        out, dx = _grad(_pipeline("gram", 5), y, g)
        # channels_last is read as tokens (other BLAS operand orders: rounding may differ)
        assert _err(out, ref[0]) <= 1e-14 and _err(dx, ref[1]) <= 1e-14


def test_results_do_not_depend_on_threads():
    x = _x((37, 40, 30), dtype=torch.float32)
    g = _x((37, 820), seed=3, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _grad(_pipeline("gram", 5), x, g)
        torch.set_num_threads(max(2, threads))
        for _ in range(2):
            out = _grad(_pipeline("gram", 5), x, g)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    finally:
        torch.set_num_threads(threads)


# Both implementations of the raw ops check their arguments: the CPU kernels and the batched
# ATen one (CUDA's cuBLAS path; on CPU tensors through its test-only ops, test_gram_aten.py).
_RAW_OPS = {"cpu": (torch.ops.mpncov.isqrt_cov_gram, torch.ops.mpncov.isqrt_cov_gram_backward),
            "aten": (torch.ops.mpncov._isqrt_cov_gram_aten,
                     torch.ops.mpncov._isqrt_cov_gram_aten_backward)}


@pytest.mark.parametrize("impl", sorted(_RAW_OPS))
@pytest.mark.parametrize("call, words", [
    (lambda fwd, bwd: fwd(torch.zeros(2, 3), 3), "[2, 3]"),
    (lambda fwd, bwd: fwd(torch.zeros(2, 3, 0), 3), "[2, 3, 0]"),
    (lambda fwd, bwd: fwd(torch.zeros(2, 3, 4, dtype=torch.int32), 3), "Int"),
    (lambda fwd, bwd: fwd(torch.zeros(2, 3, 4), 0), "got 0"),
    (lambda fwd, bwd: bwd(torch.zeros(2, 5), torch.zeros(2, 3, 4), torch.zeros(2, 7, 4, 4), 3),
     "[2, 5]"),
    (lambda fwd, bwd: bwd(torch.zeros(2, 6), torch.zeros(2, 3, 4), torch.zeros(2, 7, 3, 3), 3),
     "[2, 7, 3, 3]"),
    (lambda fwd, bwd: bwd(torch.zeros(2, 6), torch.zeros(2, 3, 4), torch.zeros(2, 1, 4, 4), 101),
     "got 101"),
])
def test_raw_gram_ops_reject_bad_input(call, words, impl):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call(*_RAW_OPS[impl])
    assert words in str(info.value)


# ------------------------------------------------------------- choosing the space

def test_space_argument_is_checked():
    with pytest.raises(ValueError, match="space must be one of .*got 'gramm'"):
        mpncov.isqrt_cov(_x((2, 5, 4)), 3, space="gramm")


def test_cost_model_prefers_the_smaller_space():
    # the ResNet-50 head at 224 px, and ViT-S/16 tokens (N = 197, C = 384)
    assert _space.choose(256, 196, 5) == "gram"
    assert _space.choose(384, 197, 5) == "gram"
    # as many positions as channels or more: the covariance space
    for c, m in [(256, 256), (64, 196), (128, 784)]:
        for n in (1, 3, 5):
            assert _space.choose(c, m, n) == "cov"
    # M < C is not enough by itself: with one iteration the recurrence costs little in
    # either space, and mapping back costs more than it saves
    assert _space.choose(256, 200, 1) == "cov" and _space.choose(256, 100, 1) == "gram"
    # the model's counts at the ResNet-50 head: 66 M forward multiply-adds in the Gram space
    # against 107 M (SPEC section 8) plus the backwards
    assert _space.cost("gram", 256, 196, 5) < 0.75 * _space.cost("cov", 256, 196, 5)


def test_auto_runs_the_chosen_space():
    def space_of(x):
        # the autograd node of the op that ran: the raw op's under plain autograd
        # ("GeneratedBackwardFor_mpncov_isqrt_cov_gram_default..."), the autograd.Function's
        # under torch.func ("IsqrtCovGramBackward")
        name = type(mpncov.isqrt_cov(x.requires_grad_(), 5).grad_fn).__name__
        name = name.lower().replace("_", "")
        assert "isqrtcov" in name, name
        return "gram" if "isqrtcovgram" in name else "cov"

    assert space_of(_x((2, 64, 16))) == "gram"
    assert space_of(_x((2, 16, 64))) == "cov"


def test_auto_only_picks_the_gram_space_where_it_has_a_kernel(monkeypatch):
    x = _x((2, 64, 16))
    assert _space.resolve("auto", x, 5, "isqrt_cov") == "gram"
    monkeypatch.setattr(_space, "_GRAM_DEVICES", frozenset())  # a device without the kernel
    assert _space.resolve("auto", x, 5, "isqrt_cov") == "cov"
    with pytest.raises(NotImplementedError, match="space='gram' has no kernel for cpu"):
        mpncov.isqrt_cov(x, 5, space="gram")
    assert _space.has_gram_kernel("cpu")


def test_auto_picks_by_the_cost_model_only_where_it_was_fitted(monkeypatch):
    # CUDA has a Gram-space kernel, but the model describes CPU times: auto keeps "cov"
    monkeypatch.setattr(_space, "_GRAM_DEVICES", frozenset({"cpu", "cuda"}))
    assert _space.choose(256, 49, 5) == "gram"
    assert _space.auto_space(256, 49, 5, "cpu") == "gram"
    assert _space.auto_space(256, 49, 5, "cuda") == "cov"
    assert "cuda" not in _space.COST_MODEL_DEVICES


def test_compile_traces_the_space_choice():
    x = _x((2, 24, 6), dtype=torch.float32).requires_grad_()
    g = _x((2, 300), seed=19, dtype=torch.float32)
    for space in ("auto", "gram"):
        def fn(t):
            return mpncov.isqrt_cov(t, 5, space=space)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out_e, dx_e = _grad(fn, x, g)
        out_c, dx_c = _grad(compiled, x, g)
        assert _err(out_c, out_e) < 1e-6 and _err(dx_c, dx_e) < 1e-6


def test_vmap_and_jacrev_of_the_gram_space():
    x = _x((3, 2, 6, 4), seed=20)
    out = torch.vmap(lambda t: mpncov.isqrt_cov(t, 3, space="gram"))(x)
    torch.testing.assert_close(out, isqrt_cov_ref(x.flatten(0, 1), 3).view(3, 2, 21))
    xs = _x((2, 5, 3), seed=21)
    torch.testing.assert_close(torch.func.jacrev(_pipeline("gram", 3))(xs),
                               torch.func.jacrev(lambda t: isqrt_cov_ref(t, 3))(xs))


# ------------------------------------------------- the ATen product path, AVX2 mirror

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import mpncov
from reference import isqrt_cov_ref
results = {}
for dtype in (torch.float64, torch.float32):
    for b, c, m, tokens in ((2, 7, 5, False), (2, 130, 50, False), (2, 130, 50, True),
                            (2, 60, 100, True)):
        g = torch.Generator().manual_seed(c + m)
        x = torch.randn(b, m, c, generator=g, dtype=torch.float64).transpose(1, 2) if tokens \
            else torch.randn(b, c, m, generator=g, dtype=torch.float64)
        x = x.to(dtype).requires_grad_()
        gv = torch.randn(b, c * (c + 1) // 2, generator=g, dtype=torch.float64).to(dtype)
        for iters in (3, 10):
            out = mpncov.isqrt_cov(x, iters, space="gram")
            (dx,) = torch.autograd.grad(out, x, gv)
            xr = x.detach().double().requires_grad_()
            out_r = isqrt_cov_ref(xr, iters)
            (dx_r,) = torch.autograd.grad(out_r, xr, gv.double())
            tol = 1e-10 if dtype == torch.float64 else 2e-3
            for a, r in ((out, out_r), (dx, dx_r)):
                err = (a.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
                assert err < tol, (dtype, c, m, tokens, iters, err)
            results[(str(dtype), c, m, tokens, iters)] = (out.detach(), dx)
torch.save(results, sys.argv[2])
print("ok")
"""


@pytest.mark.parametrize("env", [{"MPNCOV_CPU_DIRECT_BLAS": "0"}, {"MPNCOV_CPU_SIMD": "0"}])
def test_gram_on_the_other_cpu_paths(env, tmp_path):
    """Products through ATen's mm, and scalar instead of AVX2 transposes: the same results
    (bit for bit for the transposes, which only copy)."""
    outs = {}
    for name, extra in (("default", {}), ("other", env)):
        path = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, "-c", _SCRIPT, TESTS_DIR, str(path)],
                           env=dict(os.environ, **extra), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
        outs[name] = torch.load(path)
    if "MPNCOV_CPU_SIMD" in env:
        for key, (out, dx) in outs["default"].items():
            other_out, other_dx = outs["other"][key]
            assert torch.equal(out, other_out) and torch.equal(dx, other_dx)
