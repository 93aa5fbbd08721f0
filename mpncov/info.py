"""Build and runtime facts: ``python -m mpncov.info [--check-cuda]``.

Prints the versions of Python, torch, CUDA and the compiler torch was built with, whether
the CUDA kernels of mpncov are built and for which archs, and which mpncov operators are
registered with kernels for which backends. ``--check-cuda`` then exits non-zero unless the
build has its CUDA kernels and every operator (``mpncov.ops.OPS``) has a CUDA kernel
registered (needs no GPU: registration happens when the extension loads).
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def build_config() -> dict:
    """What setup.py recorded about this build (empty if the build left no record)."""
    try:
        from . import _build_config as cfg
    except ImportError:
        return {}
    return {k: getattr(cfg, k) for k in dir(cfg) if k.isupper()}


def registered_ops() -> dict:
    """Registered mpncov operators and the dispatch keys that have a kernel for each."""
    import mpncov.ops as ops  # noqa: F401  (registers everything)

    keys = ("CPU", "CUDA", "Meta", "Autograd", "CompositeExplicitAutograd")
    result = {}
    for name in ops.OPS:
        qualified = f"mpncov::{name}"
        result[name] = [k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k)]
    return result


def cpu_products() -> str:
    """How the CPU kernels multiply matrices: straight to torch's BLAS, or through ATen."""
    import mpncov.ops  # noqa: F401  (loads the extension)
    return torch.ops.mpncov._cpu_products()


def cpu_transposes() -> str:
    """How the CPU kernels mirror symmetric results: AVX2 register transposes or scalar."""
    import mpncov.ops  # noqa: F401  (loads the extension)
    kind = torch.ops.mpncov._cpu_transpose_kernel()
    if kind == "avx2":
        return "AVX2 (8x8 float / 4x4 double tiles in registers)"
    return "scalar (no AVX2, or MPNCOV_CPU_SIMD=0)"


def _compiler() -> str:
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- GCC") or line.startswith("- clang") or "Compiler" in line:
            return line.lstrip("- ")
    return "unknown"


def report() -> str:
    cfg = build_config()
    lines = [
        f"mpncov        {cfg.get('VERSION', 'unknown')}",
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"torch         {torch.__version__} (compiled with {_compiler()})",
        f"torch CUDA    {torch.version.cuda or 'none (CPU build)'}",
        f"GPU           {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        f"built against torch {cfg.get('BUILT_WITH_TORCH', 'unknown')}",
        f"CUDA kernels  {_cuda_build(cfg)}",
        f"CPU threads   {torch.get_num_threads()}",
        f"CPU products  {cpu_products()}",
        f"CPU mirror    {cpu_transposes()}",
        "operators (backend kernels):",
    ]
    for name, keys in registered_ops().items():
        lines.append(f"  mpncov::{name:<20} {', '.join(keys) or 'NONE'}")
    return "\n".join(lines)


def _cuda_build(cfg: dict) -> str:
    if not cfg.get("WITH_CUDA"):
        return "not built (CPU only)"
    return (f"built, archs {cfg.get('CUDA_ARCHS')}, CUDA {cfg.get('BUILT_WITH_CUDA')}, "
            f"toolkit {cfg.get('CUDA_TOOLKIT', 'unknown')}")


def missing_cuda_kernels() -> list:
    """Problems that keep this build from running every operator on CUDA (empty: none).

    An operator runs on CUDA through its own CUDA kernel or through a composite kernel
    (CompositeExplicitAutograd: isqrt_cov calls the other operators), which fills the CUDA
    slot of the dispatch table; the other operators are checked for their own kernels.
    """
    problems = []
    if not build_config().get("WITH_CUDA"):
        problems.append("the build has no CUDA kernels (build config WITH_CUDA is not True)")
    for name, keys in registered_ops().items():
        if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"mpncov::{name}", "CUDA"):
            problems.append(f"mpncov::{name} has no kernel for CUDA (has: {', '.join(keys) or 'none'})")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpncov.info", description=__doc__.splitlines()[0])
    parser.add_argument("--check-cuda", action="store_true",
                        help="exit 1 unless every operator has a CUDA kernel registered")
    args = parser.parse_args(argv)
    print(report())
    if args.check_cuda:
        problems = missing_cuda_kernels()
        for problem in problems:
            print(f"CUDA check FAILED: {problem}")
        if problems:
            return 1
        print(f"CUDA check passed: all {len(registered_ops())} operators have a kernel for CUDA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
