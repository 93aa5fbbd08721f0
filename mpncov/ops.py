"""The mpncov operators: public functions, fake kernels, autograd and the dtype policy.

The kernels are C++ (CPU) and CUDA, registered under the ``mpncov`` namespace by the
compiled extension ``mpncov._C`` (schemas in ``csrc/ops.cpp``). This module adds what
PyTorch needs around them:

* fake (meta) kernels, so ``torch.compile`` and ``torch.export`` can trace the ops;
* autograd, each forward linked to its own registered backward op;
* the dtype policy (also the autocast policy): float32 and float64 are computed natively;
  float16 and bfloat16 inputs are computed in float32 and the result is returned in the
  input dtype. Autocast passes these ops through unchanged (it neither up- nor down-casts
  their inputs), so under ``torch.autocast`` a half-precision activation is still
  covariance-pooled and square-rooted in float32.

Semantics are those of SPEC sections 1-3 (``docs/SPEC.md`` in the shared docs):

* ``covpool``: S = (1/M) Xc Xc^T, Xc = X minus its mean over the M positions.
* ``sqrtm``: iSQRT, N coupled Newton-Schulz steps on A = S / tr(S), then multiplied by
  sqrt(tr(S)); deliberately not the exact square root for small N.
* ``triuvec``: row-major upper triangle with the diagonal, (B, C(C+1)/2).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the kernels and registers the schemas)

__all__ = ["covpool", "sqrtm", "triuvec", "isqrt_cov", "release_cpu_buffers", "cpu_buffer_bytes",
           "OPS"]

#: The registered operator names (forward and backward).
OPS = (
    "covpool", "covpool_backward",
    "sqrtm", "sqrtm_backward",
    "triuvec", "triuvec_backward",
    "isqrt_cov", "isqrt_cov_backward",
)

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _saved_count(iters: int) -> int:
    # [Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N]
    return 3 * (iters - 1) + 1


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
    if iters < 1:
        raise ValueError(f"mpncov.{name}: iters must be >= 1, got {iters}")
    return int(iters)


def _as_bcm(x: Tensor, name: str) -> Tensor:
    _check_tensor(x, name, "x")
    if x.dim() == 4:
        return x.flatten(2)
    if x.dim() != 3:
        raise ValueError(
            f"mpncov.{name}: x must be (B, C, H, W) or (B, C, M), got shape {tuple(x.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"mpncov.{name}: x needs at least one position, got shape {tuple(x.shape)}")
    return x


def _check_square(s: Tensor, name: str) -> None:
    _check_tensor(s, name, "s")
    if s.dim() != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(
            f"mpncov.{name}: s must be a batch of square matrices (B, C, C), "
            f"got shape {tuple(s.shape)}")


# ----------------------------------------------------------------------- public API

def covpool(x: Tensor) -> Tensor:
    """Covariance pooling: (B, C, H, W) or (B, C, M) -> (B, C, C).

    ``S = (1/M) Xc Xc^T`` with ``Xc = X - mean over M`` (biased, divides by M). The
    backward is ``dX = (1/M)(G + G^T) Xc``; no M x M centring matrix is ever built.
    """
    return torch.ops.mpncov.covpool(_as_bcm(x, "covpool"))


def sqrtm(s: Tensor, iters: int = 5) -> Tensor:
    """iSQRT matrix square root of symmetric PSD (B, C, C) matrices.

    ``t = tr(S)``, ``A = S/t``, ``iters`` coupled Newton-Schulz steps give ``Y ~ A^(1/2)``,
    and the result is ``sqrt(t) * Y``. With 3 to 5 steps this is deliberately not the exact
    square root (SPEC section 2); with 20-30 steps it converges to it. The gradient is the
    exact gradient of this recurrence (any incoming gradient, symmetric or not). A zero
    matrix gives a zero result and a zero gradient.
    """
    iters = _check_iters(iters, "sqrtm")
    _check_square(s, "sqrtm")
    return torch.ops.mpncov.sqrtm(s, iters)[0]


def triuvec(s: Tensor) -> Tensor:
    """Upper triangle with the diagonal, row-major: (B, C, C) -> (B, C(C+1)/2)."""
    _check_square(s, "triuvec")
    return torch.ops.mpncov.triuvec(s)


def isqrt_cov(x: Tensor, iters: int = 5) -> Tensor:
    """The iSQRT-COV pipeline ``triuvec(sqrtm(covpool(x), iters))`` as one call.

    (B, C, H, W) or (B, C, M) -> (B, C(C+1)/2). Same values as the three ops in a row; its
    backward only computes the symmetric part of the square root's input gradient (all
    covpool's backward sees), which lets every product of the backward recurrence compute
    half of its output.
    """
    iters = _check_iters(iters, "isqrt_cov")
    return torch.ops.mpncov.isqrt_cov(_as_bcm(x, "isqrt_cov"), iters)[0]


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


# ---------------------------------------------------------------------- fake kernels

@torch.library.register_fake("mpncov::covpool")
def _covpool_fake(x):
    torch._check(x.dim() == 3, lambda: f"mpncov.covpool: x must be (B, C, M), got {x.shape}")
    b, c, _ = x.shape
    return x.new_empty((b, c, c))


@torch.library.register_fake("mpncov::covpool_backward")
def _covpool_backward_fake(grad, x):
    return x.new_empty(x.shape)


@torch.library.register_fake("mpncov::sqrtm")
def _sqrtm_fake(s, iters):
    torch._check(iters >= 1, lambda: f"mpncov.sqrtm: iters must be >= 1, got {iters}")
    b, c, _ = s.shape
    saved = s.new_empty((b, _saved_count(iters), c, c), dtype=_compute_dtype(s.dtype))
    return s.new_empty(s.shape), saved


@torch.library.register_fake("mpncov::sqrtm_backward")
def _sqrtm_backward_fake(grad, s, saved, iters, symmetric_grad):
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
    b, c, _ = x.shape
    saved = x.new_empty((b, _saved_count(iters), c, c), dtype=_compute_dtype(x.dtype))
    return x.new_empty((b, c * (c + 1) // 2)), x.new_empty((b, c, c)), saved


@torch.library.register_fake("mpncov::isqrt_cov_backward")
def _isqrt_cov_backward_fake(grad, x, cov, saved, iters):
    return x.new_empty(x.shape)


# -------------------------------------------------------------------------- autograd

def _covpool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _covpool_bwd(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.mpncov.covpool_backward(grad, x)


def _sqrtm_setup(ctx, inputs, output):
    s, iters = inputs
    ctx.iters = iters
    # `saved` is an implementation detail: no gradient flows into it, and none should be
    # materialised as a zero tensor of (B, 3N-2, C, C) for the backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s, output[1])


def _sqrtm_bwd(ctx, grad, _grad_saved):
    s, saved = ctx.saved_tensors
    if grad is None:
        return None, None
    return torch.ops.mpncov.sqrtm_backward(grad, s, saved, ctx.iters, False), None


def _triuvec_setup(ctx, inputs, output):
    ctx.n = inputs[0].shape[-1]


def _triuvec_bwd(ctx, grad):
    return torch.ops.mpncov.triuvec_backward(grad, ctx.n)


def _isqrt_cov_setup(ctx, inputs, output):
    x, iters = inputs
    ctx.iters = iters
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], output[2])


def _isqrt_cov_bwd(ctx, grad, grad_cov, _grad_saved):
    x, cov, saved = ctx.saved_tensors
    dx = None
    if grad is not None:
        dx = torch.ops.mpncov.isqrt_cov_backward(grad, x, cov, saved, ctx.iters)
    if grad_cov is not None:  # the covariance output was used too
        dc = torch.ops.mpncov.covpool_backward(grad_cov, x)
        dx = dc if dx is None else dx + dc
    return dx, None


torch.library.register_autograd("mpncov::covpool", _covpool_bwd, setup_context=_covpool_setup)
torch.library.register_autograd("mpncov::sqrtm", _sqrtm_bwd, setup_context=_sqrtm_setup)
torch.library.register_autograd("mpncov::triuvec", _triuvec_bwd, setup_context=_triuvec_setup)
torch.library.register_autograd("mpncov::isqrt_cov", _isqrt_cov_bwd,
                                setup_context=_isqrt_cov_setup)
