"""Build the mpncov extension.

The C++ CPU kernels are always built. CUDA kernels are added when torch sees CUDA or when
FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST picks the archs (default "8.0;9.0") and MAX_JOBS the
parallel compile jobs (both read by torch.utils.cpp_extension).

Install with `pip install --no-build-isolation .` so the build uses the torch already
installed (build isolation would download another torch and break the ABI).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _write_build_config(with_cuda, archs):
    # Read by `python -m mpncov.info`: what this build contains.
    path = os.path.join(ROOT, "mpncov", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"VERSION = {VERSION!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")
        f.write(f"BUILT_WITH_CUDA = {torch.version.cuda if with_cuda else None!r}\n")


def extensions():
    with_cuda = _use_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3"]
    if os.environ.get("MPNCOV_DEBUG", "0") == "1":
        cxx_flags = ["-O0", "-g"]
    define_macros = []
    link_args = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp its `omp parallel` would
        # be ignored and every batch loop would run on one thread. The soname libgomp.so.1
        # resolves to the runtime torch already loaded, so there is one thread pool.
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    archs = None
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        define_macros.append(("MPNCOV_WITH_CUDA", None))
        ext = CUDAExtension(
            "mpncov._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_args,
        )
    else:
        ext = CppExtension("mpncov._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args)
    _write_build_config(with_cuda, archs)
    return [ext]


setup(
    name="mpncov",
    version=VERSION,
    description="Fast, correct global covariance pooling (iSQRT-COV, GSoP) for PyTorch",
    packages=find_packages(include=["mpncov", "mpncov.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=[],
)
