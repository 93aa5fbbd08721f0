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
# The `math` argument of the emulated covpool / sqrtm launchers: an Fp32Math (mma_tf32.cuh).
FFMA, TF32, TF32X3 = 0, 1, 2


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
    call(emu, "covpool_forward", dtype, x, out, 2, c, m, FFMA)
    close(out, torch.ops.mpncov.covpool(x), dtype)
    assert torch.equal(out, out.transpose(1, 2)), "covpool output must be exactly symmetric"
    grad = torch.randn(2, c, c, generator=g, dtype=dtype)
    if offset:
        grad = misaligned(grad)
    dx = nan_filled((2, c, m), dtype)
    call(emu, "covpool_backward", dtype, grad, x, dx, 2, c, m, FFMA)
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


# The `path` argument of the emulated sqrtm launchers (tests/cuda_emulation/emu_api.cpp).
TILED, AUTO, ON_CHIP = 0, 1, 2


def emu_sqrtm(emu, s, iters, path=AUTO, math=FFMA):
    b, c, _ = s.shape
    out = nan_filled((b, c, c), s.dtype)
    saved = nan_filled((b, 3 * (iters - 1) + 1, c, c), s.dtype)
    call(emu, "sqrtm_forward", s.dtype, s, out, saved, b, c, iters, path, math)
    return out, saved


def emu_sqrtm_backward(emu, g, s, saved, iters, path=AUTO, math=FFMA):
    b, c, _ = s.shape
    ds = nan_filled((b, c, c), s.dtype)
    call(emu, "sqrtm_backward", s.dtype, g, s, saved, ds, b, c, iters, path, math)
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


@pytest.mark.parametrize("path", [TILED, AUTO])
@pytest.mark.parametrize("c,iters,dtype", SQRTM_CASES)
def test_sqrtm(emu, c, iters, dtype, path):
    b = 3
    s = symmetric(spd_batch(b, c, dtype, zero_sample=1, seed=c + iters))
    out, saved = emu_sqrtm(emu, s, iters, path)
    ref_out, ref_saved = torch.ops.mpncov.sqrtm(s, iters)
    close(out, ref_out, dtype)
    live = [0, 2]  # sample 1 has a zero trace: the CPU op leaves its saved iterates unwritten
    close(saved[live], ref_saved[live], dtype)
    close(out, ref_sqrtm(s, iters), dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a zero matrix must give zero"

    # The backward of sqrtm is the gradient of f(sym(S)): the kernels' symmetric mode.
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(7), dtype=dtype)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters, path)
    close(ds, torch.ops.mpncov.sqrtm_backward(g, s, ref_saved, iters), dtype)
    close(ds, ref_sqrtm_grad(s, g, iters), dtype)
    assert torch.equal(ds[1], torch.zeros_like(ds[1])), "zero trace must give zero grad"
    assert torch.equal(ds, ds.transpose(1, 2)), "the gradient must be exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iters", [3, 10])
def test_sqrtm_reads_the_symmetric_part(emu, iters, dtype):
    # c = 70: iters = 3 runs on chip, iters = 10 (long mode) tiled.
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


@pytest.mark.parametrize("path", [TILED, AUTO])
@pytest.mark.parametrize("iters", [5, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrtm_trace_rules(emu, dtype, iters, path):
    # Samples: SPD, zero (t = 0), negative definite (t < 0), SPD scaled into denormals.
    # AUTO runs iters = 5 on chip.
    c = 9
    base = symmetric(spd_batch(1, c, torch.float64, seed=5))[0]
    tiny_exp = -130 if dtype == torch.float32 else -1030  # t below the smallest normal
    s = torch.stack([base, torch.zeros_like(base), -base, base * 2.0 ** tiny_exp]).to(dtype)
    g = torch.randn(4, c, c, generator=torch.Generator().manual_seed(2), dtype=dtype)
    out, saved = emu_sqrtm(emu, s, iters, path)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters, path)
    # One bad sample does not touch the others: sample 0 alone gives the same bits.
    out0, saved0 = emu_sqrtm(emu, s[:1].contiguous(), iters, path)
    assert torch.equal(out[:1], out0)
    assert torch.equal(ds[:1], emu_sqrtm_backward(emu, g[:1].contiguous(), s[:1].contiguous(),
                                                  saved0, iters, path))
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


@pytest.mark.parametrize("path", [TILED, ON_CHIP])
def test_sqrtm_misaligned_buffers(emu, path):
    # Every buffer one element past a 16-byte boundary: the kernels must take their scalar
    # paths (the emulation aborts on a misaligned vector access, as a GPU faults) and give
    # the same bits as with aligned buffers.
    b, c, iters = 2, 64, 3
    dtype = torch.float32
    s = symmetric(spd_batch(b, c, dtype, seed=4))
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out, saved = emu_sqrtm(emu, s, iters, path)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters, path)
    out_m = misaligned(nan_filled(out.shape, dtype))
    saved_m = misaligned(nan_filled(saved.shape, dtype))
    call(emu, "sqrtm_forward", dtype, misaligned(s), out_m, saved_m, b, c, iters, path, FFMA)
    assert torch.equal(out_m, out) and torch.equal(saved_m, saved)
    ds_m = misaligned(nan_filled(ds.shape, dtype))
    call(emu, "sqrtm_backward", dtype, misaligned(g), misaligned(s), saved_m, ds_m, b, c, iters,
         path, FFMA)
    assert torch.equal(ds_m, ds)


@pytest.mark.parametrize("path", [TILED, ON_CHIP])
@pytest.mark.parametrize("iters", [0, -1, 101])
def test_sqrtm_refuses_iters_out_of_range(emu, iters, path):
    s = torch.eye(3, dtype=torch.float64)[None].contiguous()
    out, saved = nan_filled((1, 3, 3), s.dtype), nan_filled((1, 1, 3, 3), s.dtype)
    assert emu.emu_sqrtm_forward_f64(s.data_ptr(), out.data_ptr(), saved.data_ptr(), 1, 3,
                                     iters, path, FFMA) != 0
    assert emu.emu_sqrtm_backward_f64(s.data_ptr(), s.data_ptr(), saved.data_ptr(),
                                      out.data_ptr(), 1, 3, iters, path, FFMA) != 0


def test_sqrtm_accepts_100_iters(emu):
    s = symmetric(spd_batch(1, 3, torch.float64, seed=1))
    out, saved = emu_sqrtm(emu, s, 100)
    close(out, ref_sqrtm(s, 100), torch.float64)


# ---- sqrtm on chip: n <= 128, short mode, one block per sample ------------------------------

ON_CHIP_SIDES = [1, 5, 31, 32, 33, 64, 100, 127, 128]


def off_diagonal(m):
    return m[:, ~torch.eye(m.shape[-1], dtype=torch.bool)]


@pytest.mark.parametrize("iters", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("c", ON_CHIP_SIDES)
def test_sqrtm_on_chip(emu, c, iters):
    # float32; samples: SPD, zero trace, negative trace (indefinite), SPD. Short mode
    # (iters <= 8) runs on chip, long mode (9) must be refused by the on-chip launcher and
    # take the tiled path under AUTO.
    dtype = torch.float32
    base = symmetric(spd_batch(2, c, torch.float64, seed=c + iters))
    s = torch.stack([base[0], torch.zeros_like(base[0]), -base[1], base[1]]).to(dtype)
    g = torch.randn(4, c, c, generator=torch.Generator().manual_seed(c), dtype=dtype)
    if iters > 8:
        out, saved = nan_filled((4, c, c), dtype), nan_filled((4, 3 * iters - 2, c, c), dtype)
        fn = emu.emu_sqrtm_forward_f32
        assert fn(s.data_ptr(), out.data_ptr(), saved.data_ptr(), 4, c, iters, ON_CHIP, FFMA) != 0
        assert launches(emu, emu_sqrtm, emu, s, iters, AUTO) == 2 * iters
        return
    before = emu.emu_launches()
    out, saved = emu_sqrtm(emu, s, iters, ON_CHIP)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters, ON_CHIP)
    assert emu.emu_launches() - before == 2, "one launch per op"
    assert launches(emu, emu_sqrtm, emu, s, iters, AUTO) == 1, "AUTO takes the on-chip path"
    # Against the CPU ops and the float64 recurrence.
    ref_out, ref_saved = torch.ops.mpncov.sqrtm(s, iters)
    live = [0, 3]
    close(out[live], ref_out[live], dtype)
    close(saved[live], ref_saved[live], dtype)
    close(ds[live], torch.ops.mpncov.sqrtm_backward(g, s, ref_saved, iters)[live], dtype)
    close(ds[live], ref_sqrtm_grad(s[live], g[live], iters), dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(
        ds[1], torch.zeros_like(ds[1])), "t = 0: zero output and zero gradient"
    assert torch.isnan(out[2]).all() and torch.isnan(ds[2]).all(), "t < 0: NaN"
    assert torch.equal(ds[live], ds[live].transpose(1, 2)), "the gradient must be symmetric"
    # The tiled path: the same forward bits (trace and products summed in the same order);
    # the backward's off-diagonal bits too (its diagonal term sums <G, Y> and <dS, A> in
    # another order).
    t_out, t_saved = emu_sqrtm(emu, s, iters, TILED)
    assert torch.equal(out[[0, 1, 3]], t_out[[0, 1, 3]]) and torch.isnan(t_out[2]).all()
    assert torch.equal(saved, t_saved)
    t_ds = emu_sqrtm_backward(emu, g, s, saved, iters, TILED)
    assert torch.equal(off_diagonal(ds[live]), off_diagonal(t_ds[live]))
    close(ds[live], t_ds[live], dtype)


@pytest.mark.parametrize("c,iters", [(5, 3), (64, 5), (90, 2)])
def test_sqrtm_on_chip_float64(emu, c, iters):
    dtype = torch.float64
    s = symmetric(spd_batch(2, c, dtype, zero_sample=1, seed=c))
    g = torch.randn(2, c, c, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out, saved = emu_sqrtm(emu, s, iters, ON_CHIP)
    ds = emu_sqrtm_backward(emu, g, s, saved, iters, ON_CHIP)
    ref_out, ref_saved = torch.ops.mpncov.sqrtm(s, iters)
    close(out, ref_out, dtype)
    close(ds[:1], ref_sqrtm_grad(s[:1], g[:1], iters), dtype)
    assert torch.equal(ds[1], torch.zeros_like(ds[1]))
    t_out, t_saved = emu_sqrtm(emu, s, iters, TILED)
    assert torch.equal(out, t_out) and torch.equal(saved, t_saved)


def test_sqrtm_on_chip_shared_memory_limits(emu):
    # The on-chip kernels run where their shared memory fits the device's opt-in limit:
    # float32 forward 3 n p 4 bytes, backward (3 n + 32) p 4 (p = n rounded up to 8).
    # H100/H200 (227 KB): float32 up to n = 128; float64 forward to 96, backward to 90.
    # A100 (163 KB): float32 forward to 115, backward to 112. Elsewhere AUTO is tiled.
    def runs_on_chip(c, dtype, backward):
        s = symmetric(spd_batch(1, c, dtype, seed=2))
        out, saved = emu_sqrtm(emu, s, 2, TILED)
        if backward:
            n = launches(emu, emu_sqrtm_backward, emu, s, s, saved, 2, AUTO)
            return n == 1
        return launches(emu, emu_sqrtm, emu, s, 2, AUTO) == 1

    f32, f64 = torch.float32, torch.float64
    assert runs_on_chip(128, f32, False) and runs_on_chip(128, f32, True)
    assert runs_on_chip(96, f64, False) and not runs_on_chip(97, f64, False)
    assert runs_on_chip(90, f64, True) and not runs_on_chip(91, f64, True)
    assert not runs_on_chip(129, f32, False) and not runs_on_chip(129, f32, True)
    previous = emu.emu_set_shared_optin(163 * 1024)
    try:
        assert runs_on_chip(115, f32, False) and not runs_on_chip(116, f32, False)
        assert runs_on_chip(112, f32, True) and not runs_on_chip(113, f32, True)
        s = symmetric(spd_batch(1, 128, f32, seed=3))
        out, saved = nan_filled((1, 128, 128), f32), nan_filled((1, 4, 128, 128), f32)
        assert emu.emu_sqrtm_forward_f32(s.data_ptr(), out.data_ptr(), saved.data_ptr(), 1, 128,
                                         2, ON_CHIP, FFMA) != 0, "the launcher refuses what does not fit"
    finally:
        emu.emu_set_shared_optin(previous)


def launches(emu, fn, *args):
    before = emu.emu_launches()
    fn(*args)
    return emu.emu_launches() - before


@pytest.mark.parametrize("iters", [1, 2, 5, 9])
def test_launches_per_op(emu, iters):
    # Tiled: forward: prep + Y1 + (N-1) x (T_k + one launch for the pair Y_{k+1}, Z_{k+1}),
    # the output written by the last product; backward: prep + dY1 + (N-1) x (dT + the pair
    # dY, dZ) + the diagonal term. At N = 5: 10 + 11, against 15 + 17 before the fusion.
    # On chip (short mode): one launch each.
    b, c, m = 2, 20, 9
    dtype = torch.float32
    s = symmetric(spd_batch(b, c, dtype, seed=1))
    saved = nan_filled((b, 3 * (iters - 1) + 1, c, c), dtype)
    out = nan_filled((b, c, c), dtype)
    fwd = launches(emu, call, emu, "sqrtm_forward", dtype, s, out, saved, b, c, iters, TILED, FFMA)
    bwd = launches(emu, call, emu, "sqrtm_backward", dtype, s, s, saved, out, b, c, iters, TILED,
                   FFMA)
    assert (fwd, bwd) == (2 * iters, 2 * iters + 1)
    fwd = launches(emu, call, emu, "sqrtm_forward", dtype, s, out, saved, b, c, iters, AUTO, FFMA)
    bwd = launches(emu, call, emu, "sqrtm_backward", dtype, s, s, saved, out, b, c, iters, AUTO, FFMA)
    assert (fwd, bwd) == ((1, 1) if iters <= 8 else (2 * iters, 2 * iters + 1))
    x = torch.randn(b, c, m, dtype=dtype)
    assert launches(emu, call, emu, "covpool_forward", dtype, x, out, b, c, m, FFMA) == 2
    dx = nan_filled((b, c, m), dtype)
    assert launches(emu, call, emu, "covpool_backward", dtype, s, x, dx, b, c, m, FFMA) == 3
    # Few tiles and a deep M: the forward splits the sum over M in parts (one more launch
    # adds them up); test_covpool checks its values at this size.
    x = torch.randn(2, 128, 196, dtype=dtype)
    out = nan_filled((2, 128, 128), dtype)
    assert launches(emu, call, emu, "covpool_forward", dtype, x, out, 2, 128, 196, FFMA) == 3


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
    for f in [*build.CUDA_SRC.glob("*.cu"), *build.CUDA_SRC.glob("*.cuh")]:
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cublas_covpool_reads_tokens_and_returns_their_layout(aten_path, dtype):
    # the CUDA binding sends token-major x (tokens, channels_last) to this path as it is
    tokens = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(3), dtype=dtype)
    x = tokens.transpose(1, 2)
    g = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(4), dtype=dtype)
    s = aten_path.covpool(x)
    assert torch.equal(s, s.transpose(1, 2))
    close(s, torch.ops.mpncov.covpool(x.contiguous()), dtype)
    dx = aten_path.covpool_backward(g, x)
    assert dx.transpose(1, 2).is_contiguous()  # x's layout, as the fake kernel says
    close(dx, torch.ops.mpncov.covpool_backward(g, x.contiguous()), dtype)
    assert aten_path.covpool_backward(g, x.contiguous()).is_contiguous()


# ---- TF32 tensor-core products of the tile core (MPNCOV_CUDA_TF32), float only --------------

def tf32(t):
    """float32 rounded to TF32 as cvt.rna.tf32.f32 does: 10 mantissa bits, to nearest, ties
    away from zero (on the sign-magnitude bits); infinities and NaN kept."""
    bits = t.float().contiguous().view(torch.int32)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = (bits + 0x1000) & ~0x1FFF
    return torch.where(special, bits, rounded).view(torch.float32)


def test_tf32_rounding_reference():
    x = torch.tensor([1.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -12, -(1 + 2.0 ** -11),
                      1 + 2.0 ** -11 - 2.0 ** -23, 3.4028234663852886e38, float("inf")])
    want = [1.0, 1 + 2.0 ** -10, 1 + 2.0 ** -10, -(1 + 2.0 ** -10), 1.0, float("inf"),
            float("inf")]
    assert tf32(x).tolist() == want


def zero_mean_features(b, c, m, seed):
    """float32 features with more significant bits than TF32 keeps (16 or more) whose rows
    sum to exactly 0 (the last entry, within float32's 24 bits), so the kernels' centring
    is exact and the reference sees the kernels' Xc."""
    g = torch.Generator().manual_seed(seed)
    bound = 2 ** (24 - m.bit_length())
    k = torch.randint(-bound, bound, (b, c, m), generator=g, dtype=torch.int64)
    k[..., -1] = -k[..., :-1].sum(-1)
    return (k.double() * 2.0 ** -22).float().contiguous()


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("c,m", [(64, 48), (70, 33), (128, 196)])
def test_covpool_tf32(emu, c, m):
    x = zero_mean_features(2, c, m, seed=c)
    assert torch.equal(x.double().sum(-1), torch.zeros(2, c, dtype=torch.float64))
    exact = x.double() @ x.double().transpose(1, 2) / m
    rounded = tf32(x).double() @ tf32(x).double().transpose(1, 2) / m
    g = torch.randn(2, c, c, generator=torch.Generator().manual_seed(1))
    h = g + g.transpose(1, 2)  # the kernel's fp32 G + G^T, bit for bit
    dx_exact = h.double() @ x.double() / m
    dx_rounded = tf32(h).double() @ tf32(x).double() / m
    results = {}
    for math in (FFMA, TF32, TF32X3):
        out = nan_filled((2, c, c), torch.float32)
        call(emu, "covpool_forward", torch.float32, x, out, 2, c, m, math)
        assert torch.equal(out, out.transpose(1, 2))
        dx = nan_filled((2, c, m), torch.float32)
        call(emu, "covpool_backward", torch.float32, g, x, dx, 2, c, m, math)
        results[math] = (out, dx)
    # TF32: the product of the TF32-rounded operands (to float accumulation), visibly not the
    # exact one; 3xTF32 and FFMA: the exact product to float rounding.
    assert rel_err(results[TF32][0], rounded) < 2e-6 < 1e-5 < rel_err(results[TF32][0], exact)
    assert rel_err(results[TF32][1], dx_rounded) < 2e-6 < 1e-5 < rel_err(results[TF32][1], dx_exact)
    for math in (FFMA, TF32X3):
        assert rel_err(results[math][0], exact) < 2e-6
        assert rel_err(results[math][1], dx_exact) < 2e-6


def sqrtm_recurrence(s, iters, g, prod):
    """The tiled path's sqrtm forward and backward in float32 with every product through
    prod(terms) (a float32 result from [(P, Q), ...]) and mirrored like the kernels (short
    mode); s has an exactly representable trace."""
    f = torch.float32
    eye = torch.eye(s.shape[-1], dtype=f).expand_as(s)

    def mirrored(m):
        return m.triu() + m.triu(1).transpose(1, 2)

    def job(terms, alpha=1.0, gamma=0.0, r=None, beta=0.0):
        v = prod(terms) * alpha
        if r is not None:
            v = v + beta * r
        return mirrored(v + gamma * eye)

    t = s.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    a = s / t
    t0 = 0.5 * (3 * eye - a)
    y, z, tk = [job([(a, t0)])], [t0], []
    for k in range(iters - 1):
        tk.append(job([(z[k], y[k])], -0.5, 1.5))
        y.append(job([(y[k], tk[k])]))
        z.append(job([(tk[k], z[k])]))
    out = t.sqrt() * y[-1]
    e = t.sqrt() * (0.5 * (g + g.transpose(1, 2)))
    dy = job([(e, a), (a, e)], -0.5, r=e, beta=1.5)
    dz = -0.5 * e
    for k in range(iters - 1):
        dt = job([(dz, y[k]), (z[k], dy)], -0.5)
        dy, dz = job([(dy, tk[k]), (y[k], dt)]), job([(dt, z[k]), (tk[k], dz)])
    ds = dy / t
    diag = (g * y[-1]).sum((1, 2)) / (2 * t.sqrt()[:, 0, 0]) - (ds * a).sum((1, 2))
    return out, ds + diag[:, None, None] * eye


def tf32_products(terms):
    """sum P Q over the terms as the TF32 kernels accumulate: TF32-rounded operands, and per
    k8 step of each term (one MMA) the exact products added to the float accumulator with
    one rounding (the emulated MMA's model)."""
    acc = None
    for p, q in terms:
        p, q = tf32(p).double(), tf32(q).double()
        for k0 in range(0, p.shape[-1], 8):
            part = p[..., k0:k0 + 8] @ q[..., k0:k0 + 8, :]
            acc = (part if acc is None else acc.double() + part).float()
    return acc


def exact_products(terms):
    return sum(p.double() @ q.double() for p, q in terms).float()


@pytest.mark.parametrize("c,iters", [(64, 3), (70, 5), (130, 2)])
def test_sqrtm_tf32(emu, c, iters):
    gen_ = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, c + 5, generator=gen_, dtype=torch.float64)
    s = x @ x.transpose(1, 2) / (c + 5)
    s = 0.5 * (s + s.transpose(1, 2))
    idx = torch.arange(c)
    s[:, idx, idx] = torch.round(s[:, idx, idx] * 1024) / 1024  # an exact float32 trace
    s = s.float().contiguous()
    g = torch.randn(2, c, c, generator=gen_).contiguous()
    ref = {"rounded": sqrtm_recurrence(s, iters, g, tf32_products),
           "exact": sqrtm_recurrence(s, iters, g, exact_products)}
    # TF32 and the reference that rounds like it differ from the exact products by ~1e-3;
    # the forward agrees with that reference to the bit (the emulated MMA's accumulation
    # order is the reference's), the backward up to its two dot products' summation order.
    # 3xTF32 and FFMA agree with the exact products to float rounding.
    assert rel_err(ref["rounded"][0], ref["exact"][0].double()) > 1e-4
    for math, want in ((TF32, "rounded"), (TF32X3, "exact"), (FFMA, "exact")):
        out, saved = emu_sqrtm(emu, s, iters, TILED, math)
        ds = emu_sqrtm_backward(emu, g, s, saved, iters, TILED, math)
        if math == TF32:
            assert torch.equal(out, ref[want][0])
        assert rel_err(out, ref[want][0].double()) < 2e-6, math
        assert rel_err(ds, ref[want][1].double()) < 2e-6, math
    # Long mode computes float32 in float64, where TF32 does not apply.
    s_long = s.double().contiguous()
    assert torch.equal(emu_sqrtm(emu, s_long, 9, TILED, TF32)[0], emu_sqrtm(emu, s_long, 9, TILED, FFMA)[0])


# ---- the Gram-space pipeline (isqrt_cov_gram), against the CPU ops --------------------------

def gram_slots(iters, recompute_t):
    return 2 * iters - 1 if recompute_t else 3 * iters - 2


def emu_gram(emu, x, iters, recompute_t=False, tokens=False, math=FFMA, vec=None, saved=None):
    """The emulated forward of x (B, C, M): channels first, or (tokens) the transposed view of
    a contiguous (B, M, C), handed to the launcher as that buffer."""
    b, c, m = x.shape
    buf = x.transpose(1, 2) if tokens else x
    assert buf.is_contiguous()
    vec = nan_filled((b, c * (c + 1) // 2), x.dtype) if vec is None else vec
    saved = nan_filled((b, gram_slots(iters, recompute_t), m, m), x.dtype) if saved is None else saved
    call(emu, "isqrt_cov_gram_forward", x.dtype, buf, int(tokens), vec, saved, b, c, m, iters,
         int(recompute_t), math)
    return vec, saved


def emu_gram_backward(emu, grad, x, saved, iters, tokens=False, math=FFMA, dx_buf=None):
    """dx in x's layout (a (B, M, C) buffer seen transposed for tokens)."""
    b, c, m = x.shape
    buf = x.transpose(1, 2) if tokens else x
    recompute_t = saved.shape[1] != 3 * iters - 2
    if dx_buf is None:
        dx_buf = nan_filled((b, m, c) if tokens else (b, c, m), x.dtype)
    call(emu, "isqrt_cov_gram_backward", x.dtype, grad, buf, int(tokens), saved, dx_buf, b, c, m,
         iters, int(recompute_t), math)
    return dx_buf.transpose(1, 2) if tokens else dx_buf


def gram_features(b, c, m, dtype, seed, tokens=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, c, generator=g, dtype=torch.float64) + 0.5
    x = x.to(dtype)
    return x.transpose(1, 2) if tokens else x.transpose(1, 2).contiguous()


def gram_close(a, b, dtype, tol=None):
    tol = tol or (1e-12 if dtype == torch.float64 else 3e-5)
    assert not torch.isnan(a).any(), "NaN: something was not written or read scratch"
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item() / scale
    assert err <= tol, f"max relative error {err:.3g} > {tol}"


# (C, M, iters): ragged tiles on both sides of the C x M and M x M products, M > C and
# M < C, short mode up to 8 steps and long mode (12: T and Z products in full).
GRAM_CASES = [(c, m, n, torch.float64) for c, m, n in [
    (1, 1, 1), (1, 9, 2), (3, 7, 3), (17, 5, 5), (47, 12, 8), (48, 48, 2), (65, 30, 3),
    (130, 5, 2), (12, 40, 5), (40, 70, 1), (17, 5, 12), (12, 40, 12)]]
# float32 (long mode is float64 in the binding), up to the C = 128, M = 196 of a ResNet head
GRAM_CASES += [(c, m, n, torch.float32) for c, m, n in [
    (3, 7, 1), (65, 30, 5), (12, 40, 8), (130, 5, 3), (128, 196, 2)]]


@pytest.mark.parametrize("recompute_t", [False, True])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("c,m,iters,dtype", GRAM_CASES)
def test_gram(emu, c, m, iters, dtype, tokens, recompute_t):
    b = 2
    x = gram_features(b, c, m, dtype, seed=c * 100 + m + iters, tokens=tokens)
    vec, saved = emu_gram(emu, x, iters, recompute_t, tokens)
    ref_vec, ref_saved = torch.ops.mpncov.isqrt_cov_gram(x, iters, recompute_t)
    gram_close(vec, ref_vec, dtype)
    # Every slot (Y_1 is G Z_1 on the CPU and 1.5 G - 0.5 G G here: equal to rounding).
    gram_close(saved, ref_saved, dtype)
    g = torch.randn(b, c * (c + 1) // 2, generator=torch.Generator().manual_seed(5), dtype=dtype)
    dx = emu_gram_backward(emu, g, x, saved, iters, tokens)
    ref_dx = torch.ops.mpncov.isqrt_cov_gram_backward(g, x, ref_saved, iters)
    dx_tol = None if dtype == torch.float64 else 1e-4
    gram_close(dx, ref_dx, dtype, dx_tol)
    # The saved layouts are interchangeable: the kernels' backward from the CPU's saved.
    gram_close(emu_gram_backward(emu, g, x, ref_saved.contiguous(), iters, tokens), ref_dx, dtype,
               dx_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("iters", [1, 5, 12])
def test_gram_degenerate_samples(emu, iters, tokens, dtype):
    # Samples: normal, constant (||Xc|| = 0), NaN in one entry, normal. The constant one
    # gives zero vec and zero dx, the NaN one NaN, and neither touches the others.
    b, c, m = 4, 9, 6
    x = gram_features(b, c, m, dtype, seed=iters, tokens=tokens)
    x[1] = 3.0
    x[2, 4, 2] = float("nan")
    vec, saved = emu_gram(emu, x, iters, tokens=tokens)
    g = torch.randn(b, c * (c + 1) // 2, generator=torch.Generator().manual_seed(8), dtype=dtype)
    dx = emu_gram_backward(emu, g, x, saved, iters, tokens)
    assert torch.equal(vec[1], torch.zeros_like(vec[1])) and torch.equal(dx[1], torch.zeros_like(dx[1]))
    assert torch.isnan(vec[2]).all() and torch.isnan(dx[2]).all()
    live = [0, 3]
    ref_vec, ref_saved = torch.ops.mpncov.isqrt_cov_gram(x, iters)
    gram_close(vec[live], ref_vec[live], dtype)
    gram_close(dx[live], torch.ops.mpncov.isqrt_cov_gram_backward(g, x, ref_saved, iters)[live],
               dtype, None if dtype == torch.float64 else 1e-4)
    # Sample 0 alone: the same bits.
    x0 = x[:1].transpose(1, 2).contiguous().transpose(1, 2) if tokens else x[:1].contiguous()
    vec0, saved0 = emu_gram(emu, x0, iters, tokens=tokens)
    assert torch.equal(vec0, vec[:1]) and torch.equal(saved0, saved[:1])
    assert torch.equal(emu_gram_backward(emu, g[:1].contiguous(), x0, saved0, iters, tokens), dx[:1])


@pytest.mark.parametrize("scale", [1e-160, 1e200])
def test_gram_float64_extreme_scales(emu, scale):
    # Squares of these underflow / overflow double: the norm is taken over scaled values.
    # vec is homogeneous of degree 1 in x, dx of degree 0.
    dtype = torch.float64
    x = gram_features(2, 10, 7, dtype, seed=3)
    g = torch.randn(2, 55, generator=torch.Generator().manual_seed(9), dtype=dtype)
    vec, saved = emu_gram(emu, x, 5)
    dx = emu_gram_backward(emu, g, x, saved, 5)
    xs = (x * scale).contiguous()
    vec_s, saved_s = emu_gram(emu, xs, 5)
    dx_s = emu_gram_backward(emu, g, xs, saved_s, 5)
    assert torch.isfinite(vec_s).all() and torch.isfinite(dx_s).all()
    gram_close(vec_s / scale, vec, dtype, 1e-10)
    gram_close(dx_s, dx, dtype, 1e-10)
    gram_close(vec_s, torch.ops.mpncov.isqrt_cov_gram(xs, 5)[0], dtype)


@pytest.mark.parametrize("tokens", [False, True])
def test_gram_misaligned_buffers(emu, tokens):
    # Every buffer one element past a 16-byte boundary: the scalar paths, the same bits.
    b, c, m, iters = 2, 64, 48, 3
    dtype = torch.float32
    x = gram_features(b, c, m, dtype, seed=11, tokens=tokens)
    g = torch.randn(b, c * (c + 1) // 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    vec, saved = emu_gram(emu, x, iters, tokens=tokens)
    dx = emu_gram_backward(emu, g, x, saved, iters, tokens)
    buf = misaligned(x.transpose(1, 2) if tokens else x)
    x_m = buf.transpose(1, 2) if tokens else buf
    vec_m, saved_m = emu_gram(emu, x_m, iters, tokens=tokens, vec=misaligned(nan_filled(vec.shape, dtype)),
                              saved=misaligned(nan_filled(saved.shape, dtype)))
    assert torch.equal(vec_m, vec) and torch.equal(saved_m, saved)
    dx_buf = misaligned(nan_filled((b, m, c) if tokens else (b, c, m), dtype))
    dx_m = emu_gram_backward(emu, misaligned(g), x_m, saved_m, iters, tokens, dx_buf=dx_buf)
    assert torch.equal(dx_m, dx)


def test_gram_tf32(emu):
    # TF32 products round their operands to 10 mantissa bits: visibly not float32, within a
    # TF32 tolerance; 3xTF32 about float32.
    b, c, m, iters = 2, 70, 40, 3
    dtype = torch.float32
    x = gram_features(b, c, m, dtype, seed=12)
    g = torch.randn(b, c * (c + 1) // 2, generator=torch.Generator().manual_seed(4), dtype=dtype)
    ref_vec, ref_saved = torch.ops.mpncov.isqrt_cov_gram(x.double(), iters)
    ref_dx = torch.ops.mpncov.isqrt_cov_gram_backward(g.double(), x.double(), ref_saved, iters)
    errs = {}
    for math in (FFMA, TF32, TF32X3):
        vec, saved = emu_gram(emu, x, iters, math=math)
        dx = emu_gram_backward(emu, g, x, saved, iters, math=math)
        errs[math] = (rel_err(vec, ref_vec), rel_err(dx, ref_dx))
    assert max(errs[FFMA]) < 5e-6 and max(errs[TF32X3]) < 5e-6, errs
    assert 1e-5 < errs[TF32][0] < 5e-3 and 1e-5 < errs[TF32][1] < 5e-3, errs


@pytest.mark.parametrize("recompute_t", [False, True])
@pytest.mark.parametrize("iters", [1, 2, 5, 9])
def test_gram_launches_per_op(emu, iters, recompute_t):
    # Forward: normalisation (channel sums, centring, norm, division) + G + Z_1, for N >= 2
    # Y_1 + (N-1) x (T_k + one launch for Y_{k+1} and Z_{k+1}, Z_N alone), then P and vec.
    # Backward: normalisation + E + E W + H + Z_1 + dZ_1, for N >= 2 dY_1 + (N-1) x ([T_k]
    # + dT + dY, dZ), then dXc, the finish kernel and the centring.
    b, c, m = 2, 20, 9
    dtype = torch.float32
    x = gram_features(b, c, m, dtype, seed=1)
    vec = nan_filled((b, c * (c + 1) // 2), dtype)
    saved = nan_filled((b, gram_slots(iters, recompute_t), m, m), dtype)
    fwd = launches(emu, emu_gram, emu, x, iters, recompute_t, False, FFMA, vec, saved)
    bwd = launches(emu, emu_gram_backward, emu, vec, x, saved, iters)
    steps = iters - 1
    assert fwd == 8 + (1 + 2 * steps if iters > 1 else 0)
    assert bwd == 12 + (1 + (3 if recompute_t else 2) * steps if iters > 1 else 0)


@pytest.mark.parametrize("iters", [0, -1, 101])
def test_gram_refuses_iters_out_of_range(emu, iters):
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    vec, saved, dx = nan_filled((1, 6), x.dtype), nan_filled((1, 1, 4, 4), x.dtype), nan_filled((1, 3, 4), x.dtype)
    assert emu.emu_isqrt_cov_gram_forward_f64(x.data_ptr(), 0, vec.data_ptr(), saved.data_ptr(), 1, 3, 4,
                                              iters, 0, FFMA) != 0
    assert emu.emu_isqrt_cov_gram_backward_f64(vec.data_ptr(), x.data_ptr(), 0, saved.data_ptr(),
                                               dx.data_ptr(), 1, 3, 4, iters, 0, FFMA) != 0
