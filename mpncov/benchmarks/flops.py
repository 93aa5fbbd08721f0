"""The FLOP model behind the effective TFLOP/s columns, and the GPU peaks they are compared to.

Effective TFLOP/s = a fixed count of the products the algorithm needs divided by the
measured time. The same numerator is used for every implementation, so the ratio of two
TFLOP/s values is their speed ratio; an implementation doing extra work (the published
dense centring matrix, its 10N-12 backward products) gets no credit for it.

FLOP model, per sample, d = C, one d x d product = 2 d^3 flops (SPEC section 7):
  covpool   fwd 2 d^2 M                  bwd 2 d^2 M           ((G+G^T) Xc)
  sqrtm     fwd (3N-3) products (N>=2; 1 for N=1)
            bwd (6N-6) products (N>=2; 2 for N=1): the count of mpncov's backward
            (csrc/cpu/sqrtm_cpu.cpp: last step 4, each middle step 6 via the shared
            dT = Yk dY + dZ Zk, first step 2), equal to plain autograd's count (SPEC
            section 7); the published backward does 10N-12. (mpncov computes only the
            upper triangle of symmetric products; that saving is not counted.)
  triuvec   0 (memory-bound; no TFLOP/s reported)
  pipeline  covpool + sqrtm

Fraction of peak uses the GPU's FP32 (non-tensor-core) peak for fp32 rows and its dense
FP16/BF16 tensor-core peak for autocast rows, from the table below, or --peak-tflops for
all rows. (mpncov computes in float32 even under autocast, by design, so its autocast
rows are still FP32 work.)
"""
from __future__ import annotations

import torch

# Stored in results.json with every run.
SUMMARY = ("mpncov/benchmarks/flops.py: covpool 2d^2M fwd and bwd; sqrtm (3N-3) fwd and "
           "(6N-6) bwd d x d products of 2d^3 flops; per sample")

# (substring of the device name, FP32 non-tensor TFLOP/s, dense FP16/BF16 tensor TFLOP/s).
# First match wins, so more specific names come first. Vendor datasheet numbers.
GPU_PEAKS = (
    ("H100 PCIe", 51.0, 756.0),
    ("H100 NVL", 60.0, 835.0),
    ("GH200", 67.0, 989.0),
    ("H200", 67.0, 989.0),
    ("H100", 67.0, 989.0),      # SXM
    ("H800", 67.0, 989.0),
    ("A100", 19.5, 312.0),
    ("A800", 19.5, 312.0),
    ("L40S", 91.6, 362.0),
    ("L40", 90.5, 181.0),
    ("L4", 30.3, 121.0),
    ("A10", 31.2, 125.0),
    ("A6000", 38.7, 155.0),
    ("V100", 15.7, 125.0),
    ("T4", 8.1, 65.0),
    ("RTX 4090", 82.6, 165.0),
    ("RTX 3090", 35.6, 71.0),
)


def flops(op: str, s: dict):
    """(forward, backward) flops of the FLOP model, whole batch."""
    B, d = s["B"], s["C"]
    prod = 2.0 * d ** 3
    cov = 2.0 * d * d * s.get("M", 0)
    n = s.get("N", 0)
    sq_f = prod * (1 if n == 1 else 3 * n - 3)
    sq_b = prod * (2 if n == 1 else 6 * n - 6)
    f, b = {
        "covpool": (cov, cov),
        "sqrtm": (sq_f, sq_b),
        "triuvec": (0.0, 0.0),
        "pipeline": (cov + sq_f, cov + sq_b),
    }[op]
    return B * f, B * b


def gpu_peak(device: torch.device, dtype_tag: str, override=None):
    """(peak TFLOP/s, where it comes from) for rows of `dtype_tag`; (None, None) if unknown."""
    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for sub, fp32, lowp in GPU_PEAKS:
        if sub.lower() in name.lower():
            if dtype_tag == "fp32":
                return fp32, f"{sub} FP32 (table)"
            return lowp, f"{sub} dense FP16/BF16 tensor (table)"
    return None, None


def add_flop_rates(row: dict, s: dict, device: torch.device, peak_override=None) -> None:
    """Add flops_*, *_tflops and (when a peak is known) peak_tflops/fwdbwd_frac_peak to a
    timed row of configuration (row['op'], s)."""
    f_fl, b_fl = flops(row["op"], s)
    row["flops_fwd"], row["flops_bwd"] = f_fl, b_fl
    if f_fl > 0:
        for k, fl in (("fwd", f_fl), ("bwd", b_fl), ("fwdbwd", f_fl + b_fl)):
            row[f"{k}_tflops"] = fl / (row[k]["median_ms"] * 1e-3) / 1e12
        peak_t, src = gpu_peak(device, row["dtype"], peak_override)
        if peak_t:
            row["peak_tflops"], row["peak_source"] = peak_t, src
            row["fwdbwd_frac_peak"] = row["fwdbwd_tflops"] / peak_t
