"""covpool, sqrtm, triuvec and the isqrt_cov pipeline against the float64 references of
tests/reference.py: values, gradients, gradcheck, opcheck, dtypes, layouts, bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch

import mpncov
from reference import covpool_ref, isqrt_cov_ref, spd, sqrtm_ref, triuvec_ref

F64 = torch.float64
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# (B, C, M): C = 1, odd C, M < C (rank deficient), M = 1, and C large enough for the
# blocked symmetric products (C >= 96) with a ragged last block.
SHAPES = [(2, 1, 5), (3, 7, 11), (2, 16, 5), (2, 5, 1), (1, 33, 40), (2, 50, 20), (2, 130, 50),
          (2, 200, 30)]


def _x(shape, device="cpu", dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(device=device, dtype=dtype)


def _close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _fresh_python(script, *args, env, timeout=600):
    """Runs `script` in a new interpreter (for process-wide state: environment switches read
    once, the CPU buffer cache), with the tests folder as its first argument."""
    return subprocess.run([sys.executable, "-c", script, TESTS_DIR, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _grad(fn, inp, g):
    inp = inp.detach().requires_grad_()
    out = fn(inp)
    (d,) = torch.autograd.grad(out, inp, g)
    return out.detach(), d


# ------------------------------------------------------------------ against references

@pytest.mark.parametrize("shape", SHAPES)
def test_covpool_matches_reference(shape, device):
    x = _x(shape, device)
    g = _x((shape[0], shape[1], shape[1]), device, seed=1)  # not symmetric
    out, dx = _grad(mpncov.covpool, x, g)
    out_r, dx_r = _grad(covpool_ref, x, g)
    _close(out, out_r, 1e-12)
    _close(dx, dx_r, 1e-12)


def test_covpool_accepts_4d_input(device):
    x = _x((2, 6, 3, 4), device)
    _close(mpncov.covpool(x), covpool_ref(x.flatten(2)), 1e-12)


@pytest.mark.parametrize("iters", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 7, 11), (2, 16, 5), (2, 50, 20), (2, 130, 50)])
def test_sqrtm_matches_reference(shape, iters, device):
    b, c, m = shape
    s = spd(b, c, m=m, device=device)
    g = _x((b, c, c), device, seed=2)  # non-symmetric incoming gradient
    out, ds = _grad(lambda t: mpncov.sqrtm(t, iters), s, g)
    out_r, ds_r = _grad(lambda t: sqrtm_ref(t, iters), s, g)
    _close(out, out_r, 1e-11)
    _close(ds, ds_r, 1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_triuvec_matches_reference(shape, device):
    b, c, _ = shape
    s = _x((b, c, c), device)
    g = _x((b, c * (c + 1) // 2), device, seed=3)
    out, ds = _grad(mpncov.triuvec, s, g)
    out_r, ds_r = _grad(triuvec_ref, s, g)
    assert torch.equal(out, out_r)
    assert torch.equal(ds, ds_r)


def test_triuvec_order_is_row_major():
    s = torch.arange(9.0).view(1, 3, 3)
    assert mpncov.triuvec(s).tolist() == [[0.0, 1.0, 2.0, 4.0, 5.0, 8.0]]


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_pipeline_matches_reference(shape, iters, device):
    b, c, _ = shape
    x = _x(shape, device)
    g = _x((b, c * (c + 1) // 2), device, seed=4)
    out, dx = _grad(lambda t: mpncov.isqrt_cov(t, iters), x, g)
    if shape[2] == 1:
        # One position: the covariance is 0, where the reference divides 0 by 0.
        assert not out.any() and not dx.any()
        return
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, iters), x, g)
    _close(out, out_r, 1e-11)
    _close(dx, dx_r, 1e-9)
    # And it equals the three ops in a row.
    out3, dx3 = _grad(lambda t: mpncov.triuvec(mpncov.sqrtm(mpncov.covpool(t), iters)), x, g)
    _close(out, out3, 1e-13)
    _close(dx, dx3, 1e-10)


# ------------------------------------------------------------------------ gradcheck

def test_gradcheck_covpool(device):
    x = _x((2, 5, 7), device).requires_grad_()
    assert torch.autograd.gradcheck(mpncov.covpool, (x,))


@pytest.mark.parametrize("iters", range(1, 9))
def test_gradcheck_sqrtm_nonsymmetric_grad(iters, device):
    # gradcheck's probes are one-hot, i.e. non-symmetric incoming gradients.
    s = spd(2, 5, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mpncov.sqrtm(t, iters), (s,))


def test_gradcheck_triuvec(device):
    s = _x((2, 4, 4), device).requires_grad_()
    assert torch.autograd.gradcheck(mpncov.triuvec, (s,))


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_gradcheck_pipeline(iters, device):
    x = _x((2, 4, 9), device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mpncov.isqrt_cov(t, iters), (x,))


# -------------------------------------------------------------------------- opcheck

def _opcheck_cases(device):
    x = _x((2, 5, 7), device).requires_grad_()
    s = spd(2, 5, device=device).requires_grad_()
    cov = mpncov.covpool(x.detach())
    _, saved = torch.ops.mpncov.sqrtm(s.detach(), 3)
    _, cov2, saved2 = torch.ops.mpncov.isqrt_cov(x.detach(), 3)
    g_cc = _x((2, 5, 5), device, seed=5)
    g_k = _x((2, 15), device, seed=6)
    gram = []
    if mpncov._space.has_gram_kernel(x.device.type):
        _, saved3 = torch.ops.mpncov.isqrt_cov_gram(x.detach(), 3)
        gram = [(torch.ops.mpncov.isqrt_cov_gram.default, (x, 3)),
                (torch.ops.mpncov.isqrt_cov_gram_backward.default, (g_k, x.detach(), saved3, 3))]
    return [
        (torch.ops.mpncov.covpool.default, (x,)),
        (torch.ops.mpncov.covpool_backward.default, (g_cc, x.detach())),
        (torch.ops.mpncov.sqrtm.default, (s, 3)),
        (torch.ops.mpncov.sqrtm_backward.default, (g_cc, s.detach(), saved, 3)),
        (torch.ops.mpncov.triuvec.default, (s,)),
        (torch.ops.mpncov.triuvec_backward.default, (g_k, 5)),
        (torch.ops.mpncov.isqrt_cov.default, (x, 3)),
        (torch.ops.mpncov.isqrt_cov_backward.default, (g_k, x.detach(), cov2, saved2, 3)),
        *gram,
    ]


def test_opcheck_all_ops(device):
    cases = _opcheck_cases(device)
    expected = set(mpncov.ops.OPS)
    if not mpncov._space.has_gram_kernel(device):
        expected -= {"isqrt_cov_gram", "isqrt_cov_gram_backward"}
    assert {op.__name__.split(".")[0] for op, _ in cases} == expected
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------- compile, autocast, convergence

def test_compile_fullgraph_equals_eager():
    x = _x((2, 6, 10), dtype=torch.float32).requires_grad_()
    g = _x((2, 21), dtype=torch.float32, seed=7)

    def fn(t):
        return mpncov.isqrt_cov(t, 5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_e, dx_e = _grad(fn, x, g)
    out_c, dx_c = _grad(compiled, x, g)
    _close(out_c, out_e, 1e-6)
    _close(dx_c, dx_e, 1e-6)


def test_compile_inductor_three_ops():
    x = _x((2, 6, 10), dtype=torch.float32)

    def fn(t):
        return mpncov.triuvec(mpncov.sqrtm(mpncov.covpool(t), 3)) * 2

    compiled = torch.compile(fn, fullgraph=True)
    _close(compiled(x), fn(x), 1e-6)


def test_autocast_cpu_bf16():
    conv = torch.nn.Conv2d(3, 8, 1).double()
    x = _x((2, 3, 5, 5))
    ref = isqrt_cov_ref(conv(x), 5)
    conv32, x32 = conv.float(), x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat = conv32(x32)
        assert feat.dtype == torch.bfloat16
        out = mpncov.isqrt_cov(feat, 5)
    assert out.dtype == torch.bfloat16
    # bf16 activations carry ~3 significant digits; the pooling itself runs in fp32.
    _close(out, ref, 3e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conv32.parameters())


def test_many_iterations_converge_to_eigh_sqrt():
    s = spd(3, 8, m=40, seed=8)  # well conditioned
    evals, evecs = torch.linalg.eigh(s)
    exact = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(1, 2)
    rel = (mpncov.sqrtm(s, 30) - exact).norm() / exact.norm()
    assert rel < 1e-8
    # ...while few iterations are deliberately not the exact root (SPEC section 2).
    assert (mpncov.sqrtm(s, 3) - exact).norm() / exact.norm() > 1e-3


# ----------------------------------------------------------------------- degenerate

def test_zero_trace_gives_zero_output_and_finite_gradients(device):
    x = torch.ones(2, 4, 6, dtype=F64, device=device).requires_grad_()  # constant features
    s = torch.zeros(2, 4, 4, dtype=F64, device=device).requires_grad_()
    for fn, inp in [(lambda t: mpncov.isqrt_cov(t, 5), x), (lambda t: mpncov.sqrtm(t, 5), s),
                    (lambda t: mpncov.sqrtm(t, 1), s)]:
        out = fn(inp)
        assert torch.equal(out, torch.zeros_like(out))
        (d,) = torch.autograd.grad(out, inp, torch.randn_like(out))
        assert torch.isfinite(d).all() and torch.equal(d, torch.zeros_like(d))


def test_tiny_trace_does_not_overflow():
    s = spd(2, 6, dtype=torch.float32) * 1e-30
    s.requires_grad_()
    out = mpncov.sqrtm(s, 5)
    assert torch.isfinite(out).all()
    _close(out / 1e-15, sqrtm_ref(spd(2, 6), 5), 1e-4)
    (d,) = torch.autograd.grad(out, s, torch.randn_like(out))
    assert torch.isfinite(d).all()


def test_sqrtm_saved_of_a_zero_trace_sample_is_zero():
    # Defined contents whatever the CPU buffer cache held before (NaN iterates here).
    s = torch.eye(5, dtype=torch.float64).repeat(2, 1, 1)
    stale = torch.ops.mpncov.sqrtm(torch.full_like(s, float("nan")), 4)
    del stale
    s[1] = 0
    out, saved = torch.ops.mpncov.sqrtm(s, 4)
    assert not out[1].any() and not saved[1].any() and saved[0].any()


def test_zero_sample_does_not_affect_others():
    s = spd(3, 5)
    s[1] = 0
    out = mpncov.sqrtm(s, 5)
    _close(out[[0, 2]], sqrtm_ref(s[[0, 2]], 5), 1e-12)
    assert torch.equal(out[1], torch.zeros(5, 5, dtype=F64))


def test_cpu_results_do_not_depend_on_threads():
    # The CPU kernels hand samples to threads on demand, so which thread computes a sample
    # changes from call to call; every sample must still come out bitwise the same.
    x = _x((37, 40, 30), dtype=torch.float32)
    g = _x((37, 40 * 41 // 2), dtype=torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _grad(lambda t: mpncov.isqrt_cov(t, 5), x, g)
        torch.set_num_threads(max(2, threads))
        for _ in range(3):
            out = _grad(lambda t: mpncov.isqrt_cov(t, 5), x, g)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------- dtype x device x layout

DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
def test_dtypes(dtype, device):
    x = _x((2, 9, 20), device) * 0.5
    g = _x((2, 45), device, seed=9)
    out_r, dx_r = _grad(lambda t: isqrt_cov_ref(t, 5), x, g)
    out, dx = _grad(lambda t: mpncov.isqrt_cov(t, 5), x.to(dtype), g.to(dtype))
    assert out.dtype == dtype and dx.dtype == dtype
    _close(out, out_r, DTYPE_TOL[dtype])
    _close(dx, dx_r, 10 * DTYPE_TOL[dtype])
    for fn, ref, inp in [(mpncov.covpool, covpool_ref, x),
                         (lambda t: mpncov.sqrtm(t, 3), lambda t: sqrtm_ref(t, 3), covpool_ref(x)),
                         (mpncov.triuvec, triuvec_ref, covpool_ref(x))]:
        y = fn(inp.to(dtype))
        assert y.dtype == dtype
        _close(y, ref(inp), DTYPE_TOL[dtype])


def test_non_contiguous_and_channels_last_equal_contiguous(device):
    x = _x((2, 6, 5, 7), device)
    layouts = [x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
               _x((2, 12, 5, 7), device)[:, ::2]]
    layouts[2].copy_(x)
    for i, y in enumerate(layouts):
        assert not y.is_contiguous()
        g = torch.ones(2, 21, dtype=F64, device=device)
        results = [(mpncov.covpool(t), *_grad(lambda u: mpncov.isqrt_cov(u, 3), t, g))
                   for t in (y, x)]
        for a, b in zip(*results):
            if i == 0 and device == "cpu":
                # channels_last is read as it is (as tokens): other BLAS operand orders, so
                # the rounding may differ
                _close(a, b, 1e-14)
            else:  # copied to channels first
                assert torch.equal(a, b)
    s = spd(2, 6, device=device)
    st = s.transpose(1, 2)  # same values (symmetric), transposed strides
    assert torch.equal(mpncov.sqrtm(st, 3), mpncov.sqrtm(s, 3))
    wide = torch.zeros(2, 6, 12, dtype=F64, device=device)
    wide[:, :, :6] = s
    assert torch.equal(mpncov.triuvec(wide[:, :, :6]), mpncov.triuvec(s))


def test_empty_batch(device):
    x = torch.zeros(0, 4, 9, dtype=F64, device=device, requires_grad=True)
    assert mpncov.covpool(x).shape == (0, 4, 4)
    assert mpncov.sqrtm(torch.zeros(0, 4, 4, dtype=F64, device=device), 3).shape == (0, 4, 4)
    assert mpncov.triuvec(torch.zeros(0, 4, 4, device=device)).shape == (0, 10)
    out = mpncov.isqrt_cov(x, 3)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call, exc, words", [
    (lambda: mpncov.covpool(torch.zeros(4, 4)), ValueError, "(4, 4)"),
    (lambda: mpncov.covpool(torch.zeros(1, 2, 3, 4, 5)), ValueError, "(1, 2, 3, 4, 5)"),
    (lambda: mpncov.covpool(torch.zeros(2, 3, 0)), ValueError, "(2, 3, 0)"),
    (lambda: mpncov.covpool(torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "torch.int64"),
    (lambda: mpncov.covpool(torch.zeros(2, 3, 4, dtype=torch.complex64)), TypeError, "complex64"),
    (lambda: mpncov.covpool([[1.0]]), TypeError, "list"),
    (lambda: mpncov.sqrtm(torch.zeros(2, 3, 4)), ValueError, "(2, 3, 4)"),
    (lambda: mpncov.sqrtm(torch.zeros(3, 3)), ValueError, "(3, 3)"),
    (lambda: mpncov.sqrtm(torch.eye(3).expand(2, 3, 3), 0), ValueError, "got 0"),
    (lambda: mpncov.sqrtm(torch.eye(3).expand(2, 3, 3), 2.5), TypeError, "float"),
    (lambda: mpncov.sqrtm(torch.eye(3).expand(2, 3, 3).int()), TypeError, "torch.int32"),
    (lambda: mpncov.triuvec(torch.zeros(2, 3, 4)), ValueError, "(2, 3, 4)"),
    (lambda: mpncov.isqrt_cov(torch.zeros(2, 3, 4), -1), ValueError, "got -1"),
])
def test_bad_input_raises_with_a_clear_message(call, exc, words):
    with pytest.raises(exc, match=None) as info:
        call()
    assert words in str(info.value)


@pytest.mark.parametrize("call, words", [
    (lambda: torch.ops.mpncov.covpool(torch.zeros(4, 4)), "[4, 4]"),
    (lambda: torch.ops.mpncov.sqrtm(torch.zeros(2, 3, 4), 3), "[2, 3, 4]"),
    (lambda: torch.ops.mpncov.sqrtm(torch.eye(3).expand(1, 3, 3), 0), "got 0"),
    (lambda: torch.ops.mpncov.triuvec(torch.zeros(2, 2, 2, dtype=torch.int32)), "Int"),
    (lambda: torch.ops.mpncov.triuvec_backward(torch.zeros(2, 5), 3), "[2, 5]"),
    (lambda: torch.ops.mpncov.covpool_backward(torch.zeros(2, 3, 3), torch.zeros(2, 4, 5)), "[2, 4, 5]"),
    (lambda: torch.ops.mpncov.sqrtm_backward(torch.zeros(1, 3, 3), torch.eye(3)[None],
                                             torch.zeros(1, 2, 3, 3), 3), "[1, 2, 3, 3]"),
])
def test_raw_ops_reject_bad_input(call, words):
    # The C++ kernels check too: a direct torch.ops call never crashes or answers wrongly.
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call()
    assert words in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_on_different_devices_raise():
    x = torch.randn(2, 3, 5, device="cuda")
    g = torch.randn(2, 3, 3)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.mpncov.covpool_backward(g, x)


def test_info_reports_ops():
    from mpncov import info
    text = info.report()
    for name in ("torch", "covpool", "sqrtm_backward", "CUDA kernels"):
        assert name in text


# ------------------------------------------------------------ the ATen product path

_FALLBACK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import mpncov
from reference import isqrt_cov_ref, sqrtm_ref, spd
assert mpncov.info.cpu_products().startswith("ATen mm"), mpncov.info.cpu_products()
for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
    for b, c, m in ((2, 7, 11), (2, 130, 50), (2, 200, 30)):
        g = torch.Generator().manual_seed(c)
        x = torch.randn(b, c, m, generator=g, dtype=torch.float64)
        gv = torch.randn(b, c * (c + 1) // 2, generator=g, dtype=torch.float64)
        xs = x.to(dtype).requires_grad_()
        out = mpncov.isqrt_cov(xs, 3)
        (dx,) = torch.autograd.grad(out, xs, gv.to(dtype))
        xr = x.clone().requires_grad_()
        out_r = isqrt_cov_ref(xr, 3)
        (dx_r,) = torch.autograd.grad(out_r, xr, gv)
        for a, r in ((out, out_r), (dx, dx_r)):
            err = (a.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
            assert err < tol, (dtype, c, err)
        s = spd(b, c).to(dtype).requires_grad_()
        gs = torch.randn(b, c, c, generator=g, dtype=torch.float64)
        (ds,) = torch.autograd.grad(mpncov.sqrtm(s, 4), s, gs.to(dtype))
        sr = spd(b, c).requires_grad_()
        (ds_r,) = torch.autograd.grad(sqrtm_ref(sr, 4), sr, gs)
        err = (ds.double() - ds_r).abs().max().item() / max(1.0, ds_r.abs().max().item())
        assert err < tol, ("sqrtm", dtype, c, err)
print("ok")
"""


def test_aten_product_path_matches_reference():
    """MPNCOV_CPU_DIRECT_BLAS=0 sends every CPU product through ATen's mm (the path used
    where torch's BLAS exports no sgemm_/dgemm_); it must give the same results."""
    assert mpncov.info.cpu_products().startswith("direct BLAS") or "exports no" in \
        mpncov.info.cpu_products()
    r = _fresh_python(_FALLBACK_SCRIPT, env=dict(os.environ, MPNCOV_CPU_DIRECT_BLAS="0"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ------------------------------------------------------- AVX2 and scalar transposes

# Computes the pipeline (every symmetric product is mirrored), covpool's backward and
# sqrtm's symmetric-gradient backward (both symmetrise a gradient) and saves the results.
_TRANSPOSE_SCRIPT = r"""
import sys, torch
import mpncov
results = {"kind": torch.ops.mpncov._cpu_transpose_kernel()}
for dtype in (torch.float64, torch.float32):
    # sizes that are not multiples of the 8 x 8 / 4 x 4 register tiles, and several row blocks
    for b, c, m in ((2, 7, 11), (2, 50, 20), (2, 130, 50), (2, 203, 30)):
        g = torch.Generator().manual_seed(c)
        x = torch.randn(b, c, m, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        gv = torch.randn(b, c * (c + 1) // 2, generator=g, dtype=torch.float64).to(dtype)
        gc = torch.randn(b, c, c, generator=g, dtype=torch.float64).to(dtype)
        out = mpncov.isqrt_cov(x, 3)
        (dx,) = torch.autograd.grad(out, x, gv)
        (dxc,) = torch.autograd.grad(mpncov.covpool(x), x, gc)
        results[(str(dtype), c)] = (out.detach(), dx, dxc)
torch.save(results, sys.argv[2])
"""


@pytest.mark.skipif(torch.ops.mpncov._cpu_transpose_kernel() != "avx2",
                    reason="this CPU has no AVX2: only the scalar transposes exist")
def test_avx2_and_scalar_transposes_give_identical_results(tmp_path):
    """The mirror of symmetric results and the symmetrised gradients are plain copies and
    sums, so the AVX2 transposes must give the scalar path's results bit for bit."""
    results = {}
    for simd in ("1", "0"):
        path = tmp_path / f"simd{simd}.pt"
        r = _fresh_python(_TRANSPOSE_SCRIPT, path, env=dict(os.environ, MPNCOV_CPU_SIMD=simd))
        assert r.returncode == 0, r.stdout + r.stderr
        results[simd] = torch.load(path)
    assert results["1"].pop("kind") == "avx2" and results["0"].pop("kind") == "scalar"
    assert results["1"].keys() == results["0"].keys()
    for key, fast in results["1"].items():
        for a, b in zip(fast, results["0"][key]):
            assert torch.equal(a, b), key


# ------------------------------------------------------------ reused CPU buffers

# The buffer cache is process-wide state (and other tests' objects may still hold
# buffers), so these checks run in a fresh interpreter.
_BUFFER_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import mpncov
from reference import spd, sqrtm_ref

def saved_of(s, iters):
    return torch.ops.mpncov.sqrtm(s, iters)[1]

assert mpncov.cpu_buffer_bytes() == 0
s = spd(3, 20, dtype=torch.float32)
first = saved_of(s, 4)
ptr, copy = first.data_ptr(), first.clone()
assert first._base is None  # the op's output is not a view of the cached buffer
# While `first` is alive its memory is not handed out again...
second = saved_of(s * 2, 4)
assert second.data_ptr() != ptr and torch.equal(first, copy)
# ... nor while only a view of it is alive.
view = first[1]
del first
third = saved_of(s, 4)
assert third.data_ptr() != ptr and torch.equal(view, copy[1])
del view, second, third
# Once nothing refers to it, the next call of the same size reuses it.
assert saved_of(s, 4).data_ptr() == ptr
# Training steps: the graph holds the buffer, the backward lets it go.
x = torch.randn(3, 20, 30, requires_grad=True)
g = torch.randn(3, 210)
ptrs = set()
for _ in range(3):
    out = mpncov.isqrt_cov(x, 4)
    ptrs.add(out.grad_fn.saved_tensors[2].data_ptr())
    torch.autograd.grad(out, x, g)
    del out
assert len(ptrs) == 1, ptrs

# release_cpu_buffers frees what is not in use; at most two buffers are kept.
mpncov.release_cpu_buffers()
assert mpncov.cpu_buffer_bytes() == 0
s = spd(2, 9, dtype=torch.float32)
nbytes = 2 * 7 * 81 * 4  # (B, 3N-2, C, C) float32 for N = 3
held = saved_of(s, 3)
assert mpncov.cpu_buffer_bytes() == nbytes
mpncov.release_cpu_buffers()  # in use: kept
assert mpncov.cpu_buffer_bytes() == nbytes
del held
mpncov.release_cpu_buffers()
assert mpncov.cpu_buffer_bytes() == 0
alive = [saved_of(spd(1, c, dtype=torch.float32), 2) for c in (3, 4, 5)]
assert mpncov.cpu_buffer_bytes() == 4 * 4 * (9 + 16)
del alive
# MPNCOV_CPU_BUFFER_CACHE=0: nothing kept, same results.
mpncov.release_cpu_buffers()
os.environ["MPNCOV_CPU_BUFFER_CACHE"] = "0"
out, saved = torch.ops.mpncov.sqrtm(s, 3)
assert mpncov.cpu_buffer_bytes() == 0
err = (out.double() - sqrtm_ref(spd(2, 9), 3)).abs().max().item()
assert err < 1e-4, err
print("ok")
"""


def test_saved_buffer_reuse_release_and_opt_out():
    env = {k: v for k, v in os.environ.items() if k != "MPNCOV_CPU_BUFFER_CACHE"}
    r = _fresh_python(_BUFFER_SCRIPT, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# A data loader forks while another thread may be inside an mpncov call that holds the
# buffer cache's lock. The test hook holds that lock for a second in a thread; the fork
# lands inside that second. A child that inherited the lock held would block forever on
# its first mpncov call.
_FORK_SCRIPT = r"""
import os, threading, time, torch
import mpncov
holder = threading.Thread(target=torch.ops.mpncov._cpu_hold_buffer_cache_lock, args=(1000,))
holder.start()
time.sleep(0.2)
pid = os.fork()
if pid == 0:
    s = torch.eye(3)[None].requires_grad_()
    out = mpncov.sqrtm(s, 3)
    out.sum().backward()
    os._exit(0 if torch.isfinite(s.grad).all() else 3)
holder.join()
deadline = time.time() + 60
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status))
        break
    if time.time() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung")
        break
    time.sleep(0.01)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_holds_the_buffer_cache():
    r = _fresh_python(_FORK_SCRIPT, env=dict(os.environ), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "child exit 0", r.stdout + r.stderr


@pytest.mark.parametrize("call", [
    lambda it: mpncov.sqrtm(torch.eye(3).expand(2, 3, 3), it),
    lambda it: mpncov.isqrt_cov(torch.randn(2, 3, 4), it),
    lambda it: mpncov.nn.Sqrtm(it),
])
@pytest.mark.parametrize("iters", [101, 2 ** 62, 6148914691236517207])
def test_huge_iters_is_refused_clearly(call, iters):
    # 3 (iters - 1) + 1 saved matrices would overflow int64 at 6148914691236517207.
    with pytest.raises(ValueError, match=f"between 1 and 100, got {iters}"):
        call(iters)


@pytest.mark.parametrize("call", [
    lambda it: torch.ops.mpncov.sqrtm(torch.eye(3)[None], it),
    lambda it: torch.ops.mpncov.isqrt_cov(torch.randn(2, 3, 4), it),
    lambda it: torch.ops.mpncov.sqrtm_backward(torch.eye(3)[None], torch.eye(3)[None],
                                               torch.zeros(1, 1, 3, 3), it),
    lambda it: torch.ops.mpncov.isqrt_cov_backward(torch.zeros(2, 6), torch.randn(2, 3, 4),
                                                   torch.eye(3).expand(2, 3, 3),
                                                   torch.zeros(2, 1, 3, 3), it),
])
@pytest.mark.parametrize("iters", [0, 101, 2 ** 62, 6148914691236517207])
def test_raw_ops_refuse_iters_out_of_range(call, iters):
    with pytest.raises(ValueError, match=f"between 1 and 100, got {iters}"):
        call(iters)
