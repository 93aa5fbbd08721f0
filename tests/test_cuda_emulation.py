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


@pytest.mark.parametrize("c,m", [(1, 1), (3, 7), (17, 50), (33, 150), (65, 30), (130, 5)])
def test_covpool(emu, c, m):
    dtype = torch.float64
    g = torch.Generator().manual_seed(c * 1000 + m)
    x = (torch.randn(2, c, m, generator=g, dtype=dtype) + 3.0).contiguous()
    out = nan_filled((2, c, c), dtype)
    call(emu, "covpool_forward", dtype, x, out, 2, c, m)
    close(out, torch.ops.mpncov.covpool(x), dtype)
    assert torch.equal(out, out.transpose(1, 2)), "covpool output must be exactly symmetric"
    grad = torch.randn(2, c, c, generator=g, dtype=dtype)
    dx = nan_filled((2, c, m), dtype)
    call(emu, "covpool_backward", dtype, grad, x, dx, 2, c, m)
    close(dx, torch.ops.mpncov.covpool_backward(grad, x), dtype)


SQRTM_CASES = [(c, n, torch.float64) for c, n in [(1, 1), (1, 3), (3, 1), (3, 2), (3, 8),
                                                   (17, 3), (17, 4), (17, 5), (65, 2), (65, 5),
                                                   (130, 3)]]
SQRTM_CASES += [(17, 5, torch.float32), (65, 3, torch.float32)]


@pytest.mark.parametrize("c,iters,dtype", SQRTM_CASES)
def test_sqrtm(emu, c, iters, dtype):
    b = 3
    s = spd_batch(b, c, dtype, zero_sample=1, seed=c + iters)
    slots = 3 * (iters - 1) + 1
    out, saved = nan_filled((b, c, c), dtype), nan_filled((b, slots, c, c), dtype)
    call(emu, "sqrtm_forward", dtype, s, out, saved, b, c, iters)
    ref_out, ref_saved = torch.ops.mpncov.sqrtm(s, iters)
    close(out, ref_out, dtype)
    live = [0, 2]  # sample 1 has a zero trace: the CPU op leaves its saved iterates unwritten
    close(saved[live], ref_saved[live], dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a zero matrix must give zero"

    # The backward of sqrtm is the gradient of f(sym(S)): the kernels' symmetric mode.
    g = torch.randn(b, c, c, generator=torch.Generator().manual_seed(7), dtype=dtype)
    ds = nan_filled((b, c, c), dtype)
    call(emu, "sqrtm_backward", dtype, g, s, saved, ds, b, c, iters, 1)
    close(ds, torch.ops.mpncov.sqrtm_backward(g, s, ref_saved, iters), dtype)
    assert torch.equal(ds[1], torch.zeros_like(ds[1])), "zero trace must give zero grad"
    assert torch.equal(ds, ds.transpose(1, 2)), "the gradient must be symmetric"


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
