"""Which space the iSQRT-COV pipeline runs in: the C x C covariance or the M x M Gram matrix.

Both compute the same function (SPEC section 8): every Newton-Schulz iterate is a
polynomial in A = Xc Xc^T / (M t) and Y_N = A Z_N, so the recurrence can run on
G = Xc^T Xc / (M t) (M positions) and be mapped back with two products. Which is cheaper
depends on C, M and the number of iterations N, not on M < C alone: the Gram space pays
about 4 C M^2 multiply-adds more to map back and forth, and saves 9 (N-1) (C^3 - M^3) / 2
in the recurrence, so with N = 1 (no recurrence products in the Gram space, but also only
three in the covariance space) it wins only below about M = 0.7 C, with N = 3 to 5 up to
about M = 0.9 C (by the model below, for C = 64 to 512).

The cost model counts what the CPU kernels do in forward + backward per sample
(csrc/cpu/sqrtm_cpu.cpp, covpool_cpu.cpp, isqrt_cov_gram_cpu.cpp), in multiply-adds:

* covariance space: covariance C^2 M (half: symmetric result); 3N-3 products of C x C in
  the recurrence (N = 1: one) and 6N-6 in its derivative (N = 1: two), all half;
  covpool's backward C^2 M (full).
* Gram space: G = W^T W M^2 C (half); 3N-3 and 6N-6 products of M x M (N = 1: none), all
  half; P = W R C M^2, out = P W^T C^2 M (half); backward E W C^2 M, H = W^T E W M^2 C
  (half), dX = E W R + W D 2 C M^2.

"Half" is the fraction of an n x n product that a symmetric result multiplies out (its
block upper triangle in row blocks of 32, from n = 48; below that the whole product, in
one call). To the multiply-adds it adds, in the same unit, BLAS_CALL per BLAS call (a
half product of n >= 48 is ceil(n / 32) calls per term) and PASS per matrix element of
the elementwise passes (about (3 + 3N) n^2 over the iterates' matrices, 2 C^2 for the
Gram space's result and incoming gradient). Both constants were fitted to the measured
fwd+bwd CPU time of both spaces at 117 shapes (C 64 to 384, M 0.25 C to 1.25 C, N 1 to 5;
float32, B = 8, one thread, AMD EPYC Zen 4 with MKL, torch 2.13.0; ``python -m
mpncov.benchmarks.spaces --fit`` repeats the measurement and the fit): with them the
predicted ratio of the two times is off by 13 % (rms of the log ratio) instead of 30 %
for the multiply-adds alone, and where the model picks the slower space (10 of the 117,
all within 18 % of the break-even point) the loss is at most 1.18x; far from it (the
ResNet-50 head: C = 256, M = 196, N = 5, 1.7x; ViT tokens) the choice is clear.

Having a kernel and being chosen by ``space="auto"`` are separate: the Gram space has CPU
and CUDA kernels (``space="gram"`` runs on both), but the model above describes CPU times,
so ``"auto"`` picks by it only on the CPU (:data:`COST_MODEL_DEVICES`) and keeps the
covariance space on CUDA until GPU times have been measured.
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


#: Fitted fixed cost of one BLAS call, and of one matrix element of an elementwise pass,
#: in multiply-adds (see the module docstring).
BLAS_CALL = 80000
PASS = 40


def _calls(n: int) -> int:
    """BLAS calls of one term of a product with a symmetric n x n result."""
    return 1 if n < 48 else -(-n // 32)


def cost(space: str, C: int, M: int, N: int, blas_call: float = BLAS_CALL,
         elementwise: float = PASS) -> float:
    """Modelled cost of one sample's forward + backward in `space` ("cov" or "gram"), in
    multiply-adds (see the module docstring; blas_call = elementwise = 0 gives the plain
    multiply-add count)."""
    h_c, h_m = symmetric_fraction(C), symmetric_fraction(M)
    if space == "cov":
        products = 3 if N == 1 else 9 * (N - 1)
        madds = C * C * M * (1 + h_c) + products * C ** 3 * h_c
        calls = _calls(C) + 1 + products * _calls(C)
        passes = (3 + 3 * N) * C * C
    elif space == "gram":
        products = 0 if N == 1 else 9 * (N - 1)
        madds = (M * M * C * 2 * h_m + products * M ** 3 * h_m + 3 * C * M * M
                 + C * C * M * (1 + h_c))
        calls = (2 + products) * _calls(M) + 4 + _calls(C)
        passes = 2 * C * C + (3 + 3 * N) * M * M
    else:
        raise ValueError(f"unknown space {space!r}")
    return madds + blas_call * calls + elementwise * passes


#: The Gram space keeps fewer iterates where recomputing them costs at most this fraction of
#: the modelled forward + backward.
RECOMPUTE_BUDGET = 0.05


def recompute_t(C: int, M: int, N: int) -> bool:
    """Whether the Gram-space backward computes T_k = 1.5 I - 0.5 Z_k Y_k again instead of
    keeping them (N-1 of its 3N-2 saved M x M matrices): when those N-1 half products cost
    at most RECOMPUTE_BUDGET of the modelled forward + backward, i.e. where C is large next
    to M and the C x M and C x C products dominate (measured, CPU time of fwd+bwd, B = 32,
    N = 5: +6 % at C = 256, M = 196, where it is not used, and within the noise at M = 49)."""
    if N < 2:
        return False
    extra = (N - 1) * (M ** 3 * symmetric_fraction(M) + BLAS_CALL * _calls(M) + PASS * M * M)
    return extra <= RECOMPUTE_BUDGET * cost("gram", C, M, N)


def choose(C: int, M: int, N: int, **constants) -> str:
    """The cheaper space by :func:`cost` ("gram" only when strictly cheaper)."""
    return "gram" if cost("gram", C, M, N, **constants) < cost("cov", C, M, N, **constants) \
        else "cov"


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def has_gram_kernel(device_type: str) -> bool:
    """Whether the Gram-space op has a kernel for tensors on `device_type` (space="gram"
    runs there)."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mpncov::isqrt_cov_gram", key)


# Looked up once: a plain set is what torch.compile traces through without a graph break.
_GRAM_DEVICES = frozenset(t for t in _DISPATCH_KEYS if has_gram_kernel(t))

#: Devices whose times the cost model was fitted to, where space="auto" may pick the Gram
#: space. Having a kernel is not enough: the CUDA kernels of both spaces
#: (csrc/cuda/gram_kernel.cu, covpool and sqrtm) have other costs than the CPU's, and until
#: a GPU run has measured where the Gram space pays there, "auto" keeps the covariance space
#: on CUDA ("gram" still runs the Gram space).
COST_MODEL_DEVICES = frozenset({"cpu", "meta"})


_PLANS: dict = {}


def plan(C: int, M: int, N: int) -> tuple:
    """(choose(C, M, N), recompute_t(C, M, N)), computed once per sizes: the cost model is
    pure Python and costs tens of microseconds a call, as much as the dispatch it sits
    next to. Under torch.compile it is traced as it is (no cache)."""
    if torch.compiler.is_compiling():
        return choose(C, M, N), recompute_t(C, M, N)
    hit = _PLANS.get((C, M, N))
    if hit is None:
        hit = _PLANS[(C, M, N)] = (choose(C, M, N), recompute_t(C, M, N))
    return hit


def auto_space(C: int, M: int, N: int, device_type: str) -> str:
    """space="auto": the cheaper space by :func:`cost` where the model holds (CPU) and the
    Gram space has a kernel; elsewhere the covariance space (kernels everywhere)."""
    if device_type in _GRAM_DEVICES and device_type in COST_MODEL_DEVICES:
        return plan(C, M, N)[0]
    return "cov"


def resolve(space, x: torch.Tensor, iters: int, name: str) -> str:
    """"cov" or "gram" for features x (B, C, M) and `space` as the user gave it."""
    if space not in SPACES:
        raise ValueError(f"mpncov.{name}: space must be one of {SPACES}, got {space!r}")
    if space == "gram" and x.device.type not in _GRAM_DEVICES:
        raise NotImplementedError(
            f"mpncov.{name}: space='gram' has no kernel for {x.device.type} tensors "
            f"(it has for: {', '.join(sorted(_GRAM_DEVICES)) or 'none'}); use space='cov' "
            "or space='auto'")
    if space != "auto":
        return space
    return auto_space(x.shape[1], x.shape[2], iters, x.device.type)
