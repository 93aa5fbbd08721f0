"""The CUDA kernels of csrc/cuda, run on the CPU through an emulation of the CUDA features
they use (tests/cuda_emulation), against mpncov's CPU ops.

This checks the kernels' logic without a GPU: indexing and tiling at ragged sizes, the
upper-triangle mode and its mirror writes, the fused epilogues, barrier placement (the
threads of a block run as fibers that only meet at barriers, so a missing __syncthreads
changes results), the block reductions with warp shuffles, the launch sequence of every
op, and that no kernel reads scratch it did not write (scratch is NaN-filled). It says
nothing about speed, the memory model or anything that needs real hardware: the GPU tests
in test_cuda.py are still the ones that count.
"""
import shutil
import sys

import pytest
import torch

import mpncov  # noqa: F401  (registers the CPU ops)
import reference

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the CUDA emulation needs Linux (ucontext) and g++")

SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from cuda_emulation import build
    return build.load(tmp_path_factory.mktemp("cuda_emu"))


def call(lib, name, dtype, *args):
    fn = getattr(lib, f"emu_{name}_{SUFFIX[dtype]}")
    conv = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    rc = fn(*conv)
    assert rc == 0, f"{name} returned cudaError {rc}"


def nan_filled(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def spd_batch(b, c, dtype, zero_sample=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, c + 3, generator=g, dtype=torch.float64)
    s = x @ x.transpose(1, 2) / (c + 3) + 0.05 * torch.eye(c, dtype=torch.float64)
    if zero_sample is not None:
        s[zero_sample] = 0
    return s.to(dtype).contiguous()


def close(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = max(b.abs().max().item(), 1e-30)
    assert not torch.isnan(a).any(), "output has NaN: something was not written or read scratch"
    err = (a - b).abs().max().item() / scale
    assert err <= tol, f"max relative error {err:.3g} > {tol}"


def misaligned(t):
    """A copy of t whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# Sizes that are multiples of 4 and 16 run the vector staging of interior slabs and tiles
# (C = 128, M = 196: the last slab of K = 196 is partial); the others the checked path.
@pytest.mark.parametrize("c,m,offset", [(1, 1, False), (3, 7, False), (17, 50, False),
                                        (33, 150, False), (65, 30, False), (130, 5, False),
                                        (128, 196, False), (132, 64, False), (64, 32, True)])
def test_covpool(emu, c, m, offset):
    dtype = torch.float64
    g = torch.Generator().manual_seed(c * 1000 + m)
    x = (torch.randn(2, c, m, generator=g, dtype=dtype) + 3.0).contiguous()
    if offset:
        x = misaligned(x)
    out = nan_filled((2, c, c), dtype)
    call(emu, "covpool_forward", dtype, x, out, 2, c, m)
    close(out, torch.ops.mpncov.covpool(x), dtype)
    assert torch.equal(out, out.transpose(1, 2)), "covpool output must be exactly symmetric"
    grad = torch.randn(2, c, c, generator=g, dtype=dtype)
    if offset:
        grad = misaligned(grad)
    dx = nan_filled((2, c, m), dtype)
    call(emu, "covpool_backward", dtype, grad, x, dx, 2, c, m)
    close(dx, torch.ops.mpncov.covpool_backward(grad, x), dtype)


# ---- sqrtm: the function is iSQRT of sym(S) = (S + S^T)/2, t = tr(S) -----------------------

def ref_sqrtm(s, iters):
    """float64 SPEC sqrtm (tests/reference.py) of sym(s) = (s + s^T) / 2, 0 where tr(s) = 0."""
    s = s.double()
    t = s.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    s_sym = torch.where(t == 0, eye, 0.5 * (s + s.transpose(1, 2)))
    return torch.where(t == 0, torch.zeros_like(s), reference.sqrtm_ref(s_sym, iters))


def ref_sqrtm_grad(s, g, iters):
    """dL/dS of ref_sqrtm(S) for L = <G, out>, zero where tr(S) = 0 (the rule for t = 0)."""
    s = s.double().clone().requires_grad_()
    (ds,) = torch.autograd.grad(ref_sqrtm(s, iters), s, g.double())
    return ds


def emu_sqrtm(emu, s, iters):
    b, c, _ = s.shape
    out = nan_filled((b, c, c), s.dtype)
    saved = nan_filled((b, 3 * (iters - 1) + 1, c, c), s.dtype)
    call(emu, "sqrtm_forward", s.dtype, s, out, saved, b, c, iters)
    return out, saved


def emu_sqrtm_backward(emu, g, s, saved, iters):
    b, c, _ = s.shape
    ds = nan_filled((b, c, c), s.dtype)
    call(emu, "sqrtm_backward", s.dtype, g, s, saved, ds, b, c, iters)
    return ds


def symmetric(s):
    return (0.5 * (s + s.transpose(1, 2))).contiguous()


# iters <= 8 mirror every product ("short"); iters > 8 compute T and Z in full ("long").
SQRTM_CASES = [(c, n, torch.float64) for c, n in [(1, 1), (1, 3), (3, 1), (3, 2), (3, 8),
                                                   (17, 3), (17, 4), (17, 5), (65, 2), (65, 5),
                                                   (130, 3), (3, 9), (17, 12), (65, 9),
                                                   (17, 20), (128, 2), (132, 3)]]
SQRTM_CASES += [(17, 5, torch.float32), (65, 3, torch.float32), (65, 10, torch.float32),
                (128, 9, torch.float32)]


@pytest.mark.parametrize("c,iters,dtype", SQRTM_CASES)
def test_sqrtm(emu, c, iters, dtype):
    b = 3
    s = symmetric(spd_batch(b, c, dtype, zero_sample=1, seed=c + iters))
    out, saved = emu_sqrtm(emu, s, iters)
    ref_out, ref_saved = torch.ops.mpncov.sqrtm(s, iters)
    close(out, ref_out, dtype)
    live = [0, 2]  # sample 1 has a zero trace: the CPU op leaves its saved iterates unwritten
    close(saved[live], ref_saved[live], dtype)
    close(out, ref_sqrtm(s, iters), dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a zero matrix must give zero"

    # The backward of sqrtm is the gradient of f(sym(S)): the kernels' symmetric mode.
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(7), dtype=dtype)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters)
    close(ds, torch.ops.mpncov.sqrtm_backward(g, s, ref_saved, iters), dtype)
    close(ds, ref_sqrtm_grad(s, g, iters), dtype)
    assert torch.equal(ds[1], torch.zeros_like(ds[1])), "zero trace must give zero grad"
    assert torch.equal(ds, ds.transpose(1, 2)), "the gradient must be exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iters", [3, 10])
def test_sqrtm_reads_the_symmetric_part(emu, iters, dtype):
    b, c = 2, 70
    g = torch.Generator().manual_seed(iters)
    skew = torch.randn(b, c, c, generator=g, dtype=torch.float64)
    s = (spd_batch(b, c, torch.float64, seed=3) + 0.3 * (skew - skew.transpose(1, 2))).to(dtype)
    s_sym = symmetric(s)  # rounds as the kernel's 0.5 (s_ij + s_ji)
    assert not torch.equal(s, s.transpose(1, 2))
    out, saved = emu_sqrtm(emu, s, iters)
    out_sym, saved_sym = emu_sqrtm(emu, s_sym, iters)
    assert torch.equal(out, out_sym) and torch.equal(saved, saved_sym)
    grad = torch.randn(b, c, c, generator=g, dtype=dtype)  # not symmetric either
    ds = emu_sqrtm_backward(emu, grad, s, saved, iters)
    assert torch.equal(ds, emu_sqrtm_backward(emu, grad, s_sym, saved_sym, iters))
    # The exact gradient of sqrtm(sym(S)) with respect to every entry of the non-symmetric S.
    close(ds, ref_sqrtm_grad(s, grad, iters), dtype)


def plain_sqrtm(s, iters):
    """The recurrence of sym(s) with plain torch ops in s's dtype, every product full."""
    return reference.sqrtm_ref(0.5 * (s + s.transpose(1, 2)), iters)


@pytest.mark.parametrize("iters", [16, 20])
def test_sqrtm_long_mode_rank_deficient_float32(emu, iters):
    # A covariance of 24 positions in 64 channels: rank 23, a 41-dim null space where
    # mirrored T and Z products let rounding errors grow like 1.5^k. Long mode must stay as
    # close to the float64 recurrence as the plain float32 recurrence (and plain autograd
    # through it) does; with every product mirrored the error at iters = 16 is ~700x that
    # (measured: 3.6e-2 against 4.7e-5), and inf at 20.
    c, m = 64, 24
    x = torch.randn(2, c, m, generator=torch.Generator().manual_seed(iters),
                    dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    s = symmetric(xc @ xc.transpose(1, 2) / m).float()
    g = torch.randn(2, c, c, generator=torch.Generator().manual_seed(1))

    def err(a, ref):
        return ((a.double() - ref).abs().max() / ref.abs().max()).item()

    out, saved = emu_sqrtm(emu, s, iters)
    ref = ref_sqrtm(s, iters)
    assert err(out, ref) <= 4 * err(plain_sqrtm(s, iters), ref) + 1e-6
    ds = emu_sqrtm_backward(emu, g, s, saved, iters)
    ref_ds = ref_sqrtm_grad(s, g, iters)
    s_leaf = s.clone().requires_grad_()
    (plain_ds,) = torch.autograd.grad(plain_sqrtm(s_leaf, iters), s_leaf, g)
    assert err(ds, ref_ds) <= 4 * err(plain_ds, ref_ds) + 1e-6


@pytest.mark.parametrize("iters", [5, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrtm_trace_rules(emu, dtype, iters):
    # Samples: SPD, zero (t = 0), negative definite (t < 0), SPD scaled into denormals.
    c = 9
    base = symmetric(spd_batch(1, c, torch.float64, seed=5))[0]
    tiny_exp = -130 if dtype == torch.float32 else -1030  # t below the smallest normal
    s = torch.stack([base, torch.zeros_like(base), -base, base * 2.0 ** tiny_exp]).to(dtype)
    g = torch.randn(4, c, c, generator=torch.Generator().manual_seed(2), dtype=dtype)
    out, saved = emu_sqrtm(emu, s, iters)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters)
    # One bad sample does not touch the others: sample 0 alone gives the same bits.
    out0, saved0 = emu_sqrtm(emu, s[:1].contiguous(), iters)
    assert torch.equal(out[:1], out0)
    assert torch.equal(ds[:1], emu_sqrtm_backward(emu, g[:1].contiguous(), s[:1].contiguous(),
                                                  saved0, iters))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(
        ds[1], torch.zeros_like(ds[1])), "t = 0: zero output and zero gradient"
    assert torch.isnan(out[2]).all() and torch.isnan(ds[2]).all(), (
        "t < 0: NaN output and NaN gradient (sqrt of a negative trace)")
    assert torch.isfinite(out[3]).all() and torch.isfinite(ds[3]).all(), (
        "tiny t: finite output and gradient")
    # sqrtm(c S) = sqrt(c) sqrtm(S), so its gradient at c S is the one at S over sqrt(c).
    # Denormal inputs keep fewer significant bits: a loose check.
    ref_out = ref_sqrtm(s[:1].double(), iters)[0] * 2.0 ** (tiny_exp / 2)
    ref_ds = ref_sqrtm_grad(s[:1].double(), g[3:], iters)[0] * 2.0 ** (-tiny_exp / 2)
    assert ((out[3].double() - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-3
    assert ((ds[3].double() - ref_ds).abs().max() / ref_ds.abs().max()).item() < 1e-3


def test_sqrtm_misaligned_buffers(emu):
    # Every buffer one element past a 16-byte boundary: the kernels must take their scalar
    # paths (the emulation aborts on a misaligned vector access, as a GPU faults) and give
    # the same bits as with aligned buffers.
    b, c, iters = 2, 64, 3
    dtype = torch.float32
    s = symmetric(spd_batch(b, c, dtype, seed=4))
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out, saved = emu_sqrtm(emu, s, iters)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters)
    out_m = misaligned(nan_filled(out.shape, dtype))
    saved_m = misaligned(nan_filled(saved.shape, dtype))
    call(emu, "sqrtm_forward", dtype, misaligned(s), out_m, saved_m, b, c, iters)
    assert torch.equal(out_m, out) and torch.equal(saved_m, saved)
    ds_m = misaligned(nan_filled(ds.shape, dtype))
    call(emu, "sqrtm_backward", dtype, misaligned(g), misaligned(s), saved_m, ds_m, b, c, iters)
    assert torch.equal(ds_m, ds)


@pytest.mark.parametrize("iters", [0, -1, 101])
def test_sqrtm_refuses_iters_out_of_range(emu, iters):
    s = torch.eye(3, dtype=torch.float64)[None].contiguous()
    out, saved = nan_filled((1, 3, 3), s.dtype), nan_filled((1, 1, 3, 3), s.dtype)
    assert emu.emu_sqrtm_forward_f64(s.data_ptr(), out.data_ptr(), saved.data_ptr(), 1, 3,
                                     iters) != 0
    assert emu.emu_sqrtm_backward_f64(s.data_ptr(), s.data_ptr(), saved.data_ptr(),
                                      out.data_ptr(), 1, 3, iters) != 0


def test_sqrtm_accepts_100_iters(emu):
    s = symmetric(spd_batch(1, 3, torch.float64, seed=1))
    out, saved = emu_sqrtm(emu, s, 100)
    close(out, ref_sqrtm(s, 100), torch.float64)


def launches(emu, fn, *args):
    before = emu.emu_launches()
    fn(*args)
    return emu.emu_launches() - before


@pytest.mark.parametrize("iters", [1, 2, 5, 9])
def test_launches_per_op(emu, iters):
    # forward: prep + Y1 + (N-1) x (T_k + one launch for the pair Y_{k+1}, Z_{k+1}), the
    # output written by the last product; backward: prep + dY1 + (N-1) x (dT + the pair
    # dY, dZ) + the diagonal term. At N = 5: 10 + 11, against 15 + 17 before the fusion.
    b, c, m = 2, 20, 9
    dtype = torch.float32
    s = symmetric(spd_batch(b, c, dtype, seed=1))
    saved = nan_filled((b, 3 * (iters - 1) + 1, c, c), dtype)
    out = nan_filled((b, c, c), dtype)
    fwd = launches(emu, call, emu, "sqrtm_forward", dtype, s, out, saved, b, c, iters)
    bwd = launches(emu, call, emu, "sqrtm_backward", dtype, s, s, saved, out, b, c, iters)
    assert (fwd, bwd) == (2 * iters, 2 * iters + 1)
    x = torch.randn(b, c, m, dtype=dtype)
    assert launches(emu, call, emu, "covpool_forward", dtype, x, out, b, c, m) == 2
    dx = nan_filled((b, c, m), dtype)
    assert launches(emu, call, emu, "covpool_backward", dtype, s, x, dx, b, c, m) == 3
    # Few tiles and a deep M: the forward splits the sum over M in parts (one more launch
    # adds them up); test_covpool checks its values at this size.
    x = torch.randn(2, 128, 196, dtype=dtype)
    out = nan_filled((2, 128, 128), dtype)
    assert launches(emu, call, emu, "covpool_forward", dtype, x, out, 2, 128, 196) == 3


@pytest.mark.parametrize("c", [1, 5, 70])
def test_triuvec(emu, c):
    dtype = torch.float64
    s = torch.randn(2, c, c, dtype=dtype)
    k = c * (c + 1) // 2
    v = nan_filled((2, k), dtype)
    call(emu, "triuvec_forward", dtype, s, v, 2, c)
    assert torch.equal(v, torch.ops.mpncov.triuvec(s))
    gv = torch.randn(2, k, dtype=dtype)
    out = nan_filled((2, c, c), dtype)
    call(emu, "triuvec_backward", dtype, gv, out, 2, c)
    assert torch.equal(out, torch.ops.mpncov.triuvec_backward(gv, c))


def test_emulation_rewrites_every_launch():
    from cuda_emulation import build
    src = "k<T><<<grid, kThreads, 0, stream>>>(a,\n b);  f<<<1, 32, 0, s>>>(x);"
    assert build.rewrite_launches(src) == (
        "::emu::launch(grid, kThreads, 0, stream, k<T>, a,\n b);  "
        "::emu::launch(1, 32, 0, s, f, x);")
    for f in build.CUDA_SRC.glob("*.cu"):
        assert "<<<" not in build.rewrite_launches(f.read_text()), f


# ---- the cuBLAS product path (MPNCOV_CUDA_PRODUCTS=cublas), its ATen code run on CPU ------

@pytest.fixture(scope="module")
def aten_path(tmp_path_factory):
    from cuda_emulation import build
    return build.load_aten_path(tmp_path_factory.mktemp("aten_path"))


@pytest.mark.parametrize("iters", [1, 2, 5, 11])
def test_cublas_path_matches_the_kernels(emu, aten_path, iters):
    b, c, m = 3, 40, 50
    dtype = torch.float64
    x = torch.randn(b, c, m, generator=torch.Generator().manual_seed(iters), dtype=dtype) + 1
    s = aten_path.covpool(x)
    close(s, torch.ops.mpncov.covpool(x), dtype)
    assert torch.equal(s, s.transpose(1, 2))
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(9), dtype=dtype)
    close(aten_path.covpool_backward(g, x), torch.ops.mpncov.covpool_backward(g, x), dtype)
    s = s.clone()
    s[1] = 0
    s[2] = -s[0]
    out, saved = aten_path.sqrtm(s, iters)
    emu_out, emu_saved = emu_sqrtm(emu, s, iters)
    close(out[:2], emu_out[:2], dtype)
    close(saved[:2], emu_saved[:2], dtype)
    assert torch.isnan(out[2]).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    ds = aten_path.sqrtm_backward(g, s, saved, iters)
    emu_ds = emu_sqrtm_backward(emu, g, s, emu_saved, iters)
    close(ds[:2], emu_ds[:2], dtype)
    close(ds[:1], ref_sqrtm_grad(s[:1], g[:1], iters), dtype)
    assert torch.isnan(ds[2]).all() and torch.equal(ds[1], torch.zeros_like(ds[1]))
    assert torch.equal(ds[:2], ds[:2].transpose(1, 2))
