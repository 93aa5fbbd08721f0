"""Independent references written with plain torch ops (autograd gives their exact
gradients). Used by the tests only; they follow SPEC sections 1-3 literally, with sqrtm
defined on the symmetric part of its input (SPEC section 2: one documented function of
any input)."""
import torch


def covpool_ref(x):
    x = x.flatten(2) if x.dim() == 4 else x
    xc = x - x.mean(dim=2, keepdim=True)
    return xc @ xc.transpose(1, 2) / x.shape[2]


def sqrtm_ref(s, iters):
    s = (s + s.transpose(1, 2)) / 2
    b, c, _ = s.shape
    eye = torch.eye(c, dtype=s.dtype, device=s.device).expand(b, c, c)
    t = s.diagonal(dim1=1, dim2=2).sum(-1).view(b, 1, 1)
    a = s / t
    if iters == 1:
        y = 0.5 * a @ (3 * eye - a)
    else:
        tk = 0.5 * (3 * eye - a)
        y, z = a @ tk, tk
        for _ in range(iters - 2):
            tk = 0.5 * (3 * eye - z @ y)
            y, z = y @ tk, tk @ z
        y = 0.5 * y @ (3 * eye - z @ y)
    return y * t.sqrt()


def triuvec_ref(s):
    c = s.shape[-1]
    rows, cols = torch.triu_indices(c, c, device=s.device)
    return s[:, rows, cols]


def isqrt_cov_ref(x, iters):
    return triuvec_ref(sqrtm_ref(covpool_ref(x), iters))


def spd(b, c, dtype=torch.float64, device="cpu", m=None, seed=0):
    """Symmetric positive (semi-)definite test matrices: covariances of random features,
    made exactly symmetric (a BLAS need not round X Xc^T to an exactly symmetric matrix)."""
    g = torch.Generator().manual_seed(seed)
    m = m or (2 * c + 3)
    x = torch.randn(b, c, m, generator=g, dtype=torch.float64)
    s = covpool_ref(x)
    return ((s + s.transpose(1, 2)) / 2).to(device=device, dtype=dtype)
