"""CUDA backend tests: CUDA against CPU and against a float64 reference written with plain
torch ops, gradients, gradcheck, opcheck, torch.compile, streams, determinism, memory.

Skipped without CUDA. On a CUDA machine whose build lacks the CUDA kernels,
test_cuda_kernels_registered fails (and so does everything else).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

import mpncov  # noqa: E402
import reference  # noqa: E402

DEV = "cuda"
F64 = torch.float64
OPS = ["covpool", "covpool_backward", "sqrtm", "sqrtm_backward", "triuvec", "triuvec_backward",
       "isqrt_cov_gram", "isqrt_cov_gram_backward"]

# (C, M) and (C, iters) combinations: every C, M and iters value of the brief appears.
C_VALUES = [1, 3, 17, 64, 127, 128, 129, 256, 300]
M_VALUES = [1, 7, 196, 784]
ITERS_VALUES = [1, 3, 5, 8]
CM = [(c, M_VALUES[i % len(M_VALUES)]) for i, c in enumerate(C_VALUES)] + [(64, 1), (129, 784)]
CN = [(c, ITERS_VALUES[i % len(ITERS_VALUES)]) for i, c in enumerate(C_VALUES)] + [
    (128, 8), (300, 5), (17, 1)]
DTYPES = [torch.float32, torch.float64]
# Relative tolerances (max abs error / max abs reference) against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


# ---- float64 reference with plain torch ops ----------------------------------------------

def ref_covpool(x):
    x = x.reshape(x.shape[0], x.shape[1], -1)
    xc = x - x.mean(-1, keepdim=True)
    return xc @ xc.transpose(1, 2) / x.shape[-1]


def ref_sqrtm(s, iters):
    """SPEC sqrtm (tests/reference.py) of sym(s) = (s + s^T) / 2, zero where tr(s) = 0."""
    t = s.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    s_sym = torch.where(t == 0, eye, 0.5 * (s + s.transpose(1, 2)))
    return torch.where(t == 0, torch.zeros_like(s), reference.sqrtm_ref(s_sym, iters))


def ref_triuvec(s):
    iu = torch.triu_indices(s.shape[-1], s.shape[-1], device=s.device)
    return s[:, iu[0], iu[1]]


def ref_isqrt_cov(x, iters):
    return ref_triuvec(ref_sqrtm(ref_covpool(x), iters))


# ---- helpers -------------------------------------------------------------------------------

def gen(seed):
    return torch.Generator().manual_seed(seed)


def features(b, c, m, seed=0, dtype=F64):
    return torch.randn(b, c, m, generator=gen(seed), dtype=F64).to(dtype)


def spd(b, c, seed=0, dtype=F64):
    x = torch.randn(b, c, c + 4, generator=gen(seed), dtype=F64)
    s = x @ x.transpose(1, 2) / (c + 4) + 1e-2 * torch.eye(c, dtype=F64)
    return s.to(dtype)


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_rel(a, b, tol, what=""):
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def grad_of(fn, inp, g):
    inp = inp.detach().clone().requires_grad_()
    (out,) = torch.autograd.grad(fn(inp), inp, g)
    return out


def test_cuda_kernels_registered():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mpncov::{name}", "CUDA"), (
            f"mpncov::{name} has no CUDA kernel: was the extension built with CUDA?")


# ---- forward and gradient against CPU and the reference -----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,m", CM)
def test_covpool(c, m, dtype):
    x = features(2, c, m, seed=c + m)
    out = mpncov.covpool(x.to(DEV, dtype))
    assert out.dtype == dtype and out.shape == (2, c, c)
    assert_rel(out, ref_covpool(x), TOL[dtype], "covpool")
    assert torch.equal(out, out.transpose(1, 2)), "covpool output must be exactly symmetric"
    g = torch.randn(2, c, c, generator=gen(1), dtype=F64)
    dx = grad_of(mpncov.covpool, x.to(DEV, dtype), g.to(DEV, dtype))
    assert_rel(dx, grad_of(ref_covpool, x, g), GRAD_TOL[dtype], "covpool grad")
    if dtype == F64:
        assert_rel(out, mpncov.covpool(x), TOL[dtype], "covpool cuda vs cpu")
        assert_rel(dx, grad_of(mpncov.covpool, x, g), GRAD_TOL[dtype], "covpool grad cuda vs cpu")


@pytest.mark.parametrize("hw", [(14, 14), (28, 28), (3, 5)])
def test_covpool_4d(hw):
    x = torch.randn(3, 20, *hw, generator=gen(2), dtype=F64)
    out = mpncov.covpool(x.to(DEV))
    assert_rel(out, ref_covpool(x), TOL[F64], "covpool 4d")
    g = torch.randn(3, 20, 20, generator=gen(3), dtype=F64)
    dx = grad_of(mpncov.covpool, x.to(DEV), g.to(DEV))
    assert dx.shape == x.shape
    assert_rel(dx, grad_of(ref_covpool, x, g), GRAD_TOL[F64], "covpool 4d grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,iters", CN)
def test_sqrtm(c, iters, dtype):
    s = spd(2, c, seed=c)
    out = mpncov.sqrtm(s.to(DEV, dtype), iters=iters)
    assert out.dtype == dtype and out.shape == (2, c, c)
    assert_rel(out, ref_sqrtm(s, iters), TOL[dtype], "sqrtm")
    g = torch.randn(2, c, c, generator=gen(4), dtype=F64)  # not symmetric
    ds = grad_of(lambda a: mpncov.sqrtm(a, iters=iters), s.to(DEV, dtype), g.to(DEV, dtype))
    ref = grad_of(lambda a: ref_sqrtm(a, iters), s, g)
    assert_rel(ds, ref, GRAD_TOL[dtype], "sqrtm grad")
    if dtype == F64:
        assert_rel(out, mpncov.sqrtm(s, iters=iters), TOL[dtype], "sqrtm cuda vs cpu")


@pytest.mark.parametrize("iters", list(range(1, 13)) + [20])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sqrtm_raw_ops_vs_cpu(iters, dtype):
    # iters <= 8 mirror every product, iters > 8 compute the T and Z products in full.
    c = 70 if iters % 2 else 129
    s = spd(3, c, seed=iters, dtype=dtype)
    s = 0.5 * (s + s.transpose(1, 2))
    s[1] = 0  # a zero sample: zero output, zero gradient
    out, saved = torch.ops.mpncov.sqrtm(s.to(DEV), iters)
    out_cpu, saved_cpu = torch.ops.mpncov.sqrtm(s, iters)
    # Beyond 8 iterations float32 is computed (and saved) in float64, as on the CPU.
    saved_dtype = F64 if iters > 8 else dtype
    assert saved.shape == (3, 3 * (iters - 1) + 1, c, c) and saved.dtype == saved_dtype
    assert saved_cpu.dtype == saved_dtype
    assert_rel(out, out_cpu, TOL[dtype], "sqrtm out")
    live = [0, 2]  # the CPU op leaves the saved iterates of a zero-trace sample unwritten
    assert_rel(saved[live], saved_cpu[live], TOL[dtype], "sqrtm saved")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    g = torch.randn(3, c, c, generator=gen(5), dtype=F64).to(dtype)
    ds = torch.ops.mpncov.sqrtm_backward(g.to(DEV), s.to(DEV), saved, iters)
    ds_cpu = torch.ops.mpncov.sqrtm_backward(g, s, saved_cpu, iters)
    assert_rel(ds, ds_cpu, GRAD_TOL[dtype], "sqrtm_backward cuda vs cpu")
    assert torch.equal(ds[1], torch.zeros_like(ds[1]))
    ref = grad_of(lambda a: ref_sqrtm(a, iters), s.double(), g.double())
    ref[1] = 0
    assert_rel(ds, ref, GRAD_TOL[dtype], "sqrtm_backward vs reference")
    assert torch.equal(ds, ds.transpose(1, 2)), "sqrtm_backward must be exactly symmetric"


@pytest.mark.parametrize("iters", [3, 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sqrtm_reads_the_symmetric_part(iters, dtype):
    s = spd(2, 70, seed=20, dtype=F64)
    skew = torch.randn(2, 70, 70, generator=gen(21), dtype=F64)
    s = (s + 0.3 * (skew - skew.transpose(1, 2))).to(DEV, dtype)
    s_sym = 0.5 * (s + s.transpose(1, 2))
    out, saved = torch.ops.mpncov.sqrtm(s, iters)
    out_sym, saved_sym = torch.ops.mpncov.sqrtm(s_sym, iters)
    assert torch.equal(out, out_sym) and torch.equal(saved, saved_sym)
    g = torch.randn(2, 70, 70, generator=gen(22), dtype=F64).to(DEV, dtype)
    ds = torch.ops.mpncov.sqrtm_backward(g, s, saved, iters)
    assert torch.equal(ds, torch.ops.mpncov.sqrtm_backward(g, s_sym, saved_sym, iters))
    ref = grad_of(lambda a: ref_sqrtm(a, iters), s.double().cpu(), g.double().cpu())
    assert_rel(ds, ref, GRAD_TOL[dtype], "gradient of sqrtm(sym(S))")


@pytest.mark.parametrize("iters", [5, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sqrtm_trace_rules(iters, dtype):
    # SPD, zero (t = 0), negative definite (t < 0), SPD scaled below the smallest normal.
    base = spd(1, 9, seed=23)[0]
    base = 0.5 * (base + base.T)
    tiny_exp = -130 if dtype == torch.float32 else -1030
    s = torch.stack([base, torch.zeros_like(base), -base, base * 2.0 ** tiny_exp]).to(DEV, dtype)
    g = torch.randn(4, 9, 9, generator=gen(24), dtype=F64).to(DEV, dtype)
    out, saved = torch.ops.mpncov.sqrtm(s, iters)
    ds = torch.ops.mpncov.sqrtm_backward(g, s, saved, iters)
    out0, saved0 = torch.ops.mpncov.sqrtm(s[:1], iters)
    assert torch.equal(out[:1], out0), "one bad sample must not touch the others"
    assert torch.equal(ds[:1], torch.ops.mpncov.sqrtm_backward(g[:1], s[:1], saved0, iters))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(ds[1], torch.zeros_like(ds[1]))
    assert torch.isnan(out[2]).all() and torch.isnan(ds[2]).all()
    assert torch.isfinite(out[3]).all() and torch.isfinite(ds[3]).all()
    # sqrtm(c S) = sqrt(c) sqrtm(S); its gradient at c S is the one at S over sqrt(c).
    ref_out = ref_sqrtm(base[None], iters)[0] * 2.0 ** (tiny_exp / 2)
    ref_ds = grad_of(lambda a: ref_sqrtm(a, iters), base[None], g[3:].double().cpu())[0]
    assert_rel(out[3], ref_out, 1e-3, "tiny t output")
    assert_rel(ds[3], ref_ds * 2.0 ** (-tiny_exp / 2), 1e-3, "tiny t gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", C_VALUES)
def test_triuvec(c, dtype):
    s = torch.randn(2, c, c, generator=gen(c), dtype=F64)
    v = mpncov.triuvec(s.to(DEV, dtype))
    assert v.shape == (2, c * (c + 1) // 2) and v.dtype == dtype
    assert torch.equal(v.cpu(), ref_triuvec(s).to(dtype))
    assert torch.equal(v.cpu(), mpncov.triuvec(s.to(dtype)))
    g = torch.randn(2, c * (c + 1) // 2, generator=gen(6), dtype=F64).to(dtype)
    back = torch.ops.mpncov.triuvec_backward(g.to(DEV), c)
    assert torch.equal(back.cpu(), torch.ops.mpncov.triuvec_backward(g, c))
    assert torch.equal(back.cpu(), grad_of(ref_triuvec, s.to(dtype), g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,m,iters", [(1, 1, 1), (3, 7, 3), (17, 196, 5), (64, 784, 8),
                                       (127, 196, 5), (128, 196, 3), (129, 7, 5),
                                       (256, 196, 5), (300, 784, 3)])
def test_isqrt_cov(c, m, iters, dtype):
    x = features(2, c, m, seed=c * m)
    out = mpncov.isqrt_cov(x.to(DEV, dtype), iters=iters)
    assert out.shape == (2, c * (c + 1) // 2) and out.dtype == dtype
    assert_rel(out, ref_isqrt_cov(x, iters), TOL[dtype] * 5, "isqrt_cov")
    g = torch.randn(out.shape, generator=gen(7), dtype=F64)
    dx = grad_of(lambda a: mpncov.isqrt_cov(a, iters=iters), x.to(DEV, dtype), g.to(DEV, dtype))
    ref = grad_of(lambda a: ref_isqrt_cov(a, iters), x, g)
    assert_rel(dx, ref, GRAD_TOL[dtype] * 5, "isqrt_cov grad")
    if dtype == F64:
        assert_rel(out, mpncov.isqrt_cov(x, iters=iters), TOL[dtype], "isqrt_cov cuda vs cpu")
        cpu = grad_of(lambda a: mpncov.isqrt_cov(a, iters=iters), x, g)
        assert_rel(dx, cpu, GRAD_TOL[dtype], "isqrt_cov grad cuda vs cpu")


def test_zero_input_gives_zero_and_finite_grad():
    x = torch.ones(2, 5, 9, device=DEV, dtype=F64, requires_grad=True)  # constant features
    out = mpncov.isqrt_cov(x, iters=5)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.randn_like(out))
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, torch.zeros_like(x.grad))
    s = torch.zeros(2, 4, 4, device=DEV, requires_grad=True)
    y = mpncov.sqrtm(s, iters=3)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.randn_like(y))
    assert torch.equal(s.grad, torch.zeros_like(s.grad))


def test_empty_batch():
    x = torch.randn(0, 5, 7, device=DEV)
    assert mpncov.covpool(x).shape == (0, 5, 5)
    assert mpncov.isqrt_cov(x, iters=3).shape == (0, 15)
    out, saved = torch.ops.mpncov.sqrtm(torch.randn(0, 5, 5, device=DEV), 3)
    assert out.shape == (0, 5, 5) and saved.shape == (0, 7, 5, 5)
    assert torch.ops.mpncov.triuvec(torch.randn(0, 5, 5, device=DEV)).shape == (0, 15)


# ---- half precision and autocast -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = features(2, 64, 196, seed=8)
    xh = x.to(DEV, dtype)
    out = mpncov.isqrt_cov(xh, iters=5)
    assert out.dtype == dtype
    assert_rel(out, ref_isqrt_cov(xh.double().cpu(), 5), HALF_TOL[dtype], "isqrt_cov half")
    s = spd(2, 33, seed=9)
    y, saved = torch.ops.mpncov.sqrtm(s.to(DEV, dtype), 5)
    assert y.dtype == dtype and saved.dtype == torch.float32
    assert_rel(y, ref_sqrtm(s.to(dtype).double(), 5), HALF_TOL[dtype], "sqrtm half")
    assert mpncov.covpool(xh).dtype == dtype
    assert mpncov.triuvec(y).dtype == dtype
    g = torch.randn(out.shape, generator=gen(10), dtype=F64)
    dx = grad_of(lambda a: mpncov.isqrt_cov(a, iters=5), xh, g.to(DEV, dtype))
    assert dx.dtype == dtype
    ref = grad_of(lambda a: ref_isqrt_cov(a, 5), xh.double().cpu(), g)
    assert_rel(dx, ref, HALF_TOL[dtype] * 2, "isqrt_cov half grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    conv = torch.nn.Conv2d(16, 32, 1, bias=False).to(DEV)
    x = torch.randn(2, 16, 7, 7, device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    with torch.autocast("cuda", dtype=dtype):
        f = conv(x)
        out = mpncov.isqrt_cov(f, iters=5)
    assert out.shape == (2, 32 * 33 // 2)
    assert torch.isfinite(out).all()
    ref = ref_isqrt_cov(f.detach().double().cpu(), 5)
    assert_rel(out, ref, HALF_TOL[dtype], "isqrt_cov under autocast")
    out.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# ---- gradcheck, opcheck, compile ----------------------------------------------------------

def _spd_from(a):
    return a @ a.transpose(1, 2) / a.shape[-1] + 0.5 * torch.eye(a.shape[1], dtype=a.dtype,
                                                                  device=a.device)


def test_gradcheck_covpool_triuvec():
    x = torch.randn(2, 4, 6, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mpncov.covpool, (x,))
    s = torch.randn(2, 4, 4, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mpncov.triuvec, (s,))


@pytest.mark.parametrize("iters", range(1, 9))
def test_gradcheck_sqrtm(iters):
    # SPD input (symmetric perturbations through _spd_from); the incoming gradient of
    # gradcheck is not symmetric.
    a = torch.randn(2, 5, 7, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mpncov.sqrtm(_spd_from(t), iters=iters), (a,))


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_gradcheck_isqrt_cov(iters):
    x = torch.randn(2, 4, 6, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mpncov.isqrt_cov(t, iters=iters), (x,))


def _opcheck_cases():
    x = torch.randn(2, 5, 9, device=DEV, requires_grad=True)
    s = spd(2, 5).float().to(DEV).requires_grad_()
    out, saved = torch.ops.mpncov.sqrtm(s.detach(), 3)
    g = torch.randn(2, 5, 5, device=DEV)
    return [
        (torch.ops.mpncov.covpool.default, (x,)),
        (torch.ops.mpncov.covpool_backward.default, (g, x.detach())),
        (torch.ops.mpncov.sqrtm.default, (s, 3)),
        (torch.ops.mpncov.sqrtm_backward.default, (g, s.detach(), saved, 3)),
        (torch.ops.mpncov.sqrtm_backward.default,
         (g, s.detach(), torch.ops.mpncov.sqrtm(s.detach(), 10)[1], 10)),
        (torch.ops.mpncov.triuvec.default, (s,)),
        (torch.ops.mpncov.triuvec_backward.default, (torch.randn(2, 15, device=DEV), 5)),
        (torch.ops.mpncov.isqrt_cov.default, (x, 3)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    x = features(4, 32, 49, seed=11).float().to(DEV)
    g = torch.randn(4, 32 * 33 // 2, device=DEV)

    def step(inp):
        inp = inp.detach().requires_grad_()
        out = mpncov.isqrt_cov(inp, iters=5)
        (dx,) = torch.autograd.grad(out, inp, g)
        return out.detach(), dx

    eager = step(x)
    compiled = torch.compile(lambda inp: mpncov.isqrt_cov(inp, iters=5), mode="reduce-overhead")
    for _ in range(4):  # warm-up and CUDA-graph replays
        inp = x.detach().clone().requires_grad_()
        out = compiled(inp)
        (dx,) = torch.autograd.grad(out, inp, g)
        out, dx = out.detach().clone(), dx.clone()
        assert_rel(out, eager[0], 1e-6, "compiled forward")
        assert_rel(dx, eager[1], 1e-5, "compiled backward")
    torch._dynamo.reset()


# ---- streams, determinism, memory ---------------------------------------------------------

def _pipeline(x, g, iters=5):
    inp = x.detach().requires_grad_()
    out = mpncov.isqrt_cov(inp, iters=iters)
    (dx,) = torch.autograd.grad(out, inp, g)
    s = spd(x.shape[0], 40, seed=12).to(x.device, x.dtype).requires_grad_()
    y = mpncov.sqrtm(s, iters=iters)
    (ds,) = torch.autograd.grad(y, s, torch.ones_like(y))
    return out.detach(), dx, y.detach(), ds


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_default_stream(dtype):
    x = features(8, 130, 196, seed=13).to(DEV, dtype)
    g = torch.randn(8, 130 * 131 // 2, device=DEV, dtype=dtype)
    expected = _pipeline(x, g)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # delays the stream: a kernel on the wrong one races
        got = _pipeline(x, g)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic(dtype):
    x = features(4, 129, 196, seed=14).to(DEV, dtype)
    g = torch.randn(4, 129 * 130 // 2, device=DEV, dtype=dtype)
    first = _pipeline(x, g)
    for _ in range(2):
        for a, b in zip(_pipeline(x, g), first):
            assert torch.equal(a, b)


def test_no_memory_growth():
    x = torch.randn(4, 32, 49, device=DEV)
    g = torch.randn(4, 32 * 33 // 2, device=DEV)
    for _ in range(10):
        _pipeline(x, g)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        _pipeline(x, g)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# ---- argument checks ----------------------------------------------------------------------

def test_argument_errors():
    # The Python layer (mpncov/ops.py) may reject some of these before the CUDA kernel does
    # (ValueError / TypeError); the kernel's own checks raise RuntimeError.
    errors = (RuntimeError, ValueError, TypeError)
    ops = torch.ops.mpncov
    for bad in (0, 101):
        with pytest.raises(ValueError, match=f"iters must be between 1 and 100, got {bad}"):
            ops.sqrtm(torch.eye(3, device=DEV)[None], bad)
        with pytest.raises(ValueError, match=f"iters must be between 1 and 100, got {bad}"):
            torch.ops.mpncov.sqrtm_backward(torch.eye(3, device=DEV)[None], torch.eye(3, device=DEV)[None],
                              torch.zeros(1, 1, 3, 3, device=DEV), bad)
    with pytest.raises(errors, match="square"):
        ops.sqrtm(torch.randn(2, 3, 4, device=DEV), 3)
    with pytest.raises(errors, match="shape"):
        ops.triuvec(torch.randn(3, 3, device=DEV))
    with pytest.raises(errors, match=r"\(B, C, H, W\) or \(B, C, M\)|shape"):
        ops.covpool(torch.randn(3, 3, device=DEV))
    with pytest.raises(errors, match="dtype|float"):
        ops.covpool(torch.ones(2, 3, 4, device=DEV, dtype=torch.int32))
    with pytest.raises(errors):
        ops.covpool_backward(torch.randn(2, 3, 3), torch.randn(2, 3, 4, device=DEV))
    with pytest.raises(errors, match="saved"):
        s = torch.eye(3, device=DEV)[None]
        torch.ops.mpncov.sqrtm_backward(s, s, torch.zeros(1, 2, 3, 3, device=DEV), 3)


# ---- the cuBLAS product path (MPNCOV_CUDA_PRODUCTS=cublas) ---------------------------------

@pytest.mark.parametrize("iters", [1, 5, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cublas_products_match_kernels(iters, dtype, monkeypatch):
    x = features(3, 129, 196, seed=30 + iters).to(DEV, dtype)
    g = torch.randn(3, 129 * 130 // 2, generator=gen(31), dtype=F64).to(DEV, dtype)
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "kernels")
    out_k, dx_k = _pipeline(x, g, iters)[:2]
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "cublas")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32-exact products for the comparison
    try:
        out_c, dx_c = _pipeline(x, g, iters)[:2]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_rel(out_c, out_k, TOL[dtype] * 5, "cublas vs kernels forward")
    assert_rel(dx_c, dx_k, GRAD_TOL[dtype] * 5, "cublas vs kernels backward")


def test_products_env_value_checked(monkeypatch):
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="MPNCOV_CUDA_PRODUCTS must be 'kernels' or 'cublas'"):
        mpncov.covpool(torch.randn(2, 3, 4, device=DEV))


# ---- sqrtm on chip (MPNCOV_CUDA_SQRTM=auto|tiled|onchip) ----------------------------------

def _on_chip_fits(c, iters, dtype, backward):
    """The rule of sqrtm_on_chip.cuh: short mode, C <= 128, shared memory within the device's
    opt-in limit (three C x p matrices, p = C rounded up to 8, + two 16-row slabs backward)."""
    p = (c + 7) // 8 * 8
    size = 4 if dtype == torch.float32 else 8
    need = (3 * c * p + (32 * p if backward else 0)) * size + 33 * size
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    return iters <= 8 and c <= 128 and need <= optin


def _sqrtm_step(s, g, iters):
    out, saved = torch.ops.mpncov.sqrtm(s, iters)
    return out, saved, torch.ops.mpncov.sqrtm_backward(g, s, saved, iters)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,iters", [(1, 1), (5, 3), (31, 5), (32, 2), (33, 8), (64, 5),
                                     (100, 3), (127, 5), (128, 5), (128, 9)])
def test_sqrtm_on_chip_matches_tiled(c, iters, dtype, monkeypatch):
    s = spd(3, c, seed=40 + c, dtype=dtype).to(DEV)
    s = 0.5 * (s + s.transpose(1, 2))
    s[1] = 0
    g = torch.randn(3, c, c, generator=gen(41), dtype=F64).to(DEV, dtype)
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "tiled")
    tiled = _sqrtm_step(s, g, iters)
    compute = F64 if iters > 8 else dtype
    fits_fwd = _on_chip_fits(c, iters, compute, False)
    fits_bwd = _on_chip_fits(c, iters, compute, True)
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "onchip")
    if not fits_fwd:
        with pytest.raises(RuntimeError, match="MPNCOV_CUDA_SQRTM=onchip"):
            torch.ops.mpncov.sqrtm(s, iters)
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "auto")
    auto = _sqrtm_step(s, g, iters)
    # The same function: forward to the last bits (the same sums in the same order; only
    # the compiler's FMA contraction could differ), backward to rounding.
    assert_rel(auto[0], tiled[0], TOL[dtype] / 10, "on chip vs tiled forward")
    assert_rel(auto[1][[0, 2]], tiled[1][[0, 2]], TOL[dtype] / 10, "on chip vs tiled saved")
    assert_rel(auto[2], tiled[2], GRAD_TOL[dtype] / 10, "on chip vs tiled backward")
    assert torch.equal(auto[2], auto[2].transpose(1, 2))
    assert torch.equal(auto[0][1], torch.zeros_like(auto[0][1]))
    assert torch.equal(auto[2][1], torch.zeros_like(auto[2][1]))
    assert_rel(auto[0], ref_sqrtm(s.double().cpu(), iters), TOL[dtype], "on chip vs reference")
    ref = grad_of(lambda a: ref_sqrtm(a, iters), s.double().cpu(), g.double().cpu())
    assert_rel(auto[2], ref, GRAD_TOL[dtype], "on chip gradient vs reference")
    # A forward of one path and a backward of the other: the saved layout is shared.
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "tiled")
    mixed = torch.ops.mpncov.sqrtm_backward(g, s, auto[1], iters)
    assert_rel(mixed, auto[2], GRAD_TOL[dtype] / 10, "on-chip forward, tiled backward")
    print(f"C={c} iters={iters} {dtype}: on chip fwd/bwd {fits_fwd}/{fits_bwd}, forward "
          f"bitwise = tiled: {torch.equal(auto[0], tiled[0])}")


def test_sqrtm_path_env_value_checked(monkeypatch):
    s = spd(2, 5).float().to(DEV)
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "fast")
    with pytest.raises(ValueError, match="MPNCOV_CUDA_SQRTM must be 'auto', 'tiled' or 'onchip'"):
        torch.ops.mpncov.sqrtm(s, 3)
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "onchip")
    with pytest.raises(RuntimeError, match="does not serve C = 129"):
        torch.ops.mpncov.sqrtm(spd(2, 129).float().to(DEV), 3)


def test_sqrtm_on_chip_bitwise_deterministic_and_stream(monkeypatch):
    monkeypatch.setenv("MPNCOV_CUDA_SQRTM", "auto")
    s = spd(200, 128, seed=42).float().to(DEV)  # more samples than SMs
    g = torch.randn(200, 128, 128, generator=gen(43)).to(DEV)
    first = _sqrtm_step(s, g, 5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # a kernel on the wrong stream would race
        again = _sqrtm_step(s, g, 5)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(again, first):
        assert torch.equal(a, b)


# ---- TF32 tensor-core products of the hand-written kernels (MPNCOV_CUDA_TF32) -------------

def _pipeline_with(monkeypatch, x, g, iters, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return _pipeline(x, g, iters)[:2]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="TF32 needs sm_80+")
@pytest.mark.parametrize("c,m,iters", [(130, 196, 5), (64, 49, 3)])
def test_tf32_products(c, m, iters, monkeypatch):
    x = features(2, c, m, seed=50 + c)
    g = torch.randn(2, c * (c + 1) // 2, generator=gen(51), dtype=F64)
    ref = grad_of(lambda a: ref_isqrt_cov(a, iters), x, g)
    ref_out = ref_isqrt_cov(x, iters)
    xd, gd = x.float().to(DEV), g.float().to(DEV)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        off = _pipeline_with(monkeypatch, xd, gd, iters, MPNCOV_CUDA_TF32="auto")
        on = _pipeline_with(monkeypatch, xd, gd, iters, MPNCOV_CUDA_TF32="on")
        x3 = _pipeline_with(monkeypatch, xd, gd, iters, MPNCOV_CUDA_TF32="3x")
        torch.backends.cuda.matmul.allow_tf32 = True  # auto follows torch's setting
        auto = _pipeline_with(monkeypatch, xd, gd, iters, MPNCOV_CUDA_TF32="auto")
        tiled = _pipeline_with(monkeypatch, xd, gd, iters, MPNCOV_CUDA_TF32="on",
                               MPNCOV_CUDA_SQRTM="tiled")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    errs = {name: (rel_err(r[0], ref_out), rel_err(r[1], ref))
            for name, r in (("off", off), ("on", on), ("3x", x3))}
    print(f"C={c}: relative errors (out, grad) against float64: {errs}")
    # TF32: about 1e-3, visibly coarser than float32; 3xTF32: float32 accuracy.
    assert errs["on"][0] < 1e-2 and errs["on"][1] < 5e-2
    assert errs["on"][0] > 10 * errs["off"][0]
    assert errs["3x"][0] < TOL[torch.float32] and errs["3x"][1] < GRAD_TOL[torch.float32]
    # auto with TF32 allowed = on (deterministic), and takes the tiled sqrtm path.
    for a, b in zip(auto, on):
        assert torch.equal(a, b)
    for a, b in zip(tiled, on):
        assert torch.equal(a, b)


def test_tf32_env_value_checked(monkeypatch):
    monkeypatch.setenv("MPNCOV_CUDA_TF32", "maybe")
    with pytest.raises(ValueError, match="MPNCOV_CUDA_TF32 must be 'auto', 'off', 'on' or '3x'"):
        mpncov.covpool(torch.randn(2, 3, 4, device=DEV))


# ---- the Gram-space pipeline (csrc/cuda/gram_kernel.cu; csrc/gram_aten.cpp with cublas) ----

def _gram_fp32_exact():
    """cuBLAS products in fp32 (no TF32) for comparisons with float32 tolerances."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    return prev


def _space_step(x, g, iters, space, channel_dim=1):
    inp = x.detach().clone().requires_grad_()
    out = mpncov.isqrt_cov(inp, iters, space=space, channel_dim=channel_dim)
    (dx,) = torch.autograd.grad(out, inp, g)
    return out.detach(), dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("iters", [1, 3, 5, 8, 12])
@pytest.mark.parametrize("c,m", [(64, 16), (256, 196), (17, 30), (9, 9), (1, 5), (130, 50)])
def test_gram_matches_cov_and_cpu_on_cuda(c, m, iters, dtype):
    x = features(3, c, m, seed=c + m).to(dtype)
    g = torch.randn(3, c * (c + 1) // 2, generator=gen(40), dtype=F64).to(dtype)
    prev = _gram_fp32_exact()
    try:
        out_g, dx_g = _space_step(x.to(DEV), g.to(DEV), iters, "gram")
        out_c, dx_c = _space_step(x.to(DEV), g.to(DEV), iters, "cov")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out_cpu, dx_cpu = _space_step(x, g, iters, "gram")
    assert_rel(out_g, out_c, TOL[dtype], "gram vs cov forward")
    assert_rel(dx_g, dx_c, GRAD_TOL[dtype], "gram vs cov backward")
    assert_rel(out_g, out_cpu, TOL[dtype], "gram CUDA vs CPU forward")
    assert_rel(dx_g, dx_cpu, GRAD_TOL[dtype], "gram CUDA vs CPU backward")


@pytest.mark.parametrize("recompute_t", [False, True])
@pytest.mark.parametrize("iters", [1, 5, 12])
def test_gram_raw_ops_match_cpu_in_float64(iters, recompute_t):
    x = features(2, 40, 17, seed=41)
    g = torch.randn(2, 820, generator=gen(42), dtype=F64)
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(x, iters, recompute_t)
    dx = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved, iters)
    vec_d, saved_d = torch.ops.mpncov.isqrt_cov_gram(x.to(DEV), iters, recompute_t)
    dx_d = torch.ops.mpncov.isqrt_cov_gram_backward(g.to(DEV), x.to(DEV), saved_d, iters)
    assert saved_d.shape == saved.shape and saved_d.dtype == saved.dtype
    assert_rel(vec_d, vec, 1e-12, "forward")
    assert_rel(saved_d, saved, 1e-12, "saved")
    assert_rel(dx_d, dx, 1e-11, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_tokens_on_cuda(dtype):
    tokens = torch.randn(3, 50, 96, generator=gen(43), dtype=F64).to(DEV, dtype)  # (B, N, C)
    g = torch.randn(3, 96 * 97 // 2, generator=gen(44), dtype=F64).to(DEV, dtype)
    prev = _gram_fp32_exact()
    try:
        out_t, dx_t = _space_step(tokens, g, 5, "gram", channel_dim=-1)
        out_f, dx_f = _space_step(tokens.transpose(1, 2).contiguous(), g, 5, "gram")
        out_c, _ = _space_step(tokens, g, 5, "cov", channel_dim=-1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert dx_t.is_contiguous()  # the gradient of the (B, N, C) tokens, in their layout
    # the op itself returns dX in the token layout (no copy of the features either way)
    x = tokens.transpose(1, 2)
    vec, saved = torch.ops.mpncov.isqrt_cov_gram(x, 5)
    dx = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved, 5)
    assert dx.transpose(1, 2).is_contiguous()
    assert_rel(out_t, out_f, TOL[dtype], "tokens vs channels first forward")
    assert_rel(dx_t, dx_f.transpose(1, 2), GRAD_TOL[dtype], "tokens vs channels first backward")
    assert_rel(out_t, out_c, TOL[dtype], "gram vs cov on tokens")


@pytest.mark.parametrize("iters", [1, 5, 12])
def test_gram_degenerate_samples_on_cuda(iters):
    x = features(4, 9, 5, seed=45)
    x[1] = 3.0                  # constant features: zero output, zero gradient
    x[2, 4, 2] = float("nan")   # NaN: NaN output and gradient for that sample only
    g = torch.randn(4, 45, generator=gen(46), dtype=F64)
    out, dx = _space_step(x.to(DEV), g.to(DEV), iters, "gram")
    assert not out[1].any() and not dx[1].any()
    assert torch.isnan(out[2]).all() and torch.isnan(dx[2]).all()
    keep = [0, 3]
    out_cpu, dx_cpu = _space_step(x[keep], g[keep], iters, "gram")
    assert_rel(out[keep], out_cpu, 1e-12, "live samples forward")
    assert_rel(dx[keep], dx_cpu, 1e-11, "live samples backward")
    tiny = (features(2, 12, 5, seed=47) * 1e-20).float().to(DEV)  # float32 trace ~1e-40
    out, dx = _space_step(tiny, torch.randn(2, 78, device=DEV), 5, "gram")
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and out.abs().max() > 0


def test_gram_does_not_synchronise_with_the_host():
    x = torch.randn(4, 64, 16, device=DEV)
    g = torch.randn(4, 64 * 65 // 2, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vec, saved = torch.ops.mpncov.isqrt_cov_gram(x, 5)
        torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("iters,recompute_t", [(1, False), (3, True), (5, False), (12, True)])
@pytest.mark.parametrize("c,m", [(96, 50), (256, 49), (17, 70)])
def test_gram_kernels_match_the_aten_form(c, m, iters, recompute_t, tokens, monkeypatch):
    # float64: the hand-written kernels (default) against MPNCOV_CUDA_PRODUCTS=cublas, and
    # each backward from the other's saved iterates (one layout for both).
    gen_ = gen(60 + c + iters)
    x = torch.randn(2, m, c, generator=gen_, dtype=F64).to(DEV)
    x = x.transpose(1, 2) if tokens else x.transpose(1, 2).contiguous()
    g = torch.randn(2, c * (c + 1) // 2, generator=gen_, dtype=F64).to(DEV)
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "kernels")
    vec_k, saved_k = torch.ops.mpncov.isqrt_cov_gram(x, iters, recompute_t)
    dx_k = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved_k, iters)
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "cublas")
    vec_a, saved_a = torch.ops.mpncov.isqrt_cov_gram(x, iters, recompute_t)
    dx_a = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved_a, iters)
    dx_ak = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved_k, iters)
    monkeypatch.setenv("MPNCOV_CUDA_PRODUCTS", "kernels")
    dx_ka = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, saved_a, iters)
    assert dx_k.stride() == dx_a.stride()  # x's layout
    assert_rel(vec_k, vec_a, 1e-12, "kernels vs ATen forward")
    assert_rel(saved_k, saved_a, 1e-12, "kernels vs ATen saved")
    for dx in (dx_k, dx_ak, dx_ka):
        assert_rel(dx, dx_a, 1e-11, "kernels vs ATen backward")


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_gradcheck_gram_on_cuda(iters):
    x = torch.randn(2, 6, 4, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mpncov.isqrt_cov(t, iters, space="gram"), (x,))
    tokens = torch.randn(2, 4, 6, device=DEV, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: mpncov.isqrt_cov(t, iters, space="gram", channel_dim=-1), (tokens,))


@pytest.mark.parametrize("tokens", [False, True])
def test_opcheck_gram_ops_on_cuda(tokens):
    x = torch.randn(2, 5, 7, device=DEV)
    if tokens:
        x = torch.randn(2, 7, 5, device=DEV).transpose(1, 2)
    _, saved = torch.ops.mpncov.isqrt_cov_gram(x, 3)
    g = torch.randn(2, 15, device=DEV)
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram.default, (x.requires_grad_(), 3))
    torch.library.opcheck(torch.ops.mpncov.isqrt_cov_gram_backward.default,
                          (g, x.detach(), saved, 3))


def test_auto_keeps_the_covariance_space_on_cuda():
    # the cost model describes CPU times; CUDA has the kernel but auto does not pick it yet
    assert mpncov._space.has_gram_kernel("cuda")
    x = torch.randn(2, 256, 49, device=DEV, requires_grad=True)
    assert mpncov._space.resolve("auto", x, 5, "isqrt_cov") == "cov"
    assert mpncov._space.resolve("gram", x, 5, "isqrt_cov") == "gram"
    node = type(mpncov.isqrt_cov(x, 5, space="gram").grad_fn).__name__
    assert node == "IsqrtCovGramBackward"


# ---- token-major features in the covariance space (covpool through cuBLAS, no copy) -------

@pytest.mark.parametrize("dtype", DTYPES)
def test_covpool_reads_tokens_without_a_copy(dtype):
    tokens = torch.randn(3, 49, 70, generator=gen(50), dtype=F64).to(DEV, dtype)  # (B, N, C)
    x = tokens.transpose(1, 2)
    g = torch.randn(3, 70, 70, generator=gen(51), dtype=F64).to(DEV, dtype)
    prev = _gram_fp32_exact()
    try:
        s = torch.ops.mpncov.covpool(x)
        dx = torch.ops.mpncov.covpool_backward(g, x)
        s_c = torch.ops.mpncov.covpool(x.contiguous())
        dx_c = torch.ops.mpncov.covpool_backward(g, x.contiguous())
        out_t, dx_t = _space_step(tokens, torch.randn(3, 70 * 71 // 2, device=DEV, dtype=dtype),
                                  5, "cov", channel_dim=-1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(s, s.transpose(1, 2)), "covpool output must be exactly symmetric"
    assert dx.transpose(1, 2).is_contiguous() and dx_t.is_contiguous()  # tokens' layout
    assert_rel(s, s_c, TOL[dtype], "covpool tokens vs channels first")
    assert_rel(dx, dx_c, GRAD_TOL[dtype], "covpool_backward tokens vs channels first")
    assert_rel(s, ref_covpool(x.double()), TOL[dtype], "covpool tokens vs reference")
    torch.library.opcheck(torch.ops.mpncov.covpool_backward.default, (g, x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("space,channel_dim", [("gram", 1), ("gram", -1), ("cov", -1)])
def test_autocast_gram_space_and_tokens(dtype, space, channel_dim):
    # the ATen ops inside these kernels must not be cast by autocast (products in float32)
    lin = torch.nn.Linear(32, 64, bias=False).to(DEV)
    x = torch.randn(2, 16, 32, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    with torch.autocast("cuda", dtype=dtype):
        tokens = lin(x)                                   # (B, N, C) in `dtype`
        f = tokens if channel_dim == -1 else tokens.transpose(1, 2).contiguous()
        out = mpncov.isqrt_cov(f, iters=5, channel_dim=channel_dim, space=space)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = ref_isqrt_cov(tokens.detach().double().cpu().transpose(1, 2), 5)
    assert_rel(out, ref, HALF_TOL[dtype], f"{space} under autocast")
    out.float().sum().backward()
    assert torch.isfinite(lin.weight.grad).all()
