"""The mpncov operators: public functions, fake kernels, autograd and the dtype policy.

The kernels are C++ (CPU) and CUDA, registered under the ``mpncov`` namespace by the
compiled extension ``mpncov._C`` (schemas in ``csrc/ops.cpp``). This module adds what
PyTorch needs around them:

* fake (meta) kernels, so ``torch.compile`` and ``torch.export`` can trace the ops
  (``mpncov._meta``);
* autograd, each forward linked to its own registered backward op, and every backward
  op differentiable again (``mpncov._autograd``), with vmap rules (``mpncov._vmap``) for
  ``torch.func``;
* the dtype policy (also the autocast policy): float32 and float64 are computed natively;
  float16 and bfloat16 inputs are computed in float32 and the result is returned in the
  input dtype. Autocast passes these ops through unchanged (it neither up- nor down-casts
  their inputs), so under ``torch.autocast`` a half-precision activation is still
  covariance-pooled and square-rooted in float32.

Semantics are those of SPEC sections 1-3 (``docs/SPEC.md`` in the shared docs):

* ``covpool``: S = (1/M) Xc Xc^T, Xc = X minus its mean over the M positions.
* ``sqrtm``: iSQRT, N coupled Newton-Schulz steps on A = sym(S) / tr(S), then multiplied
  by sqrt(tr(S)); deliberately not the exact square root for small N.
* ``triuvec``: row-major upper triangle with the diagonal, (B, C(C+1)/2).
* ``isqrt_cov``: the three in a row, in the C x C covariance space or the M x M Gram space
  (SPEC section 8; ``mpncov._space`` picks the cheaper one).

Features come channels first, (B, C, H, W) or (B, C, M), or as tokens, (B, N, C) or
(B, H, W, C), with ``channel_dim=-1``; tokens are passed to the kernels as a transposed
view, which the CPU kernels and the CUDA Gram-space kernel read as it is (no transposed
copy).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad

from . import _autograd, _meta, _space, _vmap  # noqa: F401  (kernels, fakes, autograd, vmap)
from ._meta import MAX_ITERS

__all__ = ["covpool", "sqrtm", "triuvec", "isqrt_cov", "release_cpu_buffers", "cpu_buffer_bytes",
           "OPS", "MAX_ITERS"]

#: The registered operator names (forward and backward).
OPS = (
    "covpool", "covpool_backward",
    "sqrtm", "sqrtm_backward",
    "triuvec", "triuvec_backward",
    "isqrt_cov", "isqrt_cov_backward",
    "isqrt_cov_gram", "isqrt_cov_gram_backward",
)

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- checks

def _check_tensor(x, name: str, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"mpncov.{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(
            f"mpncov.{name}: {what} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_iters(iters, name: str) -> int:
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
        raise TypeError(f"mpncov.{name}: iters must be an int, got {type(iters).__name__}")
    if not 1 <= iters <= MAX_ITERS:
        raise ValueError(f"mpncov.{name}: iters must be between 1 and {MAX_ITERS}, got {iters}")
    return int(iters)


def _as_bcm(x: Tensor, name: str, channel_dim=1) -> Tensor:
    """x as (B, C, M) features: channels first (channel_dim=1) as they are, (B, C, H, W)
    flattened; tokens (channel_dim=-1: (B, N, C), or (B, H, W, C)) as a transposed view,
    which the kernels read without a copy."""
    _check_tensor(x, name, "x")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral):
        raise TypeError(f"mpncov.{name}: channel_dim must be an int, got "
                        f"{type(channel_dim).__name__}")
    if x.dim() not in (3, 4):
        layout = "(B, C, H, W) or (B, C, M)" if channel_dim == 1 else "(B, N, C) or (B, H, W, C)"
        raise ValueError(f"mpncov.{name}: x must be {layout}, got shape {tuple(x.shape)}")
    if channel_dim == 1:
        x = x.flatten(2)
    elif channel_dim in (-1, x.dim() - 1):
        x = x.flatten(1, -2).transpose(1, 2)
    else:
        raise ValueError(f"mpncov.{name}: channel_dim must be 1 (channels first: (B, C, H, W), "
                         f"(B, C, M)) or -1 (tokens: (B, N, C), (B, H, W, C)), got {channel_dim}")
    if x.shape[2] < 1:
        raise ValueError(f"mpncov.{name}: x needs at least one position, got shape {tuple(x.shape)}")
    return x


def _check_square(s: Tensor, name: str) -> None:
    _check_tensor(s, name, "s")
    if s.dim() != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(
            f"mpncov.{name}: s must be a batch of square matrices (B, C, C), "
            f"got shape {tuple(s.shape)}")


def _plain(args) -> bool:
    """Whether this call is seen by plain autograd only (or nothing): no torch.func
    transform, no forward-mode AD level, no torch.compile trace. The raw op then runs as it
    is, with the same backward formulas registered on it (torch.library.register_autograd,
    mpncov/_autograd.py), instead of through the autograd.Function that torch.func needs,
    whose Python machinery costs tens of microseconds a call (as much as the kernel of a
    small op)."""
    if torch.compiler.is_compiling() or getattr(forward_ad, "_current_level", -1) >= 0:
        return False
    return not any(isinstance(a, Tensor) and is_functorch_wrapped_tensor(a) for a in args)


def _apply(function, name: str, *args):
    """function.apply(*args), with torch's error for forward-mode AD made specific; the op
    itself where only plain autograd sees the call (_plain)."""
    if _plain(args):
        return function.forward(*args)
    try:
        return function.apply(*args)
    except NotImplementedError as e:
        if "forward mode AD" not in str(e):
            raise
        raise NotImplementedError(
            f"mpncov.{name} does not support forward-mode automatic differentiation "
            "(torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad); use reverse mode: "
            "backward(), torch.autograd.grad, torch.func.grad, vjp or jacrev") from e


# ----------------------------------------------------------------------- public API

def covpool(x: Tensor, *, channel_dim: int = 1) -> Tensor:
    """Covariance pooling: (B, C, H, W) or (B, C, M) -> (B, C, C).

    ``S = (1/M) Xc Xc^T`` with ``Xc = X - mean over M`` (biased, divides by M). The
    backward is ``dX = (1/M)(G + G^T) Xc``; no M x M centring matrix is ever built.
    Differentiable to any order.

    ``channel_dim=-1`` takes tokens, (B, N, C) (N positions, e.g. vision-transformer
    tokens) or (B, H, W, C): the covariance is over the C channels, exactly as for
    (B, C, N). The CPU kernels read that layout as it is (on CUDA cuBLAS does, on the
    transposed view), and its gradient comes back in it.
    """
    return _apply(_autograd.Covpool, "covpool", _as_bcm(x, "covpool", channel_dim))


def sqrtm(s: Tensor, iters: int = 5) -> Tensor:
    """iSQRT matrix square root of (B, C, C) symmetric positive semi-definite matrices.

    ``t = tr(S)``, ``A = sym(S) / t`` with ``sym(S) = (S + S^T) / 2``, ``iters`` (1 to
    ``MAX_ITERS``) coupled Newton-Schulz steps give ``Y ~ A^(1/2)``, and the result is
    ``sqrt(t) * Y``. With 3 to 5 steps this is deliberately not the exact square root (SPEC
    section 2); with 20-30 steps it converges to it.

    The function is defined on the symmetric part of ``s``: a covariance is symmetric and
    is used as it is; for an input that is not exactly symmetric (rounding, or misuse) the
    result is the same for every C and every code path. The gradient is the exact gradient
    of this function for any incoming gradient (so it is always symmetric), and it is
    differentiable again (double backward).

    Degenerate input, per sample and with no synchronisation: ``tr(S) == 0`` (a zero
    matrix) gives a zero result and zero gradients; ``tr(S) < 0`` (an indefinite matrix,
    outside the contract) gives NaN result and NaN gradient, like ``sqrt(t)``; a tiny
    positive trace (float32 below 1e-38, float64 denormals) gives finite results. Other
    samples of the batch are not affected.
    """
    iters = _check_iters(iters, "sqrtm")
    _check_square(s, "sqrtm")
    return _apply(_autograd.Sqrtm, "sqrtm", s, iters)[0]


def triuvec(s: Tensor) -> Tensor:
    """Upper triangle with the diagonal, row-major: (B, C, C) -> (B, C(C+1)/2)."""
    _check_square(s, "triuvec")
    return _apply(_autograd.Triuvec, "triuvec", s)


def isqrt_cov(x: Tensor, iters: int = 5, *, channel_dim: int = 1, space: str = "auto") -> Tensor:
    """The iSQRT-COV pipeline ``triuvec(sqrtm(covpool(x), iters))`` as one call.

    (B, C, H, W) or (B, C, M) -> (B, C(C+1)/2); with ``channel_dim=-1`` tokens (B, N, C)
    or (B, H, W, C), as in :func:`covpool`. Same values as the three ops in a row
    (float16 and bfloat16 input is computed in float32 throughout and only the result is
    cast back); its backward only computes the symmetric part of the square root's input
    gradient (all covpool's backward sees), which lets every product of the backward
    recurrence compute half of its output. Differentiable to any order (gradient
    penalties). Constant features give a zero result and zero gradients.

    ``space`` says where the Newton-Schulz recurrence runs; both give the same function
    (SPEC section 8): ``"cov"`` on the C x C covariance, ``"gram"`` on the M x M Gram
    matrix ``Xc^T Xc`` (M = positions), mapped back with two products, and ``"auto"``
    (default) on the CPU the one with fewer product-times by the cost model of
    ``mpncov._space`` (usually the Gram space when M is clearly below C); that model was
    fitted to CPU times, so on CUDA (where both spaces have kernels) ``"auto"`` runs the
    covariance space until GPU times say where the Gram space pays. The backward keeps 3N-2
    matrices of C x C per sample in the covariance space and 3N-2 of M x M in the Gram
    space, 2N-1 where recomputing the other N-1 costs little (C much larger than M).
    """
    iters = _check_iters(iters, "isqrt_cov")
    x = _as_bcm(x, "isqrt_cov", channel_dim)
    if _space.resolve(space, x, iters, "isqrt_cov") == "gram":
        recompute_t = _space.plan(x.shape[1], x.shape[2], iters)[1]
        return _apply(_autograd.IsqrtCovGram, "isqrt_cov", x, iters, recompute_t)[0]
    return _apply(_autograd.IsqrtCov, "isqrt_cov", x, iters)[0]


def release_cpu_buffers() -> None:
    """Free the CPU work buffers mpncov keeps between calls.

    The CPU ``sqrtm`` (and ``isqrt_cov``) keep the buffer of the iterates saved for the
    backward (3N-2 matrices of C x C per sample, e.g. 116 MB at B=32, C=256, N=5) for the
    next call once the autograd graph that used it is gone: a fresh buffer of that size
    costs a page fault and a page clear per page on every call. At most two such buffers
    are kept. This frees those not in use; ``MPNCOV_CPU_BUFFER_CACHE=0`` in the
    environment turns the reuse off. CUDA memory is managed by PyTorch's caching allocator
    (``torch.cuda.empty_cache()``).
    """
    torch.ops.mpncov._cpu_release_buffers()


def cpu_buffer_bytes() -> int:
    """Bytes of CPU work buffers mpncov holds for reuse (in use or not); see
    :func:`release_cpu_buffers`."""
    return int(torch.ops.mpncov._cpu_buffer_bytes())
