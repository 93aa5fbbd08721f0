#!/usr/bin/env python3
"""Smoke test of mpncov's CUDA ops for a GPU session (scripts/gpu_check.sh).

    CUDA_LAUNCH_BLOCKING=1 python scripts/gpu_smoke.py [--quick] [--dry-run]

Cases (each compared with the CPU ops, or bitwise with a plain-layout run of the same
CUDA op): odd sizes, a zero-trace sample among normal ones, a storage offset of 1
(misaligned data), channels_last input, an expanded (stride-0) gradient, B above 65535
(more samples than gridDim.y), long mode (iters > 8), a CUDA graph replay equal to eager,
sqrtm on chip against the tiled path (MPNCOV_CUDA_SQRTM), the kernels' TF32 and 3xTF32
products (MPNCOV_CUDA_TF32), and both product paths
(MPNCOV_CUDA_PRODUCTS = kernels, cublas), and the Gram space on tokens. With the default MPNCOV_CUDA_SQRTM=auto every
case with C <= 128 and iters <= 8 runs sqrtm on chip. Prints one line per case and exits
non-zero if any failed.

--quick: the small shapes only (for compute-sanitizer, which slows kernels ~100x).
--dry-run: run every case with CPU tensors in place of CUDA ones (checks the script
itself on a machine without a GPU; the graph case is skipped).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mpncov  # noqa: E402

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if b.numel() else 0.0


def check_close(a, b, tol, what):
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    e = rel(a, b)
    assert e <= tol, f"{what}: relative error {e:.2e} > {tol:.0e}"


def pipeline(x, g, iters):
    x = x.detach().requires_grad_()
    out = mpncov.isqrt_cov(x, iters=iters)
    (dx,) = torch.autograd.grad(out, x, g)
    return out.detach(), dx


def case_odd_sizes(dev, quick):
    shapes = [(2, 5, 7, 3), (3, 37, 13, 5)] + ([] if quick else [(2, 129, 49, 5), (2, 300, 196, 3)])
    for b, c, m, n in shapes:
        for dtype, tol in ((torch.float32, 5e-4), (F64, 1e-9)):
            x = torch.randn(b, c, m, generator=gen(c), dtype=F64)
            g = torch.randn(b, c * (c + 1) // 2, generator=gen(m), dtype=F64)
            out, dx = pipeline(x.to(dev, dtype), g.to(dev, dtype), n)
            ref_out, ref_dx = pipeline(x, g, n)  # CPU float64
            check_close(out, ref_out, tol, f"isqrt_cov out C={c} M={m} {dtype}")
            check_close(dx, ref_dx, tol * 10, f"isqrt_cov grad C={c} M={m} {dtype}")


def case_zero_trace(dev, quick):
    x = torch.randn(3, 33, 20, generator=gen(1), dtype=torch.float32)
    x[1] = 2.0  # constant features: covariance 0, trace 0
    g = torch.randn(3, 33 * 34 // 2, generator=gen(2))
    out, dx = pipeline(x.to(dev), g.to(dev), 5)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "zero-trace sample: output not 0"
    assert torch.equal(dx[1], torch.zeros_like(dx[1])), "zero-trace sample: gradient not 0"
    out0, dx0 = pipeline(x[:1].to(dev), g[:1].to(dev), 5)
    assert torch.equal(out[:1], out0) and torch.equal(dx[:1], dx0), "sample 0 changed by sample 1"


def case_storage_offset(dev, quick):
    x = torch.randn(2, 64, 32, generator=gen(3)).to(dev)
    buf = torch.empty(x.numel() + 1, device=dev)
    xo = buf[1:].view(x.shape)
    xo.copy_(x)
    g = torch.randn(2, 64 * 65 // 2, generator=gen(4)).to(dev)
    gbuf = torch.empty(g.numel() + 1, device=dev)
    go = gbuf[1:].view(g.shape)
    go.copy_(g)
    a, b = pipeline(x, g, 5), pipeline(xo, go, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "storage offset 1 changes bits"
    s = mpncov.covpool(x)
    sbuf = torch.empty(s.numel() + 1, device=dev)
    so = sbuf[1:].view(s.shape)
    so.copy_(s)
    assert torch.equal(mpncov.sqrtm(so, iters=5), mpncov.sqrtm(s, iters=5)), "sqrtm offset"


def case_channels_last(dev, quick):
    x = torch.randn(2, 48, 7, 9, generator=gen(5)).to(dev)
    xl = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 48 * 49 // 2, generator=gen(6)).to(dev)
    a, b = pipeline(x, g, 3), pipeline(xl, g, 3)
    # channels_last is read as it is (tokens; on CUDA covpool through cuBLAS on the
    # transposed view): other operand orders, so rounding may differ
    check_close(a[0], b[0], 1e-5, "channels_last output")
    check_close(a[1], b[1], 1e-5, "channels_last gradient")


def case_expanded_grad(dev, quick):
    x = torch.randn(4, 20, 30, generator=gen(7)).to(dev)
    g = torch.randn(1, 210, generator=gen(8)).to(dev)
    a = pipeline(x, g.expand(4, 210), 5)
    b = pipeline(x, g.expand(4, 210).contiguous(), 5)
    assert torch.equal(a[1], b[1]), "expanded gradient changes bits"


def case_large_batch(dev, quick):
    b = 2 if quick else 65537 + 3
    x = torch.randn(b, 3, 4, generator=gen(9))
    g = torch.randn(b, 6, generator=gen(10))
    out, dx = pipeline(x.to(dev), g.to(dev), 3)
    ref_out, ref_dx = pipeline(x, g, 3)
    check_close(out, ref_out, 1e-4, f"B={b} out")
    check_close(dx, ref_dx, 1e-3, f"B={b} grad")
    check_close(out[-3:], ref_out[-3:], 1e-4, "last samples (beyond gridDim.y)")


def case_long_mode(dev, quick):
    s = torch.randn(2, 40, 60, generator=gen(11), dtype=F64)
    s = s @ s.transpose(1, 2) / 60
    for iters in (9, 20):
        y = mpncov.sqrtm(s.to(dev), iters=iters)
        check_close(y, mpncov.sqrtm(s, iters=iters), 1e-9, f"sqrtm iters={iters}")


def case_graph_replay(dev, quick):
    if dev == "cpu":
        return "skipped (no CUDA graphs on the CPU)"
    x = torch.randn(4, 64, 49, generator=gen(12)).to(dev)
    g = torch.randn(4, 64 * 65 // 2, generator=gen(13)).to(dev)
    eager = pipeline(x, g, 5)
    static_x = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        for _ in range(2):
            out = mpncov.isqrt_cov(static_x, iters=5)
            torch.autograd.grad(out, static_x, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mpncov.isqrt_cov(static_x, iters=5)
        (dx,) = torch.autograd.grad(out, static_x, g)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager[0]) and torch.equal(dx, eager[1]), "graph replay != eager"


def case_sqrtm_paths(dev, quick):
    """sqrtm on chip (MPNCOV_CUDA_SQRTM=auto) against the tiled path, C <= 128 short mode,
    with a zero-trace sample; says whether the forward bits agree."""
    if os.environ.get("MPNCOV_CUDA_PRODUCTS") == "cublas":
        return "skipped (cuBLAS products)"
    notes = []
    for c, n in [(5, 3), (33, 5)] + ([] if quick else [(100, 5), (128, 5), (128, 8)]):
        for dtype, tol in ((torch.float32, 1e-5), (F64, 1e-12)):
            s = torch.randn(3, c, c + 4, generator=gen(c), dtype=F64)
            s = (s @ s.transpose(1, 2) / (c + 4)).to(dev, dtype)
            s[1] = 0
            g = torch.randn(3, c, c, generator=gen(n), dtype=F64).to(dev, dtype)
            res = {}
            for path in ("tiled", "auto"):
                os.environ["MPNCOV_CUDA_SQRTM"] = path
                out, saved = torch.ops.mpncov.sqrtm(s, n)
                res[path] = (out, torch.ops.mpncov.sqrtm_backward(g, s, saved, n))
            os.environ["MPNCOV_CUDA_SQRTM"] = "auto"
            check_close(res["auto"][0], res["tiled"][0], tol, f"sqrtm C={c} {dtype} on chip")
            check_close(res["auto"][1], res["tiled"][1], tol * 10, f"grad C={c} {dtype} on chip")
            assert torch.equal(res["auto"][1][1], torch.zeros_like(res["auto"][1][1]))
            if dtype == torch.float32:
                notes.append(f"C={c}:{'=' if torch.equal(res['auto'][0], res['tiled'][0]) else '~'}")
    return "forward bits on chip vs tiled: " + " ".join(notes)


def case_tf32(dev, quick):
    """The pipeline with the kernels' TF32 and 3xTF32 products (MPNCOV_CUDA_TF32) against
    float64 on the CPU; returns the relative errors."""
    if os.environ.get("MPNCOV_CUDA_PRODUCTS") == "cublas":
        return "skipped (cuBLAS products)"
    notes = []
    for c, m, n in [(70, 49, 3)] + ([] if quick else [(130, 196, 5)]):
        x = torch.randn(2, c, m, generator=gen(c), dtype=F64)
        g = torch.randn(2, c * (c + 1) // 2, generator=gen(m), dtype=F64)
        ref_out, ref_dx = pipeline(x, g, n)
        for mode, tol in (("on", 2e-2), ("3x", 5e-4)):
            os.environ["MPNCOV_CUDA_TF32"] = mode
            try:
                out, dx = pipeline(x.to(dev, torch.float32), g.to(dev, torch.float32), n)
            finally:
                os.environ["MPNCOV_CUDA_TF32"] = "auto"
            check_close(out, ref_out, tol, f"TF32 {mode} out C={c}")
            check_close(dx, ref_dx, tol * 10, f"TF32 {mode} grad C={c}")
            notes.append(f"C={c} {mode}: {rel(out, ref_out):.1e}/{rel(dx, ref_dx):.1e}")
    return "errors out/grad: " + "; ".join(notes)


def case_gram_space(dev, quick):
    """The pipeline in the Gram space (space="gram": the hand-written Gram kernels, or the
    batched ATen form with MPNCOV_CUDA_PRODUCTS=cublas) against the CPU's Gram space in
    float64, as tokens (channel_dim=-1, read without a copy) and channels first, with a
    zero-trace sample; iters 12 is long mode (float32 computed in float64)."""
    shapes = [(3, 37, 13, 5), (2, 9, 20, 1), (2, 70, 65, 3)]
    shapes += [] if quick else [(2, 256, 196, 5), (2, 64, 49, 12)]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32-exact cuBLAS for the tolerances
    try:
        for b, c, m, n in shapes:
            tokens = torch.randn(b, m, c, generator=gen(c + m), dtype=F64)
            tokens[-1] = 1.5  # constant features: zero output and gradient
            g = torch.randn(b, c * (c + 1) // 2, generator=gen(m), dtype=F64)
            for layout in ("tokens", "channels first"):
                # channels first: the same features as a contiguous (B, C, M)
                feats = tokens if layout == "tokens" else tokens.transpose(1, 2).contiguous()
                cdim = -1 if layout == "tokens" else 1
                ref_out, ref_dx = gram(feats, g, n, cdim)
                for dtype, tol in ((torch.float32, 5e-4), (F64, 1e-10)):
                    out, dx = gram(feats.to(dev, dtype), g.to(dev, dtype), n, cdim)
                    what = f"gram {layout} C={c} M={m} iters={n} {dtype}"
                    check_close(out, ref_out, tol, f"{what} out")
                    check_close(dx, ref_dx, tol * 10, f"{what} grad")
                    assert not out[-1].any() and not dx[-1].any(), "zero-trace sample not zero"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def gram(feats, g, iters, channel_dim):
    feats = feats.detach().requires_grad_()
    out = mpncov.isqrt_cov(feats, iters=iters, channel_dim=channel_dim, space="gram")
    (dx,) = torch.autograd.grad(out, feats, g)
    return out.detach(), dx


CASES = [case_odd_sizes, case_zero_trace, case_storage_offset, case_channels_last,
         case_expanded_grad, case_large_batch, case_long_mode, case_graph_replay,
         case_sqrtm_paths, case_tf32, case_gram_space]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available (use --dry-run to check the script)")
        return 2
    dev = "cpu" if args.dry_run else "cuda"
    paths = ["kernels"] if args.dry_run else ["kernels", "cublas"]
    failed = 0
    for path in paths:
        os.environ["MPNCOV_CUDA_PRODUCTS"] = path
        for case in CASES:
            start = time.time()
            try:
                note = case(dev, args.quick) or "ok"
            except Exception as exc:  # report every case
                failed += 1
                note = f"FAIL: {exc}"
                traceback.print_exc()
            print(f"{path:8s} {case.__name__[5:]:16s} {time.time() - start:6.1f} s  {note}",
                  flush=True)
    print(f"gpu_smoke: {failed} failed" if failed else "gpu_smoke: all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
