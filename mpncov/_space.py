"""Which space the iSQRT-COV pipeline runs in: the C x C covariance or the M x M Gram matrix.

Both compute the same function (SPEC section 8): every Newton-Schulz iterate is a
polynomial in A = Xc Xc^T / (M t) and Y_N = A Z_N, so the recurrence can run on
G = Xc^T Xc / (M t) (M positions) and be mapped back with two products. Which is cheaper
depends on C, M and the number of iterations N, not on M < C alone: the Gram space pays
about 4 C M^2 multiply-adds more to map back and forth, and saves 9 (N-1) (C^3 - M^3) / 2
in the recurrence, so with N = 1 (no recurrence products in the Gram space, but also only
three in the covariance space) it wins only below M = 0.6 C, with N = 5 up to M = 0.93 C.

The cost model counts the multiply-adds of forward + backward per sample, as the CPU
kernels do them (csrc/cpu/sqrtm_cpu.cpp, covpool_cpu.cpp, isqrt_cov_gram_cpu.cpp):

* covariance space: covariance C^2 M (half: symmetric result); 3N-3 products of C x C in
  the recurrence (N = 1: one) and 6N-6 in its derivative (N = 1: two), all half;
  covpool's backward C^2 M (full).
* Gram space: G = W^T W M^2 C (half); 3N-3 and 6N-6 products of M x M (N = 1: none), all
  half; P = W R C M^2, out = P W^T C^2 M (half); backward E W C^2 M, H = W^T E W M^2 C
  (half), dX = E W R + W D 2 C M^2.

"Half" is the fraction of an n x n product that a symmetric result multiplies out (its
block upper triangle in row blocks of 32, from n = 48; below that the whole product).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)

SPACES = ("auto", "cov", "gram")


def symmetric_fraction(n: int) -> float:
    """Fraction of an n x n product's multiply-adds that a symmetric result computes: the
    block upper triangle in row blocks of 32 from n = 48 (csrc/cpu/matrix_product.cpp)."""
    if n < 48:
        return 1.0
    done = sum((min(r0 + 32, n) - r0) * (n - r0) for r0 in range(0, n, 32))
    return done / (n * n)


def cost(space: str, C: int, M: int, N: int) -> float:
    """Multiply-adds of one sample's forward + backward in `space` ("cov" or "gram")."""
    if space == "cov":
        products = 3 if N == 1 else 9 * (N - 1)
        return C * C * M * (1 + symmetric_fraction(C)) + products * C ** 3 * symmetric_fraction(C)
    if space == "gram":
        products = 0 if N == 1 else 9 * (N - 1)
        h_m, h_c = symmetric_fraction(M), symmetric_fraction(C)
        return (M * M * C * 2 * h_m + products * M ** 3 * h_m + 3 * C * M * M
                + C * C * M * (1 + h_c))
    raise ValueError(f"unknown space {space!r}")


def choose(C: int, M: int, N: int) -> str:
    """The cheaper space by :func:`cost` ("gram" only when strictly cheaper)."""
    return "gram" if cost("gram", C, M, N) < cost("cov", C, M, N) else "cov"


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def has_gram_kernel(device_type: str) -> bool:
    """Whether the Gram-space op has a kernel for tensors on `device_type`."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mpncov::isqrt_cov_gram", key)


# Looked up once: a plain set is what torch.compile traces through without a graph break.
_GRAM_DEVICES = frozenset(t for t in _DISPATCH_KEYS if has_gram_kernel(t))


def auto_space(C: int, M: int, N: int, device_type: str) -> str:
    """space="auto": the cheaper space by :func:`cost` among those with a kernel for
    `device_type` (the covariance space has kernels everywhere)."""
    return choose(C, M, N) if device_type in _GRAM_DEVICES else "cov"


def resolve(space, x: torch.Tensor, iters: int, name: str) -> str:
    """"cov" or "gram" for features x (B, C, M) and `space` as the user gave it."""
    if space not in SPACES:
        raise ValueError(f"mpncov.{name}: space must be one of {SPACES}, got {space!r}")
    if space == "gram" and x.device.type not in _GRAM_DEVICES:
        raise NotImplementedError(
            f"mpncov.{name}: space='gram' has no kernel for {x.device.type} tensors yet "
            "(CPU only); use space='cov' or space='auto'")
    if space != "auto":
        return space
    return auto_space(x.shape[1], x.shape[2], iters, x.device.type)
