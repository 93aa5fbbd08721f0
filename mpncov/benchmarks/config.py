"""What the op benchmark runs: ops, shape grids, the preset sets, dtypes, timing presets.

A configuration is one (op, shape, dtype); every implementation that supports the op
(:mod:`mpncov.benchmarks.baselines`) is timed on it. mpncov's pipeline in each of its two
spaces is an implementation of its own there ("mpncov-cov", "mpncov-gram", next to the
automatic "mpncov"), so the grids below stay as they are.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

OPS = ("covpool", "sqrtm", "triuvec", "pipeline")
# The shape keys each op reads: B batch, C channels, M positions (H*W), N iterations.
OP_KEYS = {
    "covpool": ("B", "C", "M"),
    "sqrtm": ("B", "C", "N"),
    "triuvec": ("B", "C"),
    "pipeline": ("B", "C", "M", "N"),
}
SHAPE_KEYS = ("B", "C", "M", "N")
SHAPE_DEFAULTS = {"M": 196, "N": 5}
FULL_GRID = {"B": (32, 128), "C": (64, 128, 256), "M": (196, 784), "N": (3, 5)}
# --quick: the CPU targets, plus one shape of each remaining op.
QUICK = (
    ("pipeline", {"B": 32, "C": 256, "M": 196, "N": 5}),
    ("pipeline", {"B": 64, "C": 64, "M": 196, "N": 3}),
    ("covpool", {"B": 32, "C": 128, "M": 784}),
    ("sqrtm", {"B": 32, "C": 128, "N": 5}),
    ("triuvec", {"B": 32, "C": 256}),
)
# --quick on CUDA: every op at the two GPU target shapes of the CUDA issue.
QUICK_CUDA = tuple((op, s) for s in ({"B": 128, "C": 256, "M": 196, "N": 5},
                                     {"B": 128, "C": 128, "M": 784, "N": 3}) for op in OPS)
SMOKE = tuple((op, {"B": 2, "C": 8, "M": 16, "N": 3}) for op in OPS)

# Row dtype tag -> autocast dtype (None: plain float32 inputs, no autocast).
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# Timing presets per mode (each overridable on the command line): seconds per
# blocked_autorange, minimum timed samples per measurement, rounds per configuration.
MIN_RUN_TIME = {"smoke": 0.01, "quick": 0.2, "full": 0.5, "shapes": 0.5, "networks": 0.5}
MIN_REPS = {"smoke": 3, "quick": 3, "full": 5, "shapes": 5, "networks": 5}
ROUNDS = {"smoke": 1, "quick": 3, "full": 2, "shapes": 2, "networks": 2}


class Config(NamedTuple):
    """One benchmarked configuration; every implementation of `op` runs on it."""
    op: str
    shape: dict
    dtype: str


def shape_str(op: str, shape: dict) -> str:
    """"B=32,C=256,M=196,N=5": the keys `op` reads, in order."""
    return ",".join(f"{k}={shape[k]}" for k in OP_KEYS[op])


def parse_shapes(text: str) -> list:
    """Parse "B=32,C=256,M=196,N=5; B=64,C=64" into dicts (ITERS is an alias of N).

    Raises ValueError naming the part that is not a positive integer or not a known key.
    """
    shapes = []
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        d = {}
        for kv in part.split(","):
            k, _, v = kv.partition("=")
            k = k.strip().upper()
            if k == "ITERS":
                k = "N"
            if k not in SHAPE_KEYS or not v.strip():
                raise ValueError(f"cannot parse {kv.strip()!r} in {part!r} "
                                 "(use B=..,C=..,M=..,N=..)")
            try:
                d[k] = int(v)
            except ValueError:
                raise ValueError(f"{k}={v.strip()!r} in {part!r} is not an integer") from None
            if d[k] < 1:
                raise ValueError(f"{k}={d[k]} in {part!r} must be >= 1")
        if "B" not in d or "C" not in d:
            raise ValueError(f"{part!r} needs at least B and C")
        shapes.append(d)
    if not shapes:
        raise ValueError(f"no shape in {text!r}")
    return shapes


def base_set(mode: str, device_type: str = "cpu", shapes=None):
    """The (op, shape) pairs of a mode: 'smoke', 'quick', 'full', 'shapes' (then `shapes`,
    parsed dicts, each run for every op) or 'networks' (none: only networks run)."""
    if mode == "networks":
        return []
    if mode == "smoke":
        return [(op, dict(s)) for op, s in SMOKE]
    if mode == "shapes":
        return [(op, {**SHAPE_DEFAULTS, **s}) for s in shapes for op in OPS]
    if mode == "full":
        return [(op, dict(zip(OP_KEYS[op], vals))) for op in OPS
                for vals in itertools.product(*(FULL_GRID[k] for k in OP_KEYS[op]))]
    if mode == "quick":
        return [(op, dict(s)) for op, s in (QUICK_CUDA if device_type == "cuda" else QUICK)]
    raise ValueError(f"unknown mode {mode!r}")


def build_configs(mode: str, ops, dtypes, shapes=None, device_type: str = "cpu") -> list:
    """The configurations of a run: the mode's set restricted to `ops` (kept in OPS order),
    each shape reduced to the keys its op reads (duplicates dropped), times `dtypes`."""
    out, seen = [], set()
    for op, s in base_set(mode, device_type, shapes):
        if op not in ops:
            continue
        s = {k: s.get(k, SHAPE_DEFAULTS.get(k)) for k in OP_KEYS[op]}
        key = (op, tuple(sorted(s.items())))
        if key in seen:
            continue
        seen.add(key)
        out.extend(Config(op, s, dt) for dt in dtypes)
    return out
