"""Derivatives beyond the first (double backward, gradient penalties), torch.func
transforms, vmap, and the clear error for forward-mode AD (mpncov/_autograd.py,
mpncov/_vmap.py)."""
import pytest
import torch

import mpncov
from reference import covpool_ref, isqrt_cov_ref, spd, sqrtm_ref, triuvec_ref

F64 = torch.float64


def _x(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


# ----------------------------------------------------------------- double backward

def test_gradgradcheck_covpool(device):
    x = _x(2, 4, 7).to(device).requires_grad_()
    assert torch.autograd.gradgradcheck(mpncov.covpool, (x,))


def test_gradgradcheck_triuvec(device):
    s = _x(2, 4, 4).to(device).requires_grad_()
    assert torch.autograd.gradgradcheck(mpncov.triuvec, (s,))


@pytest.mark.parametrize("iters", [1, 3, 12])
def test_gradgradcheck_sqrtm(iters, device):
    s = (spd(2, 4) + 0.02 * _x(2, 4, 4, seed=1)).to(device).requires_grad_()  # not symmetric
    assert torch.autograd.gradgradcheck(lambda t: mpncov.sqrtm(t, iters), (s,))


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_gradgradcheck_pipeline(iters, device):
    x = _x(2, 4, 9).to(device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: mpncov.isqrt_cov(t, iters), (x,))


def test_gradgradcheck_raw_backward_ops():
    # A graph built from the raw ops (torch.ops.mpncov.*) is differentiable twice too.
    x = _x(2, 4, 6).requires_grad_()

    def pipeline(t):
        cov = torch.ops.mpncov.covpool(t)
        root, _ = torch.ops.mpncov.sqrtm(cov, 3)
        return torch.ops.mpncov.triuvec(root)

    assert torch.autograd.gradgradcheck(pipeline, (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.mpncov.isqrt_cov(t, 3)[0], (x,))


def test_third_derivative_of_covpool():
    x = _x(1, 2, 4).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda t: torch.autograd.grad(mpncov.covpool(t).pow(2).sum(), t, create_graph=True)[0],
        (x,))


def test_gradient_penalty_on_the_mpncov_head_matches_plain_torch():
    # R1 / WGAN-GP style: the penalty is the squared norm of d(score)/d(features), and its
    # gradient reaches the head's 1x1 reduction conv through the double backward.
    torch.manual_seed(0)
    head = mpncov.nn.MPNCOV(iterNum=3, input_dim=6, dimension_reduction=4).double()
    head.eval()  # BatchNorm with running statistics: the same function for both paths
    w = _x(10, seed=2)
    x = _x(3, 6, 5, 5, seed=3).requires_grad_()

    def penalty(pool):
        feat = head.conv_dr_block(x)
        score = pool(feat) @ w
        (gx,) = torch.autograd.grad(score.sum(), x, create_graph=True)
        return gx.pow(2).sum()

    grads = []
    for pool in (lambda f: mpncov.isqrt_cov(f, 3), lambda f: isqrt_cov_ref(f, 3)):
        head.zero_grad()
        penalty(pool).backward()
        grads.append(head.conv_dr_block[0].weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_double_backward_of_degenerate_traces_is_zero_or_nan():
    s = spd(3, 4)
    s[1] = 0
    s[2] = -s[2]
    s.requires_grad_()
    out = mpncov.sqrtm(s, 3)
    (g,) = torch.autograd.grad(out.sum(), s, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), s)
    assert torch.isfinite(gg[0]).all() and gg[0].abs().max() > 0
    assert torch.equal(gg[1], torch.zeros_like(gg[1]))
    assert torch.isnan(gg[2]).all()


# ------------------------------------------------------------------------ torch.func

def test_func_grad_jacrev_and_vmap_of_grad_match_plain_torch():
    x = _x(2, 3, 7)

    def loss(fn):
        return lambda t: fn(t).pow(2).sum()

    for ours, ref in [(mpncov.covpool, covpool_ref),
                      (lambda t: mpncov.isqrt_cov(t, 3), lambda t: isqrt_cov_ref(t, 3))]:
        torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x))
        torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x))
        per_sample = torch.vmap(torch.func.grad(lambda t: loss(ours)(t[None])))(x)
        per_sample_ref = torch.vmap(torch.func.grad(lambda t: loss(ref)(t[None])))(x)
        torch.testing.assert_close(per_sample, per_sample_ref)


def test_func_grad_of_grad_sqrtm():
    s = spd(1, 3)

    def f(t):
        return torch.func.grad(lambda u: mpncov.sqrtm(u, 3).pow(2).sum())(t).sum()

    def f_ref(t):
        return torch.func.grad(lambda u: sqrtm_ref(u, 3).pow(2).sum())(t).sum()

    torch.testing.assert_close(torch.func.grad(f)(s), torch.func.grad(f_ref)(s))


def test_vmap_over_a_second_batch_dim_runs_the_ops_batched():
    x = _x(4, 2, 5, 9)  # vmapped dim 0, then the ops' own batch of 2
    s = spd(8, 5).view(4, 2, 5, 5)
    torch.testing.assert_close(torch.vmap(mpncov.covpool)(x), covpool_ref(x.flatten(0, 1)).view(4, 2, 5, 5))
    torch.testing.assert_close(torch.vmap(lambda t: mpncov.sqrtm(t, 5))(s),
                               sqrtm_ref(s.flatten(0, 1), 5).view(4, 2, 5, 5))
    torch.testing.assert_close(torch.vmap(mpncov.triuvec, in_dims=1)(s.transpose(0, 1)),
                               triuvec_ref(s.flatten(0, 1)).view(4, 2, 15))
    torch.testing.assert_close(torch.vmap(lambda t: mpncov.isqrt_cov(t, 3))(x),
                               isqrt_cov_ref(x.flatten(0, 1), 3).view(4, 2, 15))


@pytest.mark.parametrize("call", [
    lambda x: torch.func.jvp(mpncov.covpool, (x,), (torch.ones_like(x),)),
    lambda x: torch.func.jacfwd(lambda t: mpncov.isqrt_cov(t, 3))(x),
    lambda x: torch.func.hessian(lambda t: mpncov.isqrt_cov(t, 3).sum())(x),
])
def test_forward_mode_ad_raises_a_clear_error(call):
    with pytest.raises(NotImplementedError, match="mpncov.* forward-mode"):
        call(_x(2, 3, 5))


def test_forward_ad_dual_tensors_raise_a_clear_error():
    import torch.autograd.forward_ad as fwAD
    x = _x(2, 3, 5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        for fn in (mpncov.covpool, lambda t: mpncov.sqrtm(covpool_ref(t), 3),
                   lambda t: mpncov.triuvec(covpool_ref(t)), lambda t: mpncov.isqrt_cov(t, 3)):
            with pytest.raises(NotImplementedError, match="mpncov.* forward-mode"):
                fn(dual)
