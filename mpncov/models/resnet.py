"""ResNets with attention blocks and a second-order (iSQRT-COV) head.

Module names follow torchvision (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc,
``downsample.0/.1``) plus the published names of the second-order models
(``layer_reduce``, ``layer_reduce_bn``, ``layer_reduce_relu`` for iSQRT-COV and
GSoP-Net2; ``conv_for_DR``, ``row_bn``, ... for GSoP blocks, owned by the Bottleneck
itself as in GSoP-Net, e.g. ``layer1.2.conv_for_DR.weight``). Attention blocks placed
after the last BN of a block live at ``se`` (timm convention, e.g.
``layer1.0.se.fc1.weight``); GCT blocks live at ``gct1``/``gct2``/``gct3``, in front of
``conv1``/``conv2``/``conv3``.

Global average pooling is ``nn.AdaptiveAvgPool2d(1)``: the published models use
``AvgPool2d(14)`` (GSoP-Net1, ImageNet-style ResNets at 224 input with layer4 stride 1)
or ``AvgPool2d(7)``, which give identical outputs whenever the final map is 14x14 / 7x7,
i.e. at 224x224 input; adaptive pooling also works at other input sizes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

import mpncov as _ops
from ..nn.attention import GCT, GSoP, create_attn, _ATTN
from ..nn.pooling import triu_col_order_index

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "convert_gsop_net2_fc", "load_published_gsop_net2"]


def _attn_cls(attn_layer):
    """Resolve the class behind an attention spec (name, class or partial), or None."""
    if attn_layer is None or attn_layer is False or attn_layer == "":
        return None
    if isinstance(attn_layer, str):
        return _ATTN.get(attn_layer.lower())
    f = attn_layer
    while isinstance(f, functools.partial):
        f = f.func
    return f if isinstance(f, type) else None


def _is_pre_conv(attn_layer) -> bool:
    cls = _attn_cls(attn_layer)
    return cls is not None and getattr(cls, "placement", "post_bn") == "pre_conv"


def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _AttnMixin:
    """Attach an attention block to a residual block.

    post-BN blocks (SE, ECA, CBAM, GSoP, ...) act on the residual branch after its last
    BN and before the addition; blocks that set ``placement = 'pre_conv'`` (GCT) are put
    in front of each conv. A block with ``flatten_into_parent`` (GSoP) hands its
    submodules to the residual block so their state_dict paths are the published ones.
    """

    def _init_attn(self, attn_layer, attn_kwargs, out_channels, conv_in_channels):
        self.se = None
        self._attn_fn = None
        self.attention = "0"
        if attn_layer is None or attn_layer is False or attn_layer == "":
            return
        kw = dict(attn_kwargs or {})
        if _is_pre_conv(attn_layer):
            for i, c in enumerate(conv_in_channels, 1):
                self.add_module(f"gct{i}", create_attn(attn_layer, c, **kw))
            return
        attn = create_attn(attn_layer, out_channels, **kw)
        if getattr(attn, "flatten_into_parent", False):
            self._attn_fn = attn.flatten_into(self)
            self.attention = getattr(attn, "gsop_mode", "1")
        else:
            self.se = attn

    def _pre(self, i: int, x: torch.Tensor) -> torch.Tensor:
        g = self._modules.get(f"gct{i}")
        return x if g is None else g(x)

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        if self._attn_fn is not None:
            return self._attn_fn(self, x)
        if self.se is not None:
            return self.se(x)
        return x


class BasicBlock(_AttnMixin, nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None, *, attn_layer=None, attn_kwargs=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_attn(attn_layer, attn_kwargs, planes, (inplanes, planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(self._pre(1, x))))
        out = self.bn2(self.conv2(self._pre(2, out)))
        out = self._post(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(_AttnMixin, nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None, *, attn_layer=None, attn_kwargs=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_attn(attn_layer, attn_kwargs, planes * self.expansion, (inplanes, width, width))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(self._pre(1, x))))
        out = self.relu(self.bn2(self.conv2(self._pre(2, out))))
        out = self.bn3(self.conv3(self._pre(3, out)))
        out = self._post(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet with attention blocks and a choice of head.

    Args:
        block, layers: BasicBlock/Bottleneck and blocks per stage, as in torchvision.
        num_classes: classifier outputs (``fc``); 0 leaves ``fc`` as Identity.
        in_chans: input channels.
        widths: ``planes`` of the four stages (64, 128, 256, 512).
        stem_width: channels of ``conv1``.
        stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool) or 'cifar' (3x3/1 conv, no pool;
            ``maxpool`` is Identity) for small inputs.
        last_stride: stride of layer4 (2 torchvision; 1 for iSQRT-COV and GSoP-Net).
        zero_init_residual: zero the last BN weight of every residual branch.
        attn_layer: 'se', 'eca', 'cbam', 'gct', 'gsop', a class/partial, or None.
        attn_kwargs: keyword arguments for the attention blocks (e.g. ``att_dim``,
            ``mode`` for GSoP, ``rd_ratio`` for SE/CBAM, ``kernel_size`` for ECA).
        attn_stages: stages (1..4) that get attention blocks.
        attn_blocks: 'all' blocks of those stages, or only the 'last' one (GSoP-Net).
        head: 'gap' (global average pool -> fc(num_features)) or 'isqrt'
            (``layer_reduce`` conv 1x1 -> ``layer_reduce_bn`` -> ``layer_reduce_relu``
            -> covpool -> sqrtm(head_iters) -> triuvec -> fc(d(d+1)/2)).
        head_dim: d of the iSQRT-COV head (256).
        head_iters: Newton-Schulz iterations of the head (5 iSQRT-COV, 3 GSoP-Net2).
        triu_order: 'row' (mpncov.triuvec, fast-MPN-COV order) or 'col' (GSoP-Net's
            column-major order: lets a published GSoP-Net2 classifier be loaded as is).
        drop_rate: dropout before ``fc``.
    """

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, *, in_chans: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512), stem_width: int = 64,
                 stem: str = "imagenet", last_stride: int = 2, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, norm_layer=None,
                 attn_layer=None, attn_kwargs: dict | None = None,
                 attn_stages: Sequence[int] = (1, 2, 3, 4), attn_blocks: str = "all",
                 head: str = "gap", head_dim: int = 256, head_iters: int = 5,
                 triu_order: str = "row", drop_rate: float = 0.0):
        super().__init__()
        if isinstance(block, str):
            block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block.lower()]
        if head not in ("gap", "isqrt"):
            raise ValueError(f"head must be 'gap' or 'isqrt', got {head!r}")
        if attn_blocks not in ("all", "last"):
            raise ValueError(f"attn_blocks must be 'all' or 'last', got {attn_blocks!r}")
        if triu_order not in ("row", "col"):
            raise ValueError(f"triu_order must be 'row' or 'col', got {triu_order!r}")
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = stem_width
        self.dilation = 1
        self.head = head
        self.triu_order = triu_order
        self.conv1_stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = self._norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)

        is_gsop = _attn_cls(attn_layer) is not None and issubclass(_attn_cls(attn_layer), GSoP)
        strides = (1, 2, 2, last_stride)
        for i, (planes, n, stride) in enumerate(zip(widths, layers, strides), 1):
            akw = dict(attn_kwargs or {})
            if is_gsop:
                akw.setdefault("dr_stride", 2 if i == 1 else 1)  # published: planes == 64
            use = attn_layer if i in tuple(attn_stages) else None
            self.add_module(f"layer{i}", self._make_layer(block, planes, n, stride, use, akw, attn_blocks))

        self.num_features = widths[-1] * block.expansion
        if head == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.head_features = self.num_features
        else:
            self.layer_reduce = nn.Conv2d(self.num_features, head_dim, 1, stride=1, padding=0, bias=False)
            self.layer_reduce_bn = self._norm_layer(head_dim)
            self.layer_reduce_relu = nn.ReLU(inplace=True)
            self.head_dim = head_dim
            self.head_iters = int(head_iters)
            self.head_features = head_dim * (head_dim + 1) // 2
            if triu_order == "col":
                self.register_buffer("triu_index", triu_col_order_index(head_dim), persistent=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.head_features, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride, attn_layer, attn_kwargs, attn_blocks):
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = []
        for j in range(blocks):
            use = attn_layer if (attn_blocks == "all" or j == blocks - 1) else None
            layers.append(block(self.inplanes, planes, stride if j == 0 else 1,
                                downsample if j == 0 else None, self.groups, self.base_width,
                                self.dilation, norm_layer, attn_layer=use, attn_kwargs=attn_kwargs))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head == "gap":
            x = torch.flatten(self.avgpool(x), 1)
        else:
            x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
            x = _ops.isqrt_cov(x, self.head_iters)
            if self.triu_order == "col":
                x = x.index_select(1, self.triu_index)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_gsop_net2_fc(state_dict: dict, dim: int = 256, prefix: str = "fc.") -> dict:
    """Return a copy of a published GSoP-Net2 state_dict whose classifier takes mpncov's
    row-major triangle order (so it loads into a model built with ``triu_order='row'``).

    GSoP-Net's triuvec emits the column-major upper triangle; ``fc.weight`` columns are
    permuted accordingly (a leading ``module.`` from DataParallel is stripped).
    """
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    w = sd[prefix + "weight"]
    if w.shape[1] != dim * (dim + 1) // 2:
        raise ValueError(f"{prefix}weight has {w.shape[1]} inputs, expected {dim * (dim + 1) // 2}")
    p = triu_col_order_index(dim, device=w.device)  # vec_col = vec_row[p]
    w_row = torch.empty_like(w)
    w_row[:, p] = w  # y = W_col @ vec_row[p]  =>  W_row[:, p] = W_col
    sd[prefix + "weight"] = w_row
    return sd


def load_published_gsop_net2(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a published GSoP-Net2 checkpoint into ``model``.

    With ``model.triu_order == 'col'`` the weights load unchanged; with 'row' the
    classifier columns are permuted by :func:`convert_gsop_net2_fc`. Either way the
    model computes what the published one does.
    """
    dim = model.head_dim
    if getattr(model, "triu_order", "row") == "col":
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    else:
        sd = convert_gsop_net2_fc(state_dict, dim)
    return model.load_state_dict(sd, strict=strict)
