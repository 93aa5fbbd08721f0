"""The mpncov functions written with plain, differentiable torch operations.

The kernels compute first derivatives analytically. Second and higher derivatives (a
gradient penalty with ``create_graph=True``, ``torch.autograd.gradgradcheck``,
``torch.func.grad`` of ``torch.func.grad``) differentiate these forms instead: they compute
the same functions as the kernels (SPEC sections 1-3, with the rules below), in the compute
dtype, with plain products, so that autograd can differentiate them to any order. They are
slower than the kernels and are only run for those higher derivatives.

Rules shared with the kernels (see ``mpncov.ops``):

* ``sqrtm`` is the iSQRT of the symmetric part ``(S + S^T) / 2`` of its input;
* ``tr(S) == 0`` gives a zero output and zero derivatives of every order;
* ``tr(S) < 0`` gives NaN output and NaN derivatives.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed in float32, float32 and float64 natively."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def covpool(x: Tensor) -> Tensor:
    """(B, C, M) -> (B, C, C): S = (1/M) Xc Xc^T, Xc = X minus its mean over M."""
    xc = x - x.mean(dim=-1, keepdim=True)
    return xc @ xc.mT / x.shape[-1]


def sqrtm(s: Tensor, iters: int) -> Tensor:
    """(B, C, C) -> (B, C, C): iSQRT with ``iters`` coupled Newton-Schulz steps."""
    s = 0.5 * (s + s.mT)
    c = s.shape[-1]
    eye = torch.eye(c, dtype=s.dtype, device=s.device)
    t = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    # A zero trace must give a zero output and zero (not 0 * inf = NaN) derivatives: the
    # branch that is not taken sees t = 1. A negative trace stays: sqrt(t) makes NaN.
    zero = t == 0
    t_safe = torch.where(zero, torch.ones_like(t), t)
    a = s / t_safe
    if iters == 1:
        y = a @ (1.5 * eye - 0.5 * a)
    else:
        tk = 1.5 * eye - 0.5 * a
        y, z = a @ tk, tk
        for _ in range(iters - 2):
            tk = 1.5 * eye - 0.5 * (z @ y)
            y, z = y @ tk, tk @ z
        y = y @ (1.5 * eye - 0.5 * (z @ y))
    return torch.where(zero, torch.zeros_like(y), y * t_safe.sqrt())


def triuvec(s: Tensor) -> Tensor:
    """(B, C, C) -> (B, C(C+1)/2): the row-major upper triangle with the diagonal."""
    c = s.shape[-1]
    rows, cols = torch.triu_indices(c, c, device=s.device)
    return s[..., rows, cols]


def isqrt_cov(x: Tensor, iters: int) -> Tensor:
    """(B, C, M) -> (B, C(C+1)/2): the pipeline triuvec(sqrtm(covpool(x)))."""
    return triuvec(sqrtm(covpool(x), iters))


def vjp_of_vjp(fn, x: Tensor, grad: Tensor, grad_of_result: Tensor, dtype=None):
    """Derivatives of the first-order backward ``r(x, grad) = J_fn(x)^T grad``.

    Returns ``(d x, d grad)``: the gradients of ``<grad_of_result, r(x, grad)>`` with
    respect to x and grad, computed in ``dtype`` (default: the compute dtype of x) and
    returned in the dtypes of x and grad. Built with ``torch.func``, so the results are
    themselves differentiable by an enclosing autograd graph (third and higher
    derivatives).
    """
    ct = dtype or compute_dtype(x.dtype)

    def first_order(x_, g_):
        return torch.func.vjp(fn, x_)[1](g_)[0]

    _, back = torch.func.vjp(first_order, x.to(ct), grad.to(ct))
    dx, dgrad = back(grad_of_result.to(ct))
    return dx.to(x.dtype), dgrad.to(grad.dtype)
