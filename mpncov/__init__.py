"""mpncov: fast and correct global second-order (covariance) pooling for PyTorch.

Operators (C++ CPU and CUDA kernels, autograd, torch.compile support):

* :func:`covpool` (B, C, H, W) or (B, C, M) -> (B, C, C) covariance
* :func:`sqrtm` iSQRT matrix square root (coupled Newton-Schulz, analytic backward)
* :func:`triuvec` (B, C, C) -> (B, C(C+1)/2) upper triangle
* :func:`isqrt_cov` the three in one call, with a faster backward

Layers live in :mod:`mpncov.nn`, networks in :mod:`mpncov.models`, a drop-in for code
written against the published ``MPNCOV.py`` in :mod:`mpncov.compat`.
"""
import importlib

from . import _extension

_extension.load()  # a clear ImportError when the extension is not built here or does not load

from .ops import covpool, cpu_buffer_bytes, isqrt_cov, release_cpu_buffers, sqrtm, triuvec  # noqa: E402

try:
    from ._build_config import VERSION as __version__
except ImportError:  # pragma: no cover - only when the build config is missing
    __version__ = "0.0.0+unknown"

__all__ = ["covpool", "sqrtm", "triuvec", "isqrt_cov", "release_cpu_buffers", "cpu_buffer_bytes",
           "nn", "models", "compat", "__version__"]

_SUBMODULES = ("nn", "models", "compat", "info")


def __getattr__(name):
    # Submodules load on first use, so `import mpncov` stays light.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpncov' has no attribute {name!r}")
