"""Module wrappers around the covariance-pooling operators, and the iSQRT-COV head.

The operators themselves (``mpncov.covpool``, ``mpncov.sqrtm``, ``mpncov.triuvec``,
``mpncov.isqrt_cov``) live in the compiled extension; they are looked up at call time so
importing this module never triggers the extension load (and so ``mpncov/__init__.py``
may import ``mpncov.nn`` at any point of its own initialisation).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

import mpncov as _ops  # attributes are read at call time only

__all__ = ["CovPool", "Sqrtm", "Triuvec", "MPNCOV", "TokenBatchNorm", "triu_col_order_index",
           "triu_row_to_col"]


def _int_setting(value, owner: str, name: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high], else a ValueError naming the setting (a float
    such as 2.5 is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value}")
    return int(value)


def _iters_setting(value, owner: str, name: str) -> int:
    from ..ops import MAX_ITERS
    return _int_setting(value, owner, name, 1, MAX_ITERS)


def _channel_dim_setting(value, owner: str) -> int:
    """1 (channels first) or -1 (tokens / channels last), else a ValueError."""
    if isinstance(value, bool) or value not in (1, -1):
        raise ValueError(f"{owner}: channel_dim must be 1 (channels first) or -1 (tokens), "
                         f"got {value!r}")
    return int(value)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dim of (B, ..., C) tokens: per channel over the
    batch and all positions, the statistics BatchNorm2d takes over (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


class CovPool(nn.Module):
    """(B,C,H,W) or (B,C,M) -> (B,C,C) biased covariance, centred over the M positions;
    with ``channel_dim=-1`` tokens (B,N,C) or (B,H,W,C)."""

    def __init__(self, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = _channel_dim_setting(channel_dim, "CovPool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.covpool(x, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return "" if self.channel_dim == 1 else f"channel_dim={self.channel_dim}"


class Sqrtm(nn.Module):
    """Approximate matrix square root by ``iters`` coupled Newton-Schulz iterations (iSQRT)."""

    def __init__(self, iters: int = 5):
        super().__init__()
        self.iters = _iters_setting(iters, "Sqrtm", "iters")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.sqrtm(x, self.iters)

    def extra_repr(self) -> str:
        return f"iters={self.iters}"


class Triuvec(nn.Module):
    """(B,C,C) -> (B, C(C+1)/2): upper triangle with diagonal, row-major."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.triuvec(x)


def triu_col_order_index(dim: int, device=None) -> torch.Tensor:
    """Index ``p`` such that ``vec_col = vec_row[:, p]``.

    ``vec_row`` is :func:`mpncov.triuvec`'s row-major upper triangle; ``vec_col`` is the
    column-major upper triangle (equal to the row-major lower triangle) that GSoP-Net's
    own triuvec produced, i.e. the order a published GSoP-Net2 classifier expects.
    """
    rows, cols = torch.triu_indices(dim, dim, device=device)  # row-major (i <= j)
    # column-major order of the same (i, j) pairs: sort by j then i
    key = cols * dim + rows
    return torch.argsort(key)


def triu_row_to_col(vec: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder a row-major triangle vector (B, K) to the column-major (GSoP-Net) order."""
    return vec.index_select(-1, triu_col_order_index(dim, vec.device))


class MPNCOV(nn.Module):
    """Matrix power normalised covariance pooling (the iSQRT-COV head).

    [optional 1x1 conv (no bias) ``input_dim -> dimension_reduction`` + BN + ReLU, stored
    as ``conv_dr_block``] -> covpool -> sqrtm(``iterNum``) if ``is_sqrt`` -> triuvec if
    ``is_vec``. Output: (B, d(d+1)/2) when ``is_vec`` else the (B, d, d) matrix flattened
    to (B, d*d); ``output_dim`` holds that size. Argument names follow the published
    module so configurations carry over; ``is_sqrt and is_vec`` uses the fused
    :func:`mpncov.isqrt_cov` operator, in the space ``space`` ("auto", "cov" or "gram",
    see :func:`mpncov.isqrt_cov`).

    ``channel_dim=-1`` takes tokens, (B, N, input_dim) (e.g. a vision transformer's) or
    (B, H, W, input_dim), instead of (B, input_dim, H, W); the reduction is then a Linear
    layer (no bias) + :class:`TokenBatchNorm` + ReLU, the same map as the 1x1 conv + BN.
    """

    def __init__(self, iterNum: int = 3, is_sqrt: bool = True, is_vec: bool = True,
                 input_dim: int = 2048, dimension_reduction: int | None = None,
                 device=None, dtype=None, *, channel_dim: int = 1, space: str = "auto"):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.iterNum = _iters_setting(iterNum, "MPNCOV", "iterNum")
        self.is_sqrt = bool(is_sqrt)
        self.is_vec = bool(is_vec)
        self.input_dim = _int_setting(input_dim, "MPNCOV", "input_dim")
        self.dr = (None if dimension_reduction is None else
                   _int_setting(dimension_reduction, "MPNCOV", "dimension_reduction"))
        self.channel_dim = _channel_dim_setting(channel_dim, "MPNCOV")
        from .._space import SPACES
        if space not in SPACES:
            raise ValueError(f"MPNCOV: space must be one of {SPACES}, got {space!r}")
        self.space = space
        if self.dr is not None:
            if self.channel_dim == 1:
                reduce = nn.Conv2d(input_dim, self.dr, kernel_size=1, stride=1, bias=False, **dd)
                norm = nn.BatchNorm2d(self.dr, **dd)
            else:
                reduce = nn.Linear(input_dim, self.dr, bias=False, **dd)
                norm = TokenBatchNorm(self.dr, **dd)
            self.conv_dr_block = nn.Sequential(reduce, norm, nn.ReLU(inplace=True))
        d = self.dr if self.dr else input_dim
        self.dim = d
        self.output_dim = d * (d + 1) // 2 if self.is_vec else d * d
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # fan_out of the 1x1 conv and of the Linear layer are both dimension_reduction
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[self.channel_dim] != self.input_dim:
            layout = "(B, input_dim={0}, H, W)" if self.channel_dim == 1 else \
                "(B, N, input_dim={0}) or (B, H, W, input_dim={0})"
            raise ValueError(f"MPNCOV: expected {layout.format(self.input_dim)} features, "
                             f"got shape {tuple(x.shape)}")
        if self.dr is not None:
            x = self.conv_dr_block(x)
        if self.is_sqrt and self.is_vec:
            return _ops.isqrt_cov(x, self.iterNum, channel_dim=self.channel_dim, space=self.space)
        x = _ops.covpool(x, channel_dim=self.channel_dim)
        if self.is_sqrt:
            x = _ops.sqrtm(x, self.iterNum)
        if self.is_vec:
            return _ops.triuvec(x)
        return x.flatten(1)

    def extra_repr(self) -> str:
        extra = "" if self.channel_dim == 1 else f", channel_dim={self.channel_dim}"
        extra += "" if self.space == "auto" else f", space={self.space!r}"
        return (f"iterNum={self.iterNum}, is_sqrt={self.is_sqrt}, is_vec={self.is_vec}, "
                f"output_dim={self.output_dim}{extra}")
