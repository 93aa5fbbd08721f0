"""Autograd of the mpncov operators.

Every forward op has its backward as an op of its own (``*_backward``, analytic C++/CUDA
kernels), and every backward op is differentiable again, so derivatives of any order are
exact and never silently zero:

* ``covpool_backward`` and ``triuvec_backward`` have closed-form derivatives (below);
* ``sqrtm_backward``, ``isqrt_cov_backward`` and ``isqrt_cov_gram_backward`` are
  differentiated through the plain-torch forms of ``mpncov._differentiable`` (only run
  when a second derivative is asked for); the Gram-space pipeline computes the same
  function as the covariance-space one, so both use the same form.

Under ``torch.func`` (``grad``, ``vjp``, ``jacrev``, ``vmap``), forward-mode AD and
``torch.compile`` the public functions (``mpncov.ops``) go through the
``torch.autograd.Function`` classes here, which define ``setup_context`` and
``generate_vmap_rule``; the vmap rules of the ops themselves are in ``mpncov._vmap``. Under
plain autograd they call the raw ops ``torch.ops.mpncov.*``, which get the same backward
formulas through ``torch.library.register_autograd`` and cost less Python per call. Forward-mode AD (``torch.func.jvp``, ``jacfwd``,
``hessian``, ``torch.autograd.forward_ad``) is not supported: ``mpncov.ops`` turns torch's
error into one that says so.
"""
from __future__ import annotations

import torch
from torch.autograd import Function

from . import _C  # noqa: F401  (registers the ops)
from . import _differentiable as D
from ._meta import sqrtm_compute_dtype

OPS = torch.ops.mpncov


def _call(function, *args):
    """``function.apply(*args)`` where the call is itself recorded for a higher derivative
    (grad mode on: ``create_graph=True``, ``torch.func``), else the op it wraps directly. A
    backward runs with grad mode off unless a graph of it is asked for, and an
    ``autograd.Function`` costs tens of microseconds a call in Python, as much as the kernel
    of a small op."""
    if torch.is_grad_enabled():
        return function.apply(*args)
    return function.forward(*args)


# ------------------------------------------------ derivatives of the backward ops

def covpool_backward_backward(grad, x, grad_dx):
    """Derivatives of ``dX = (1/M) (G + G^T) Xc`` given ``U = dL/d(dX)``:

        d/dG = (1/M) (Uc Xc^T + Xc Uc^T),    d/dX = (1/M) (G + G^T) Uc = covpool_backward(G, U)

    with Uc, Xc centred over the M positions (centring X is linear, so its derivative
    centres U)."""
    ct = D.compute_dtype(x.dtype)
    u, xx = grad_dx.to(ct), x.to(ct)
    uc = u - u.mean(dim=-1, keepdim=True)
    xc = xx - xx.mean(dim=-1, keepdim=True)
    cross = uc @ xc.mT / x.shape[-1]
    return (cross + cross.mT).to(grad.dtype), CovpoolBackward.apply(grad, grad_dx)


def triuvec_backward_backward(grad_s):
    """triuvec_backward is linear (a scatter): its derivative is the gather triuvec."""
    return Triuvec.apply(grad_s)


def sqrtm_backward_backward(grad, s, iters, grad_ds):
    """Returns (d grad, d s) of ``<grad_ds, sqrtm_backward(grad, s)>``."""
    ds, dgrad = D.vjp_of_vjp(lambda z: D.sqrtm(z, iters), s, grad, grad_ds,
                             dtype=sqrtm_compute_dtype(s.dtype, iters))
    return dgrad, ds


def isqrt_cov_backward_backward(grad, x, iters, grad_dx):
    """Returns (d grad, d x) of ``<grad_dx, isqrt_cov_backward(grad, x)>``."""
    dx, dgrad = D.vjp_of_vjp(lambda z: D.isqrt_cov(z, iters), x, grad, grad_dx,
                             dtype=sqrtm_compute_dtype(x.dtype, iters))
    return dgrad, dx


# ------------------------------------------------------------ autograd.Function

class Covpool(Function):
    """covpool(x), x: (B, C, M)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return OPS.covpool(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _call(CovpoolBackward, grad, x)


class CovpoolBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x):
        return OPS.covpool_backward(grad, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_dx):
        grad, x = ctx.saved_tensors
        return covpool_backward_backward(grad, x, grad_dx)


class Sqrtm(Function):
    """sqrtm(s, iters) -> (out, saved); saved (the iterates) is not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(s, iters):
        return OPS.sqrtm(s, iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_saved):
        if grad is None:
            return None, None
        s, saved = ctx.saved_tensors
        return _call(SqrtmBackward, grad, s, saved, ctx.iters), None


class SqrtmBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, s, saved, iters):
        return OPS.sqrtm_backward(grad, s, saved, iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[3]
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, grad_ds):
        grad, s = ctx.saved_tensors
        return (*sqrtm_backward_backward(grad, s, ctx.iters, grad_ds), None, None)


class Triuvec(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(s):
        return OPS.triuvec(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[0].shape[-1]

    @staticmethod
    def backward(ctx, grad):
        return _call(TriuvecBackward, grad, ctx.n)


class TriuvecBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, n):
        return OPS.triuvec_backward(grad, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_s):
        return triuvec_backward_backward(grad_s), None


class IsqrtCov(Function):
    """isqrt_cov(x, iters) -> (vec, cov, saved); only vec is differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, iters):
        return OPS.isqrt_cov(x, iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[1]
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], output[1], output[2])

    @staticmethod
    def backward(ctx, grad, _grad_cov, _grad_saved):
        if grad is None:
            return None, None
        x, cov, saved = ctx.saved_tensors
        return _call(IsqrtCovBackward, grad, x, cov, saved, ctx.iters), None


class IsqrtCovBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x, cov, saved, iters):
        return OPS.isqrt_cov_backward(grad, x, cov, saved, iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[4]
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, grad_dx):
        grad, x = ctx.saved_tensors
        return (*isqrt_cov_backward_backward(grad, x, ctx.iters, grad_dx), None, None, None)


class IsqrtCovGram(Function):
    """isqrt_cov_gram(x, iters, recompute_t) -> (vec, saved), the pipeline in the Gram
    space; only vec is differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, iters, recompute_t):
        return OPS.isqrt_cov_gram(x, iters, recompute_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_saved):
        if grad is None:
            return None, None, None
        x, saved = ctx.saved_tensors
        return _call(IsqrtCovGramBackward, grad, x, saved, ctx.iters), None, None


class IsqrtCovGramBackward(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x, saved, iters):
        return OPS.isqrt_cov_gram_backward(grad, x, saved, iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.iters = inputs[3]
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, grad_dx):
        grad, x = ctx.saved_tensors
        return (*isqrt_cov_backward_backward(grad, x, ctx.iters, grad_dx), None, None)


# ------------------------------------------- the same formulas for the raw ops
# The raw ops torch.ops.mpncov.* (and the public functions under plain autograd, see
# mpncov.ops._apply) get the backward and setup_context of the Functions above. Tensors go
# through ctx.save_for_backward: a tensor output kept as a ctx attribute would make a
# reference cycle and keep sqrtm's saved iterates alive until garbage collection.

def _isqrt_cov_bwd(ctx, grad, grad_cov, _grad_saved):
    x, cov, saved = ctx.saved_tensors
    dx = None
    if grad is not None:
        dx = _call(IsqrtCovBackward, grad, x, cov, saved, ctx.iters)
    if grad_cov is not None:  # the raw op's covariance output (compute dtype) was used too
        dc = _call(CovpoolBackward, grad_cov, x.to(cov.dtype)).to(x.dtype)
        dx = dc if dx is None else dx + dc
    return dx, None


def _isqrt_cov_setup(ctx, inputs, output):
    # cov (output 1) stays differentiable for raw-op users; saved (output 2) is not.
    ctx.iters = inputs[1]
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], output[1], output[2])


def _register(op, backward, setup_context):
    torch.library.register_autograd("mpncov::" + op, backward, setup_context=setup_context)


for _op, _function in (("covpool", Covpool), ("covpool_backward", CovpoolBackward),
                       ("sqrtm", Sqrtm), ("sqrtm_backward", SqrtmBackward),
                       ("triuvec", Triuvec), ("triuvec_backward", TriuvecBackward),
                       ("isqrt_cov_backward", IsqrtCovBackward),
                       ("isqrt_cov_gram", IsqrtCovGram),
                       ("isqrt_cov_gram_backward", IsqrtCovGramBackward)):
    _register(_op, _function.backward, _function.setup_context)
_register("isqrt_cov", _isqrt_cov_bwd, _isqrt_cov_setup)
