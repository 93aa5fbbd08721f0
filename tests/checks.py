"""Helpers shared by the test files of the Gram space and of token features: seeded float64
inputs, an output with its gradient, and the error measure their tolerances refer to."""
import torch

F64 = torch.float64


def randn(shape, seed=0, dtype=F64):
    """Seeded standard normal values, drawn in float64 and then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def output_and_grad(fn, x, g):
    """(fn(x), d<g, fn(x)>/dx), both detached."""
    x = x.detach().requires_grad_()
    out = fn(x)
    (d,) = torch.autograd.grad(out, x, g)
    return out.detach(), d


def rel_err(a, b):
    """Largest difference of a and b relative to b's largest magnitude (1 at least)."""
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
    return ((a.double() - b.double()).abs().max().item() if a.numel() else 0.0) / scale
