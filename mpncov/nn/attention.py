"""Attention blocks: GSoP (second order) and the first-order SE, ECA, CBAM, GCT blocks.

Every block takes ``channels`` first, then keyword-only options, and works under
autocast, with channels_last inputs, under ``torch.compile`` and with DDP/SyncBatchNorm.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mpncov as _ops  # operators are looked up at call time

__all__ = ["SE", "ECA", "CBAM", "GCT", "GSoP", "create_attn", "get_act_layer", "ATTN_NAMES",
           "gsop_forward"]

_ACTS = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU,
    "swish": nn.SiLU, "hard_sigmoid": nn.Hardsigmoid, "hardsigmoid": nn.Hardsigmoid,
    "leaky_relu": functools.partial(nn.LeakyReLU, 0.1), "identity": nn.Identity,
}


def get_act_layer(layer) -> nn.Module:
    """Build an activation module from a class, factory, instance, name or None."""
    if layer is None or layer is False:
        return nn.Identity()
    if isinstance(layer, str):
        try:
            return _ACTS[layer.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {layer!r}; choose from {sorted(_ACTS)}") from None
    if isinstance(layer, nn.Module):
        return layer
    return layer()


def _rd(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int = 1) -> int:
    if rd_channels is not None:
        return int(rd_channels)
    v = channels * rd_ratio
    return max(rd_divisor, int(v + rd_divisor / 2) // rd_divisor * rd_divisor)


# --------------------------------------------------------------------------------------
# first-order blocks
# --------------------------------------------------------------------------------------
class SE(nn.Module):
    """Squeeze-and-excitation: GAP -> 1x1 conv C->C*rd_ratio (bias) -> act -> 1x1 conv
    (bias) -> gate -> scale. Names ``fc1``/``fc2`` (timm layout)."""

    def __init__(self, channels: int, *, rd_ratio: float = 1.0 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer=nn.ReLU, gate_layer=nn.Sigmoid, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rd = _rd(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=bias, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=bias, **dd)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.gate(self.fc2(self.act(self.fc1(s))))
        return x * s


class ECA(nn.Module):
    """Efficient channel attention: GAP -> Conv1d(1,1,k, no bias) across channels -> gate.

    ``kernel_size=3`` (official ECA-ResNet); ``adaptive=True`` (or ``kernel_size=None``)
    uses k = odd(|log2(C) + beta| / gamma) with gamma=2, beta=1. ``rd_ratio``,
    ``rd_channels`` and ``act_layer`` are accepted for a uniform block interface and
    unused (ECA has no reduction and no hidden activation).
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int | None = 3,
                 adaptive: bool = False, gamma: float = 2, beta: float = 1,
                 gate_layer=nn.Sigmoid, rd_ratio=None, rd_channels=None, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        if adaptive or kernel_size is None:
            if channels is None:
                raise ValueError("the adaptive ECA kernel size needs `channels`")
            t = int(abs((math.log2(channels) + beta) / gamma))
            kernel_size = t if t % 2 else t + 1
        if kernel_size % 2 != 1:
            raise ValueError(f"ECA kernel_size must be odd, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2,
                              bias=False, device=device, dtype=dtype)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = x.mean((2, 3)).view(b, 1, c)
        y = self.gate(self.conv(y)).view(b, c, 1, 1)
        return x * y


class _CBAMChannel(nn.Module):
    def __init__(self, channels, rd, act_layer, gate_layer, bias, dd):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=bias, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=bias, **dd)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x):
        a = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        m = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(a + m)


class _ConvBN(nn.Module):
    def __init__(self, cin, cout, k, dd):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(cout, **dd)

    def forward(self, x):
        return self.bn(self.conv(x))


class _CBAMSpatial(nn.Module):
    def __init__(self, kernel_size, gate_layer, dd):
        super().__init__()
        self.conv = _ConvBN(2, 1, kernel_size, dd)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x):
        s = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(s))


class CBAM(nn.Module):
    """CBAM: channel gate (shared MLP over avg- and max-pooled vectors, summed, gate)
    followed by a spatial gate (k x k conv + BN over the channel-wise (max, mean) maps)."""

    def __init__(self, channels: int, *, rd_ratio: float = 1.0 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer=nn.ReLU,
                 gate_layer=nn.Sigmoid, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rd = _rd(channels, rd_ratio, rd_channels, rd_divisor)
        self.channel = _CBAMChannel(channels, rd, act_layer, gate_layer, bias, dd)
        self.spatial = _CBAMSpatial(spatial_kernel_size, gate_layer, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class GCT(nn.Module):
    """Gated channel transformation (Yang et al., CVPR 2020).

    l2: e = alpha * sqrt(sum_HW x^2 + eps); n = gamma / sqrt(mean_C e^2 + eps)
    l1: e = alpha * sum_HW |x|;              n = gamma / (mean_C |e| + eps)
    out = x * (1 + tanh(e * n + beta)). alpha = 1, gamma = beta = 0 at init, so the block
    is exactly the identity at init. alpha/gamma/beta are 1-D (C,) so the usual
    "no weight decay on ndim <= 1" filters skip them. Statistics are computed in float32
    (a sum of squares over H*W overflows float16).
    """

    placement = "pre_conv"  # a ResNet puts it before every conv of a block

    def __init__(self, channels: int, *, mode: str = "l2", eps: float = 1e-5,
                 after_relu: bool = False, device=None, dtype=None):
        super().__init__()
        if mode not in ("l1", "l2"):
            raise ValueError(f"unknown GCT mode {mode!r}; expected 'l1' or 'l2'")
        dd = dict(device=device, dtype=dtype)
        self.mode = mode
        self.eps = float(eps)
        self.after_relu = bool(after_relu)
        self.alpha = nn.Parameter(torch.ones(channels, **dd))
        self.gamma = nn.Parameter(torch.zeros(channels, **dd))
        self.beta = nn.Parameter(torch.zeros(channels, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        alpha = self.alpha.float().view(1, -1, 1, 1)
        gamma = self.gamma.float().view(1, -1, 1, 1)
        beta = self.beta.float().view(1, -1, 1, 1)
        if self.mode == "l2":
            e = (xf.pow(2).sum((2, 3), keepdim=True) + self.eps).sqrt() * alpha
            n = gamma / (e.pow(2).mean(1, keepdim=True) + self.eps).sqrt()
        else:
            xa = xf if self.after_relu else xf.abs()
            e = xa.sum((2, 3), keepdim=True) * alpha
            n = gamma / (e.abs().mean(1, keepdim=True) + self.eps)
        gate = 1.0 + torch.tanh(e * n + beta)
        return x * gate.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()}, mode={self.mode!r}, eps={self.eps}"


# --------------------------------------------------------------------------------------
# GSoP
# --------------------------------------------------------------------------------------
_GSOP_MODES = {"1": "1", "2": "2", "+": "+", "M": "M", "m": "M", "&": "&",
               "channel": "1", "position": "2", "spatial": "2", "sum": "+", "max": "M",
               "concat": "&"}


def _gsop_channel(m, u: torch.Tensor) -> torch.Tensor:
    y = m.gsop_act(u)  # not in place: u is reused
    y = m.gsop_act(m.bn_for_DR(m.conv_for_DR(y)))
    s = _ops.covpool(y).unsqueeze(-1)  # (B, d, d, 1)
    s = m.row_bn(s)
    s = m.row_conv_group(s)  # (B, 4d, 1, 1): row-wise conv as a grouped conv
    s = m.gsop_mid_act(s)
    s = m.fc_adapt_channels(s)  # (B, C, 1, 1)
    return m.gsop_gate(s)


def _gsop_position(m, u: torch.Tensor) -> torch.Tensor:
    sh, sw = m.gsop_sp_size
    y = m.gsop_act(u)
    y = m.bn_for_DR_spatial(m.conv_for_DR_spatial(y))
    y = F.adaptive_avg_pool2d(y, (sh, sw))  # (B, d, sh, sw)
    # covariance between positions, centred over the d channels
    y = y.flatten(2).transpose(1, 2).contiguous()  # (B, sh*sw, d)
    s = _ops.covpool(y).unsqueeze(-1)  # (B, P, P, 1)
    s = m.row_bn_for_spatial(s)
    s = m.gsop_act(m.row_conv_group_for_spatial(s))  # (B, 4P, 1, 1)
    s = m.gsop_gate(m.fc_adapt_channels_for_spatial(s))  # (B, P, 1, 1)
    s = s.reshape(s.shape[0], 1, sh, sw)
    return F.adaptive_avg_pool2d(s, (u.shape[-2], u.shape[-1]))


def gsop_forward(m, u: torch.Tensor) -> torch.Tensor:
    """GSoP forward on any module ``m`` that owns the GSoP submodules and attributes.

    Used by :class:`GSoP` itself and by a Bottleneck into which a GSoP block was
    flattened (so the published state_dict paths such as ``layer1.2.conv_for_DR.weight``
    hold).
    """
    mode = m.gsop_mode
    if mode == "1":
        return u * _gsop_channel(m, u)
    if mode == "2":
        return m.gsop_act(u * _gsop_position(m, u))
    chan = u * _gsop_channel(m, u)
    pos = m.gsop_act(u * _gsop_position(m, u))
    if mode == "+":
        return chan + pos
    if mode == "M":
        return torch.maximum(chan, pos)
    return m.bn_for_concat(m.dilate_conv_for_concat1(chan) + m.dilate_conv_for_concat2(pos))


class GSoP(nn.Module):
    """Global second-order pooling attention block (GSoP-Net, Gao et al., CVPR 2019).

    Args:
        channels: C, channels of the input U (4*planes in a Bottleneck).
        att_dim: d, the reduced dimension whose d x d covariance is formed (128).
        mode: '1' channel-wise (default), '2' position-wise, '+' sum fusion, 'M' max
            fusion, '&' concat-style fusion (aliases 'channel', 'position', 'sum', 'max',
            'concat'; ints 1/2 accepted).
        planes: the Bottleneck's ``planes``; with ``dr_stride=None`` the channel branch's
            conv_for_DR has stride 2 when planes <= 64 (stage 1), as published.
        dr_stride: stride of conv_for_DR, overriding the ``planes`` rule.
        sp_size: pooled size for the position branch (8 -> 8x8 = 64 positions).
        act_layer: activation (ReLU); never applied in place on U.
        gate_layer: gate (Sigmoid).
        mid_act_layer: activation between the row-wise conv and fc_adapt_channels of
            the channel branch; None (published code) or e.g. LeakyReLU (the paper's
            figure).

    Submodule names are the published ones. A ResNet Bottleneck adopts them as its own
    attributes (see :meth:`flatten_into`) so published checkpoints load unchanged.
    """

    flatten_into_parent = True

    def __init__(self, channels: int, *, att_dim: int = 128, mode="1", planes: int | None = None,
                 dr_stride: int | None = None, sp_size: int | tuple = 8, act_layer=nn.ReLU,
                 gate_layer=nn.Sigmoid, mid_act_layer=None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        key = str(mode)
        if key not in _GSOP_MODES:
            raise ValueError(f"unknown GSoP mode {mode!r}; expected one of '1','2','+','M','&'")
        self.gsop_mode = _GSOP_MODES[key]
        if dr_stride is None:
            dr_stride = 2 if (planes is not None and planes <= 64) else 1
        self.dr_stride = int(dr_stride)
        self.att_dim = d = int(att_dim)
        sp = (sp_size, sp_size) if isinstance(sp_size, int) else tuple(sp_size)
        self.gsop_sp_size = sp
        self.gsop_act = get_act_layer(act_layer)
        self.gsop_gate = get_act_layer(gate_layer)
        self.gsop_mid_act = get_act_layer(mid_act_layer)
        if self.gsop_mode in ("1", "+", "M", "&"):
            self.conv_for_DR = nn.Conv2d(channels, d, 1, stride=self.dr_stride, bias=True, **dd)
            self.bn_for_DR = nn.BatchNorm2d(d, **dd)
            self.row_bn = nn.BatchNorm2d(d, **dd)
            self.row_conv_group = nn.Conv2d(d, 4 * d, kernel_size=(d, 1), groups=d, bias=True, **dd)
            self.fc_adapt_channels = nn.Conv2d(4 * d, channels, 1, bias=True, **dd)
        if self.gsop_mode in ("2", "+", "M", "&"):
            p = sp[0] * sp[1]
            self.conv_for_DR_spatial = nn.Conv2d(channels, d, 1, bias=True, **dd)
            self.bn_for_DR_spatial = nn.BatchNorm2d(d, **dd)
            self.row_bn_for_spatial = nn.BatchNorm2d(p, **dd)
            self.row_conv_group_for_spatial = nn.Conv2d(p, 4 * p, kernel_size=(p, 1), groups=p,
                                                        bias=True, **dd)
            self.fc_adapt_channels_for_spatial = nn.Conv2d(4 * p, p, 1, bias=True, **dd)
        if self.gsop_mode == "&":
            groups = max(1, channels // 64)
            factor = int(math.log2(32 / groups)) if groups <= 32 else 0
            k = 2 * factor + 5
            for name in ("dilate_conv_for_concat1", "dilate_conv_for_concat2"):
                self.add_module(name, nn.Conv2d(channels, channels, kernel_size=(k, 1),
                                                padding=(k // 2, 0), groups=groups, bias=True, **dd))
            self.bn_for_concat = nn.BatchNorm2d(channels, **dd)

    _FLAT_ATTRS = ("gsop_mode", "gsop_sp_size", "att_dim", "dr_stride")

    def flatten_into(self, owner: nn.Module) -> Callable:
        """Register this block's submodules and settings on ``owner`` (e.g. a Bottleneck)
        and return the function ``f(owner, x)`` that applies the block there."""
        for name, child in self.named_children():
            if hasattr(owner, name) and name not in owner._modules:
                raise AttributeError(f"{type(owner).__name__} already has an attribute {name!r}")
            owner.add_module(name, child)
        for a in self._FLAT_ATTRS:
            setattr(owner, a, getattr(self, a))
        return gsop_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gsop_forward(self, x)

    def extra_repr(self) -> str:
        return f"mode={self.gsop_mode!r}, att_dim={self.att_dim}, dr_stride={self.dr_stride}"


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------
_ATTN = {"se": SE, "eca": ECA, "cbam": CBAM, "gct": GCT, "gsop": GSoP}
ATTN_NAMES = tuple(_ATTN)


def create_attn(name, channels: int, **kwargs):
    """Build an attention block for ``channels`` channels.

    ``name``: 'se', 'eca', 'cbam', 'gct' or 'gsop' (case-insensitive); None, '' or False
    gives None; a class or ``functools.partial`` is called as ``name(channels, **kwargs)``.
    """
    if name is None or name is False or name == "":
        return None
    if isinstance(name, str):
        try:
            cls = _ATTN[name.lower()]
        except KeyError:
            raise ValueError(f"unknown attention {name!r}; choose from {list(_ATTN)}") from None
        return cls(channels, **kwargs)
    if callable(name):
        return name(channels, **kwargs)
    raise TypeError(f"attention must be a name, a class or a callable, got {type(name)}")
