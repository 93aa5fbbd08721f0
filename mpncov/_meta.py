"""Fake (meta) kernels of the mpncov operators: output shapes and dtypes without data, so
that ``torch.compile`` and ``torch.export`` can trace the ops. They follow the schemas of
``csrc/ops.cpp`` and the dtype policy of ``mpncov.ops``."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas)
from ._differentiable import compute_dtype

#: iters accepted by sqrtm and isqrt_cov (csrc/limits.h, kMaxIters).
MAX_ITERS = 100
#: Beyond this many iterations sqrtm computes float32 input in float64 (csrc/limits.h).
MAX_MIRRORED_ITERS = 8


def sqrtm_compute_dtype(dtype: torch.dtype, iters: int) -> torch.dtype:
    """dtype of sqrtm's computation and saved iterates."""
    ct = compute_dtype(dtype)
    return torch.float64 if ct == torch.float32 and iters > MAX_MIRRORED_ITERS else ct


def saved_count(iters: int) -> int:
    """Matrices per sample in the saved iterates: sqrtm's (C x C)
    [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N], and isqrt_cov_gram's (M x M)
    [G, Y_1..Y_{N-1}, Z_2..Z_{N-1}, T_1..T_{N-1}, Z_N]."""
    return 3 * (iters - 1) + 1


def features_like(x):
    """A tensor like the gradient the kernels return for features x (B, C, M), on every
    device: in x's layout when x is token-major (a transposed view of a contiguous
    (B, M, C) tensor, not itself contiguous), otherwise contiguous (csrc/cpu/features.h;
    on CUDA the Gram-space kernels, csrc/gram_aten.cpp and covpool's cuBLAS path for such
    x)."""
    if not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        b, c, m = x.shape
        return x.new_empty((b, m, c)).transpose(1, 2)
    return x.new_empty(x.shape)


def _check_iters(iters, op):
    torch._check_value(1 <= iters <= MAX_ITERS,
                       lambda: f"mpncov.{op}: iters must be between 1 and {MAX_ITERS}, got {iters}")


@torch.library.register_fake("mpncov::covpool")
def _covpool_fake(x):
    torch._check(x.dim() == 3, lambda: f"mpncov.covpool: x must be (B, C, M), got {x.shape}")
    b, c, _ = x.shape
    return x.new_empty((b, c, c))


@torch.library.register_fake("mpncov::covpool_backward")
def _covpool_backward_fake(grad, x):
    return features_like(x)


@torch.library.register_fake("mpncov::sqrtm")
def _sqrtm_fake(s, iters):
    _check_iters(iters, "sqrtm")
    b, c, _ = s.shape
    saved = s.new_empty((b, saved_count(iters), c, c), dtype=sqrtm_compute_dtype(s.dtype, iters))
    return s.new_empty(s.shape), saved


@torch.library.register_fake("mpncov::sqrtm_backward")
def _sqrtm_backward_fake(grad, s, saved, iters):
    _check_iters(iters, "sqrtm_backward")
    return s.new_empty(s.shape)


@torch.library.register_fake("mpncov::triuvec")
def _triuvec_fake(s):
    b, c, _ = s.shape
    return s.new_empty((b, c * (c + 1) // 2))


@torch.library.register_fake("mpncov::triuvec_backward")
def _triuvec_backward_fake(grad, n):
    return grad.new_empty((grad.shape[0], n, n))


@torch.library.register_fake("mpncov::isqrt_cov")
def _isqrt_cov_fake(x, iters):
    _check_iters(iters, "isqrt_cov")
    b, c, _ = x.shape
    ct = compute_dtype(x.dtype)
    saved = x.new_empty((b, saved_count(iters), c, c), dtype=sqrtm_compute_dtype(ct, iters))
    return x.new_empty((b, c * (c + 1) // 2)), x.new_empty((b, c, c), dtype=ct), saved


@torch.library.register_fake("mpncov::isqrt_cov_backward")
def _isqrt_cov_backward_fake(grad, x, cov, saved, iters):
    _check_iters(iters, "isqrt_cov_backward")
    return features_like(x)


def gram_saved_count(iters: int, recompute_t: bool) -> int:
    """Matrices per sample in isqrt_cov_gram's saved iterates: 3N-2 with the T_k, 2N-1
    without (recompute_t)."""
    return 2 * iters - 1 if recompute_t else saved_count(iters)


@torch.library.register_fake("mpncov::isqrt_cov_gram")
def _isqrt_cov_gram_fake(x, iters, recompute_t=False):
    _check_iters(iters, "isqrt_cov_gram")
    b, c, m = x.shape
    saved = x.new_empty((b, gram_saved_count(iters, recompute_t), m, m),
                        dtype=sqrtm_compute_dtype(x.dtype, iters))
    return x.new_empty((b, c * (c + 1) // 2)), saved


@torch.library.register_fake("mpncov::isqrt_cov_gram_backward")
def _isqrt_cov_gram_backward_fake(grad, x, saved, iters):
    _check_iters(iters, "isqrt_cov_gram_backward")
    return features_like(x)
