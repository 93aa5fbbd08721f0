"""Build the mpncov extension against the installed torch.

`pip install .` or `pip install -e .` (pyproject.toml's in-tree backend, build_backend/,
finds the torch of the Python that runs pip even inside pip's build isolation), or with
`--no-build-isolation`. torch is never downloaded by the build: it must be installed first.

The C++ CPU kernels are always built. The CUDA kernels are added when FORCE_CUDA=1, or when
torch sees a GPU and a CUDA toolkit is found (build_backend/mpncov_build/cuda_toolkit.py:
CUDA_HOME when valid, the toolkit of nvcc on PATH, /usr/local/cuda). TORCH_CUDA_ARCH_LIST
picks the archs (default "8.0;9.0+PTX": sm_80 and sm_90 code plus compute_90 PTX that newer
GPUs compile at load time), MAX_JOBS the parallel compile jobs (both read by
torch.utils.cpp_extension), MPNCOV_DEBUG=1 an -O0 -g build.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))

from mpncov_build import cuda_toolkit, torch_requirement  # noqa: E402

try:
    import torch
except ImportError:
    sys.exit(torch_requirement.missing_torch_message(sys.executable))
if not torch_requirement.is_supported(torch.__version__):
    sys.exit(torch_requirement.old_torch_message(sys.executable, torch.__version__))

VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _log(message):
    print(f"mpncov setup: {message}", file=sys.stderr)


def _cuda_toolkit():
    """Decide whether to build the CUDA kernels; return the toolkit's root or None.

    Sets CUDA_HOME to the toolkit found, before torch.utils.cpp_extension reads it.
    """
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if forced:
            sys.exit(f"mpncov setup: FORCE_CUDA=1, but torch {torch.__version__} ({torch.__file__}) "
                     "is a CPU-only build: install a CUDA build of torch to build the CUDA kernels")
        _log(f"CPU kernels only: torch {torch.__version__} is a CPU-only build")
        return None
    if not forced and not torch.cuda.is_available():
        _log("CPU kernels only: torch sees no GPU (FORCE_CUDA=1 builds the CUDA kernels anyway)")
        return None
    root, why = cuda_toolkit.find()
    if root is None:
        if forced:
            sys.exit(f"mpncov setup: FORCE_CUDA=1, but no CUDA toolkit was found ({why}); set "
                     "CUDA_HOME to a toolkit that has include/cuda_runtime.h")
        _log(f"CPU kernels only: no CUDA toolkit found ({why})")
        return None
    _log(f"CUDA toolkit {root} ({why})")
    os.environ["CUDA_HOME"] = root
    if "torch.utils.cpp_extension" in sys.modules:  # imported earlier: it read CUDA_HOME then
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = root
    return root


def _write_build_config(with_cuda, archs, toolkit):
    # Read by `python -m mpncov.info`: what this build contains.
    path = os.path.join(ROOT, "mpncov", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"VERSION = {VERSION!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"CUDA_TOOLKIT = {toolkit!r}\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")
        f.write(f"BUILT_WITH_CUDA = {torch.version.cuda if with_cuda else None!r}\n")


def extensions():
    toolkit = _cuda_toolkit()
    with_cuda = toolkit is not None
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

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
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        define_macros.append(("MPNCOV_WITH_CUDA", None))
        # A host function called from device code is an error, not a warning: the kernels
        # include no torch headers, so nothing outside mpncov's code can trigger it.
        nvcc_flags = ["-O3", "-Werror", "cross-execution-space-call"]
        ext = CUDAExtension(
            "mpncov._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    else:
        ext = CppExtension("mpncov._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args)
    _write_build_config(with_cuda, archs, toolkit)
    return [ext]


# First: it puts the toolkit found in CUDA_HOME, which torch.utils.cpp_extension reads on import.
EXT_MODULES = extensions()
from torch.utils.cpp_extension import BuildExtension  # noqa: E402

setup(
    name="mpncov",
    version=VERSION,
    description="Fast, correct global covariance pooling (iSQRT-COV, GSoP) for PyTorch",
    packages=find_packages(include=["mpncov", "mpncov.*"]),
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",  # as torch 2.11 and newer
    # The floor CI builds against; pip finds the installed torch satisfies it and downloads
    # none (the build has already compiled against that torch, see torch_requirement.py).
    install_requires=[f"torch>={torch_requirement.TORCH_FLOOR}"],
    extras_require={
        "test": ["pytest", "numpy"],
        "bench": ["matplotlib", "tqdm"],
        "train": ["tqdm"],
    },
    entry_points={"console_scripts": ["mpncov-bench = mpncov.benchmarks.cli:main"]},
)
