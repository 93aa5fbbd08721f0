"""Layers of mpncov: covariance pooling modules, the iSQRT-COV head and attention blocks."""
from .pooling import (CovPool, Sqrtm, Triuvec, MPNCOV, TokenBatchNorm, triu_col_order_index,
                      triu_row_to_col)
from .attention import SE, ECA, CBAM, GCT, GSoP, create_attn, get_act_layer, gsop_forward, ATTN_NAMES

__all__ = ["CovPool", "Sqrtm", "Triuvec", "MPNCOV", "TokenBatchNorm", "triu_col_order_index",
           "triu_row_to_col",
           "SE", "ECA", "CBAM", "GCT", "GSoP", "create_attn", "get_act_layer", "gsop_forward",
           "ATTN_NAMES"]
