"""Where the time of one training step of an implementation goes, kernel by kernel.

    python -m mpncov.benchmarks.profile_kernels [--impl mpncov] [--shape B=128,C=256,M=196,N=5]
                                                [--device cuda] [--dtype fp32] [--out FILE.json]

Runs the pipeline forward+backward (the implementations of mpncov.benchmarks.baselines, as
the benchmark does) a few times under torch.profiler and prints, per device kernel (per
operator on the CPU): calls and time per step, share of the step, and for the product
kernels of mpncov's CUDA backend the achieved TFLOP/s of the FLOP model
(mpncov.benchmarks.flops) against the device's FP32 peak (table there, or --peak-tflops).
The product kernels are the ones whose name contains "product_kernel" or "covpool"
(covpool_kernel, covpool_backward_kernel).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import baselines
from .config import DTYPES, SHAPE_DEFAULTS, parse_shapes
from .flops import flops as flop_model, gpu_peak
from .sweep import make_input

PRODUCT_KERNELS = ("product_kernel", "covpool_kernel", "covpool_backward_kernel")


def profile(impl_name, s, device, dtype_tag="fp32", steps=5, warmup=3):
    impl = baselines.get_impl(impl_name)
    x = make_input("pipeline", s, device, seed=0).requires_grad_(True)
    autocast = DTYPES[dtype_tag]

    def step():
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            y = impl.pipeline(x, iters=s["N"])
        y.float().sum().backward()
        x.grad = None

    for _ in range(warmup):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if device.type == "cuda":
            t_us = getattr(ev, "device_time_total", None)
            if t_us is None:
                t_us = ev.cuda_time_total
            # Device kernels only: operators carry their kernels' time too.
            if t_us <= 0 or getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
        else:
            t_us = ev.self_cpu_time_total
            if t_us <= 0:
                continue
        rows.append({"name": ev.key, "calls_per_step": ev.count / steps,
                     "ms_per_step": t_us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_step"] / total if total else 0.0
    return rows, total


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpncov.benchmarks.profile_kernels",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="mpncov", choices=baselines.IMPLS)
    p.add_argument("--shape", default="B=128,C=256,M=196,N=5")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None, help="write the rows and totals as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        s = {**SHAPE_DEFAULTS, **parse_shapes(args.shape)[0]}
    except ValueError as e:
        p.error(f"--shape: {e}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    rows, total = profile(args.impl, s, device, args.dtype, steps=args.steps)
    flops = sum(flop_model("pipeline", s))
    prod_ms = sum(r["ms_per_step"] for r in rows if any(k in r["name"] for k in PRODUCT_KERNELS))
    peak, peak_src = gpu_peak(device, args.dtype, args.peak_tflops)
    what = "device kernel" if device.type == "cuda" else "operator (self CPU time)"
    print(f"{args.impl} pipeline fwd+bwd, {s}, {args.dtype}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  {what}")
    for r in rows[:args.top]:
        print(f"{r['ms_per_step']:9.3f} {100 * r['share']:5.1f}% {r['calls_per_step']:6.1f}  "
              f"{r['name'][:110]}")
    print(f"{total:9.3f} total ms per step ({len(rows)} kinds)")
    summary = {"impl": args.impl, "shape": s, "dtype": args.dtype, "device": str(device),
               "total_ms": total, "flops_model": flops, "rows": rows}
    if prod_ms > 0:
        tflops = flops / (prod_ms * 1e-3) / 1e12
        summary.update(product_ms=prod_ms, product_tflops=tflops)
        line = (f"product kernels: {prod_ms:.3f} ms/step = {100 * prod_ms / total:.1f}% of the "
                f"step, {tflops:.2f} TFLOP/s by the FLOP model")
        if peak:
            summary.update(peak_tflops=peak, peak_source=peak_src, product_frac_peak=tflops / peak)
            line += f" = {100 * tflops / peak:.1f}% of {peak} ({peak_src})"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
