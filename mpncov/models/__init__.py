"""Model zoo: ResNets, iSQRT-COV ResNets, GSoP-Nets and first-order attention ResNets.

``create_model(name, **kw)`` builds any name in ``list_models()``; keyword arguments
override the defaults of the named constructor (e.g. ``num_classes=10``).
"""
from __future__ import annotations

from .resnet import (ResNet, BasicBlock, Bottleneck, convert_gsop_net2_fc,
                     load_published_gsop_net2)

_LAYERS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]),
           152: (Bottleneck, [3, 8, 36, 3])}

# small models for CPU experiments and tests: 1 BasicBlock per stage, 3x3 stem, no max pool
_TINY = dict(block=BasicBlock, layers=[1, 1, 1, 1], widths=(16, 32, 64, 128), stem_width=16,
             stem="cifar")

_REGISTRY: dict = {}


def _register(fn):
    _REGISTRY[fn.__name__] = fn
    return fn


def _resnet(depth_or_tiny, **kw) -> ResNet:
    if depth_or_tiny == "tiny":
        cfg = dict(_TINY)
        cfg.update(kw)
        return ResNet(cfg.pop("block"), cfg.pop("layers"), **cfg)
    block, layers = _LAYERS[depth_or_tiny]
    return ResNet(kw.pop("block", block), kw.pop("layers", layers), **kw)


def _with(defaults: dict, kw: dict) -> dict:
    out = dict(defaults)
    if "attn_kwargs" in kw and "attn_kwargs" in out:
        merged = dict(out["attn_kwargs"])
        merged.update(kw.pop("attn_kwargs") or {})
        out["attn_kwargs"] = merged
    out.update(kw)
    return out


# ---- plain ResNets -----------------------------------------------------------------
@_register
def resnet18(**kw): return _resnet(18, **kw)
@_register
def resnet34(**kw): return _resnet(34, **kw)
@_register
def resnet50(**kw): return _resnet(50, **kw)
@_register
def resnet101(**kw): return _resnet(101, **kw)
@_register
def resnet152(**kw): return _resnet(152, **kw)


# ---- iSQRT-COV ---------------------------------------------------------------------
_ISQRT = dict(last_stride=1, head="isqrt", head_dim=256, head_iters=5)


@_register
def isqrt_cov_resnet18(**kw): return _resnet(18, **_with(_ISQRT, kw))
@_register
def isqrt_cov_resnet34(**kw): return _resnet(34, **_with(_ISQRT, kw))
@_register
def isqrt_cov_resnet50(**kw):
    """iSQRT-COV ResNet-50: layer4 stride 1, layer_reduce 2048->256 + BN + ReLU, covpool,
    sqrtm(5), triuvec, fc(32896). 56,929,832 parameters at 1000 classes."""
    return _resnet(50, **_with(_ISQRT, kw))
@_register
def isqrt_cov_resnet101(**kw):
    """iSQRT-COV ResNet-101 (75,921,960 parameters at 1000 classes)."""
    return _resnet(101, **_with(_ISQRT, kw))
@_register
def isqrt_cov_resnet152(**kw): return _resnet(152, **_with(_ISQRT, kw))


# ---- GSoP-Net ----------------------------------------------------------------------
def _gsop_cfg(mode, gsop_mode, att_dim, kw):
    mode = int(mode)
    if mode not in (1, 2):
        raise ValueError(f"GSoP-Net mode must be 1 or 2, got {mode!r}")
    cfg = dict(last_stride=1, attn_layer="gsop", attn_blocks="last",
               attn_kwargs=dict(mode=gsop_mode, att_dim=att_dim))
    if mode == 1:
        cfg.update(attn_stages=(1, 2, 3, 4), head="gap")
    else:
        # GSoP-Net's triuvec emits the column-major triangle and a published GSoP-Net2
        # classifier expects it: the default computes what a loaded checkpoint computes.
        cfg.update(attn_stages=(1, 2, 3), head="isqrt", head_dim=256, head_iters=3,
                   triu_order="col")
    return _with(cfg, kw)


@_register
def gsop_resnet50(mode: int = 1, gsop_mode: str = "1", att_dim: int = 128, **kw):
    """GSoP-Net ResNet-50.

    mode=1 (GSoP-Net1): layer4 stride 1, one GSoP block in the last Bottleneck of each
    of the 4 stages, global average pool -> fc(2048) (28,285,224 parameters).
    mode=2 (GSoP-Net2): no stage-4 block, iSQRT-COV head d=256, N=3 -> fc(32896)
    (58,278,568 parameters). ``gsop_mode`` is the block mode ('1' channel, '2'
    position, '+', 'M', '&'). GSoP-Net2 feeds the classifier GSoP-Net's column-major
    triangle (``triu_order='col'``, the default for mode=2), so a published checkpoint
    loads with ``load_state_dict(strict=True)`` and gives the published logits;
    ``triu_order='row'`` (mpncov.triuvec's order) is available, with
    :func:`load_published_gsop_net2` to load a published checkpoint into it.
    """
    return _resnet(50, **_gsop_cfg(mode, gsop_mode, att_dim, kw))


@_register
def gsop_resnet101(mode: int = 1, gsop_mode: str = "1", att_dim: int = 128, **kw):
    """GSoP-Net ResNet-101 (mode 1: 47,277,352, mode 2: 77,270,696 parameters)."""
    return _resnet(101, **_gsop_cfg(mode, gsop_mode, att_dim, kw))


@_register
def gsop1_resnet50(**kw): return gsop_resnet50(mode=1, **kw)
@_register
def gsop2_resnet50(**kw): return gsop_resnet50(mode=2, **kw)
@_register
def gsop1_resnet101(**kw): return gsop_resnet101(mode=1, **kw)
@_register
def gsop2_resnet101(**kw): return gsop_resnet101(mode=2, **kw)


# ---- first-order attention ResNets -------------------------------------------------
@_register
def se_resnet50(**kw): return _resnet(50, **_with(dict(attn_layer="se"), kw))
@_register
def se_resnet101(**kw): return _resnet(101, **_with(dict(attn_layer="se"), kw))
@_register
def eca_resnet50(**kw): return _resnet(50, **_with(dict(attn_layer="eca"), kw))
@_register
def eca_resnet101(**kw): return _resnet(101, **_with(dict(attn_layer="eca"), kw))
@_register
def cbam_resnet50(**kw): return _resnet(50, **_with(dict(attn_layer="cbam"), kw))
@_register
def gct_resnet50(**kw): return _resnet(50, **_with(dict(attn_layer="gct"), kw))
@_register
def gct_resnet101(**kw): return _resnet(101, **_with(dict(attn_layer="gct"), kw))


# ---- tiny models (CPU experiments, tests) ------------------------------------------
_TINY_ISQRT = dict(last_stride=1, head="isqrt", head_dim=32, head_iters=5)


@_register
def resnet_tiny(**kw): return _resnet("tiny", **kw)
@_register
def isqrt_cov_resnet_tiny(**kw): return _resnet("tiny", **_with(_TINY_ISQRT, kw))
@_register
def se_resnet_tiny(**kw):
    return _resnet("tiny", **_with(dict(attn_layer="se", attn_kwargs=dict(rd_ratio=1 / 4)), kw))
@_register
def eca_resnet_tiny(**kw): return _resnet("tiny", **_with(dict(attn_layer="eca"), kw))
@_register
def cbam_resnet_tiny(**kw):
    return _resnet("tiny", **_with(dict(attn_layer="cbam", attn_kwargs=dict(rd_ratio=1 / 4)), kw))
@_register
def gct_resnet_tiny(**kw): return _resnet("tiny", **_with(dict(attn_layer="gct"), kw))
@_register
def gsop_resnet_tiny(mode: int = 1, gsop_mode: str = "1", att_dim: int = 16, **kw):
    cfg = _gsop_cfg(mode, gsop_mode, att_dim, {})
    if int(mode) == 2:
        cfg.update(head_dim=32)
    return _resnet("tiny", **_with(cfg, kw))
@_register
def gsop1_resnet_tiny(**kw): return gsop_resnet_tiny(mode=1, **kw)
@_register
def gsop2_resnet_tiny(**kw): return gsop_resnet_tiny(mode=2, **kw)


def list_models() -> list:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


MODEL_NAMES = tuple(list_models())


def create_model(name: str, **kwargs) -> ResNet:
    """Build the model registered as ``name`` (see :func:`list_models`)."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return fn(**kwargs)


__all__ = ["ResNet", "BasicBlock", "Bottleneck", "create_model", "list_models", "MODEL_NAMES",
           "convert_gsop_net2_fc", "load_published_gsop_net2"] + list(_REGISTRY)
