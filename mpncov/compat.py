"""Drop-in names of the published ``MPNCOV.py`` (fast-MPN-COV).

Code written against the published module switches by changing one import::

    # from src.representation.MPNCOV import CovpoolLayer, SqrtmLayer, TriuvecLayer, MPNCOV
    from mpncov.compat import CovpoolLayer, SqrtmLayer, TriuvecLayer, MPNCOV

Shapes are the published ones: ``CovpoolLayer`` (B, C, H, W) -> (B, C, C); ``SqrtmLayer``
(B, C, C) -> (B, C, C); ``TriuvecLayer`` (B, C, C) -> (B, C(C+1)/2, 1). Values are the
SPEC's, which keeps the published numbers and fixes their bugs: the standalone square-root
gradient is the true one (no transpose), the trace term is added batched, a zero matrix
gives zeros instead of NaN, and fp16/bf16 inputs are computed in fp32.
"""
from __future__ import annotations

from torch import Tensor

from .ops import covpool, sqrtm, triuvec

__all__ = ["CovpoolLayer", "SqrtmLayer", "TriuvecLayer", "MPNCOV"]


def CovpoolLayer(x: Tensor) -> Tensor:  # noqa: N802  (published name)
    return covpool(x)


def SqrtmLayer(x: Tensor, iterN: int) -> Tensor:  # noqa: N802,N803
    return sqrtm(x, iterN)


def TriuvecLayer(x: Tensor) -> Tensor:  # noqa: N802
    return triuvec(x).unsqueeze(-1)


def __getattr__(name):
    # The MPNCOV module lives in mpncov.nn; imported on first use.
    if name == "MPNCOV":
        from .nn import MPNCOV
        return MPNCOV
    raise AttributeError(f"module 'mpncov.compat' has no attribute {name!r}")
