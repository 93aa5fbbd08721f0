"""Reference implementations of iSQRT-COV that the benchmarks compare mpncov against.

Every implementation is an object with four callables of the same signatures as the
package (SPEC sections 1-3):

    covpool(x)              x (B,C,H,W) or (B,C,M) -> (B,C,C)
    sqrtm(s, iters=5)       (B,C,C) symmetric PSD   -> (B,C,C)
    triuvec(s)              (B,C,C)                 -> (B, C(C+1)/2), row-major upper triangle
    pipeline(x, iters=5)    triuvec(sqrtm(covpool(x)))

Implementations (get them with `get_impl(name)`):

* "published": the algorithm as fast-MPN-COV's MPNCOV.py structures it, written from its
  description: covariance through a dense M x M centring matrix repeated over the batch,
  hand-written backwards (autograd.Function) that recompute Y Z and Z Y every step
  (10N - 12 products), the diagonal trace term added in a per-sample Python loop, an
  I3 = 3I tensor repeated over the batch, triuvec by index gather/scatter. The one
  deliberate difference: dA is NOT transposed at the end (the published bug), so its
  gradient is correct and comparable.
* "autograd": the same math with plain torch ops and autograd (no custom backward).
* "eigh": the exact square root by eigendecomposition (MPN-COV style), autograd through
  torch.linalg.eigh. `iters` is ignored. Gradients are NaN/inf-prone when eigenvalues
  repeat (rank-deficient covariance, e.g. M < C): benchmark it on full-rank inputs.
* "mpncov": the package itself; its pipeline picks the space by its cost model
  ("auto", mpncov/_space.py).
* "mpncov-cov", "mpncov-gram": the package's pipeline forced into the C x C covariance
  space (the path of every release before the Gram space) or the M x M Gram space, so the
  spaces and the automatic choice are timed side by side (pipeline only).
"""
from __future__ import annotations

import types

import torch

import mpncov

from .config import OPS

__all__ = ["IMPLS", "BASELINES", "VARIANTS", "COMPARED", "MPNCOV", "get_impl", "pipeline_space"]


def _as_bcm(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    if x.dim() != 3:
        raise ValueError(f"covpool expects (B,C,H,W) or (B,C,M), got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------
# "published": structure of fast-MPN-COV's MPNCOV.py (autograd.Functions, dense centring)
# ----------------------------------------------------------------------------------------
class _PublishedCovpool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp):
        x = _as_bcm(inp)
        B, C, M = x.shape
        # Dense centring matrix I_hat = (1/M)(I - (1/M) 1 1^T), one copy per sample.
        # (Built in x's dtype: the original builds it in float32 and casts, which only
        # costs float64 comparisons precision.)
        i_hat = (-1.0 / M / M) * torch.ones(M, M, device=x.device, dtype=x.dtype) \
            + (1.0 / M) * torch.eye(M, M, device=x.device, dtype=x.dtype)
        i_hat = i_hat.view(1, M, M).repeat(B, 1, 1)
        y = x.bmm(i_hat).bmm(x.transpose(1, 2))
        ctx.in_shape = inp.shape
        ctx.save_for_backward(x, i_hat)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, i_hat = ctx.saved_tensors
        g = grad_output + grad_output.transpose(1, 2)
        grad_input = g.bmm(x).bmm(i_hat)
        return grad_input.reshape(ctx.in_shape)


class _PublishedSqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, iter_n):
        x = inp
        B, dim = x.shape[0], x.shape[1]
        dtype = x.dtype
        i3 = 3.0 * torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(B, 1, 1).to(dtype)
        norm_a = (1.0 / 3.0) * x.mul(i3).sum(dim=1).sum(dim=1)          # trace
        a = x.div(norm_a.view(B, 1, 1).expand_as(x))
        y_it = torch.zeros(B, iter_n, dim, dim, device=x.device, dtype=dtype)
        z_it = torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(B, iter_n, 1, 1).to(dtype)
        if iter_n < 2:
            zy = 0.5 * (i3 - a)
            yzy = a.bmm(zy)
        else:
            zy = 0.5 * (i3 - a)
            y_it[:, 0, :, :] = a.bmm(zy)
            z_it[:, 0, :, :] = zy
            for i in range(1, iter_n - 1):
                zy = 0.5 * (i3 - z_it[:, i - 1, :, :].bmm(y_it[:, i - 1, :, :]))
                y_it[:, i, :, :] = y_it[:, i - 1, :, :].bmm(zy)
                z_it[:, i, :, :] = zy.bmm(z_it[:, i - 1, :, :])
            yzy = 0.5 * y_it[:, iter_n - 2, :, :].bmm(
                i3 - z_it[:, iter_n - 2, :, :].bmm(y_it[:, iter_n - 2, :, :]))
        y = yzy * torch.sqrt(norm_a).view(B, 1, 1).expand_as(x)
        ctx.save_for_backward(inp, a, yzy, norm_a, y_it, z_it)
        ctx.iter_n = iter_n
        return y

    @staticmethod
    def backward(ctx, grad_output):
        inp, a, zy_out, norm_a, y_it, z_it = ctx.saved_tensors
        iter_n = ctx.iter_n
        x = inp
        B, dim = x.shape[0], x.shape[1]
        dtype = x.dtype
        der_post_com = grad_output * torch.sqrt(norm_a).view(B, 1, 1).expand_as(x)
        der_post_com_aux = (grad_output * zy_out).sum(dim=1).sum(dim=1).div(2 * torch.sqrt(norm_a))
        i3 = 3.0 * torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(B, 1, 1).to(dtype)
        if iter_n < 2:
            der_ns = 0.5 * (der_post_com.bmm(i3 - a) - a.bmm(der_post_com))
        else:
            y_l, z_l = y_it[:, iter_n - 2, :, :], z_it[:, iter_n - 2, :, :]
            dl_dy = 0.5 * (der_post_com.bmm(i3 - y_l.bmm(z_l)) - z_l.bmm(y_l).bmm(der_post_com))
            dl_dz = -0.5 * y_l.bmm(der_post_com).bmm(y_l)
            for i in range(iter_n - 3, -1, -1):
                y_i, z_i = y_it[:, i, :, :], z_it[:, i, :, :]
                yz = i3 - y_i.bmm(z_i)
                zy = z_i.bmm(y_i)
                dl_dy_ = 0.5 * (dl_dy.bmm(yz) - z_i.bmm(dl_dz).bmm(z_i) - zy.bmm(dl_dy))
                dl_dz_ = 0.5 * (yz.bmm(dl_dz) - y_i.bmm(dl_dy).bmm(y_i) - dl_dz.bmm(zy))
                dl_dy, dl_dz = dl_dy_, dl_dz_
            der_ns = 0.5 * (dl_dy.bmm(i3 - a) - dl_dz - a.bmm(dl_dy))
        # (The published code transposes der_ns here: a bug, deliberately left out.)
        grad_input = der_ns.div(norm_a.view(B, 1, 1).expand_as(x))
        grad_aux = der_ns.mul(x).sum(dim=1).sum(dim=1)
        for i in range(B):   # per-sample Python loop, as published: part of what is measured
            grad_input[i, :, :] += (der_post_com_aux[i] - grad_aux[i] / (norm_a[i] * norm_a[i])) \
                * torch.ones(dim, device=x.device, dtype=dtype).diag()
        return grad_input, None


_TRIU_INDEX_CACHE: dict = {}


def _triu_index(dim: int, device) -> torch.Tensor:
    key = (dim, str(device))
    idx = _TRIU_INDEX_CACHE.get(key)
    if idx is None:
        mask = torch.ones(dim, dim, device=device).triu().reshape(dim * dim)
        idx = mask.nonzero().reshape(-1)
        _TRIU_INDEX_CACHE[key] = idx
    return idx


class _PublishedTriuvec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp):
        B, dim = inp.shape[0], inp.shape[1]
        x = inp.reshape(B, dim * dim)
        index = _triu_index(dim, inp.device)      # precomputed (cached) gather index
        y = x[:, index]
        ctx.save_for_backward(index)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (index,) = ctx.saved_tensors
        dim = ctx.dim
        B = grad_output.shape[0]
        grad_input = torch.zeros(B, dim * dim, device=grad_output.device, dtype=grad_output.dtype)
        grad_input[:, index] = grad_output
        return grad_input.reshape(B, dim, dim)


def _pub_covpool(x):
    return _PublishedCovpool.apply(x)


def _pub_sqrtm(s, iters=5):
    return _PublishedSqrtm.apply(s, int(iters))


def _pub_triuvec(s):
    return _PublishedTriuvec.apply(s)


def _pub_pipeline(x, iters=5):
    return _pub_triuvec(_pub_sqrtm(_pub_covpool(x), iters))


# ----------------------------------------------------------------------------------------
# "autograd": plain torch ops, autograd derives every backward
# ----------------------------------------------------------------------------------------
def _ag_covpool(x):
    x = _as_bcm(x)
    xc = x - x.mean(dim=2, keepdim=True)
    return xc.bmm(xc.transpose(1, 2)) / x.shape[2]


def _ag_sqrtm(s, iters=5):
    n = int(iters)
    if n < 1:
        raise ValueError("iters must be >= 1")
    B, C = s.shape[0], s.shape[1]
    eye = torch.eye(C, device=s.device, dtype=s.dtype).expand(B, C, C)
    t = s.diagonal(dim1=1, dim2=2).sum(dim=1).view(B, 1, 1)
    a = s / t
    if n == 1:
        y = 0.5 * a.bmm(3.0 * eye - a)
    else:
        t0 = 0.5 * (3.0 * eye - a)
        y = a.bmm(t0)
        z = t0
        for _ in range(n - 2):
            tk = 0.5 * (3.0 * eye - z.bmm(y))
            y, z = y.bmm(tk), tk.bmm(z)
        y = 0.5 * y.bmm(3.0 * eye - z.bmm(y))
    return y * t.sqrt()


def _triu_indices(dim: int, device):
    key = ("rc", dim, str(device))
    idx = _TRIU_INDEX_CACHE.get(key)
    if idx is None:
        idx = torch.triu_indices(dim, dim, device=device)
        _TRIU_INDEX_CACHE[key] = idx
    return idx


def _ag_triuvec(s):
    r, c = _triu_indices(s.shape[-1], s.device)
    return s[:, r, c]


def _ag_pipeline(x, iters=5):
    return _ag_triuvec(_ag_sqrtm(_ag_covpool(x), iters))


# ----------------------------------------------------------------------------------------
# "eigh": exact square root by eigendecomposition, autograd through eigh
# ----------------------------------------------------------------------------------------
def _eigh_sqrtm(s, iters=None):
    # iters is ignored: this is the exact root. Eigenvalues are clamped at 0 before sqrt.
    evals, evecs = torch.linalg.eigh(s)
    root = evals.clamp(min=0).sqrt()
    return (evecs * root.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def _eigh_pipeline(x, iters=None):
    return _ag_triuvec(_eigh_sqrtm(_ag_covpool(x)))


# ----------------------------------------------------------------------------------------
# the implementations
# ----------------------------------------------------------------------------------------
MPNCOV = types.SimpleNamespace(
    name="mpncov",
    covpool=mpncov.covpool,
    sqrtm=lambda s, iters=5: mpncov.sqrtm(s, iters=int(iters)),
    triuvec=mpncov.triuvec,
    pipeline=lambda x, iters=5: mpncov.isqrt_cov(x, iters=int(iters)),
    ops=OPS,
)

# mpncov's pipeline with its space forced (the automatic choice is "mpncov").
VARIANTS = {
    f"mpncov-{space}": types.SimpleNamespace(
        name=f"mpncov-{space}", space=space, ops=("pipeline",),
        pipeline=lambda x, iters=5, forced=space: mpncov.isqrt_cov(x, iters=int(iters),
                                                                    space=forced))
    for space in ("cov", "gram")
}

# The baselines, in the order of the speed-up columns ("x vs published", ...).
BASELINES = {
    "published": types.SimpleNamespace(
        name="published", covpool=_pub_covpool, sqrtm=_pub_sqrtm, triuvec=_pub_triuvec,
        pipeline=_pub_pipeline, ops=OPS),
    "autograd": types.SimpleNamespace(
        name="autograd", covpool=_ag_covpool, sqrtm=_ag_sqrtm, triuvec=_ag_triuvec,
        pipeline=_ag_pipeline, ops=OPS),
    # eigh only differs from "autograd" in sqrtm, so it is benchmarked for sqrtm/pipeline.
    "eigh": types.SimpleNamespace(
        name="eigh", covpool=_ag_covpool, sqrtm=_eigh_sqrtm, triuvec=_ag_triuvec,
        pipeline=_eigh_pipeline, ops=("sqrtm", "pipeline")),
}

IMPLS = ("mpncov", *VARIANTS, *BASELINES)
# Everything mpncov's speed-up is reported against, in column order.
COMPARED = (*VARIANTS, *BASELINES)


def get_impl(name: str):
    """The implementation called `name` (one of IMPLS)."""
    if name == "mpncov":
        return MPNCOV
    try:
        return VARIANTS.get(name) or BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}") from None


def pipeline_space(impl_name: str, shape: dict, device) -> str | None:
    """The space ("cov" or "gram") mpncov's pipeline runs in for `impl_name` at `shape`
    (C, M, N) on `device`; None for the other implementations."""
    if impl_name in VARIANTS:
        return VARIANTS[impl_name].space
    if impl_name != "mpncov":
        return None
    return mpncov._space.auto_space(shape["C"], shape["M"], shape["N"], torch.device(device).type)
