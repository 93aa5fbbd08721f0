"""Build the CPU emulation of mpncov's CUDA kernels into a shared library (tests only).

The torch-free sources of csrc/cuda (.cu and .cuh) are copied with each launch `kernel<<<grid, block,
shared, stream>>>(args)` rewritten to `::emu::launch(grid, block, shared, stream, kernel,
args)`, and compiled with g++ against the fake CUDA headers in include/ (see
include/emu_runtime.h for what is emulated and what is not).
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:, ]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(source: str) -> str:
    """`k<T><<<g, b, s, st>>>(` -> `::emu::launch(g, b, s, st, k<T>, ` (every launch has args)."""
    return _LAUNCH.sub(lambda m: f"::emu::launch({m.group(2)}, {m.group(1)}, ", source)


def build(out_dir: str | os.PathLike, cxx: str | None = None) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    units = []
    # csrc/cuda includes "../limits.h": keep that relative layout.
    shutil.copy(CUDA_SRC.parent / "limits.h", out / "limits.h")
    for f in sorted(CUDA_SRC.iterdir()):
        if f.suffix == ".cuh":  # a header may launch kernels too (square_products.cuh)
            (src / f.name).write_text(rewrite_launches(f.read_text()))
        elif f.suffix == ".h":
            shutil.copy(f, src / f.name)
        elif f.suffix == ".cu":
            dst = src / (f.stem + ".cpp")
            dst.write_text(rewrite_launches(f.read_text()))
            units.append(dst)
    if not units:
        raise RuntimeError(f"no .cu sources in {CUDA_SRC}")
    lib = out / "libmpncov_cuda_emu.so"
    cmd = [cxx or os.environ.get("CXX", "g++"), "-std=c++17", "-O2", "-fPIC", "-shared",
           "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", f"-I{HERE / 'include'}", f"-I{src}",
           str(HERE / "emu_runtime.cpp"), str(HERE / "emu_api.cpp"), *map(str, units),
           "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{res.stderr}")
    return lib


def load_aten_path(out_dir: str | os.PathLike):
    """The cuBLAS product path of csrc/cuda (plain ATen) built for the CPU as a Python
    module (aten_path.cpp); the emulated CUDA headers stand in for the CUDA toolkit."""
    from torch.utils import cpp_extension
    return cpp_extension.load(
        name="mpncov_aten_path", build_directory=str(out_dir), verbose=False,
        sources=[str(CUDA_SRC / "aten_products_binding.cpp"), str(HERE / "aten_path.cpp")],
        extra_include_paths=[str(CUDA_SRC), str(HERE / "include")],
        extra_cflags=["-O1"])


def load(out_dir: str | os.PathLike) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(out_dir)))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    sig = {
        "covpool_forward": [ptr, ptr, i64, i64, i64, cint],
        "covpool_backward": [ptr, ptr, ptr, i64, i64, i64, cint],
        "sqrtm_forward": [ptr, ptr, ptr, i64, i64, i64, cint, cint],
        "sqrtm_backward": [ptr, ptr, ptr, ptr, i64, i64, i64, cint, cint],
        "triuvec_forward": [ptr, ptr, i64, i64],
        "triuvec_backward": [ptr, ptr, i64, i64],
        "isqrt_cov_gram_forward": [ptr, cint, ptr, ptr, i64, i64, i64, i64, cint, cint],
        "isqrt_cov_gram_backward": [ptr, ptr, cint, ptr, ptr, i64, i64, i64, i64, cint, cint],
    }
    lib.emu_launches.argtypes = []
    lib.emu_launches.restype = ctypes.c_longlong
    lib.emu_set_shared_optin.argtypes = [cint]
    lib.emu_set_shared_optin.restype = cint
    for name, args in sig.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"emu_{name}_{suffix}")
            fn.argtypes = args
            fn.restype = cint
    return lib
