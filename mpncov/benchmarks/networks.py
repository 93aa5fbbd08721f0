"""The network section (--networks): images/s of one training step of whole networks.

Each network runs forward + cross-entropy + backward on random images (--net-batch of
--net-size pixels, 4 on CPU and 64 on CUDA by default), timed like the ops
(:mod:`.timing`); a network that cannot be built or run gives a row with its error.
"""
from __future__ import annotations

import gc
import traceback

import torch

from .. import _progress
from .report import error_text
from .timing import time_stmt

# (title, name in mpncov.models)
NETWORKS = (
    ("ResNet-50 + GAP", "resnet50"),
    ("ResNet-50 + SE", "se_resnet50"),
    ("GSoP-Net1 ResNet-50", "gsop1_resnet50"),
    ("GSoP-Net2 ResNet-50", "gsop2_resnet50"),
    ("iSQRT-COV ResNet-50", "isqrt_cov_resnet50"),
)


def run_networks(args, device: torch.device, notes: list) -> list:
    """One row per network of `args.network_names` (comma list; default NETWORKS)."""
    from mpncov.models import create_model

    wanted = NETWORKS
    if args.network_names:
        wanted = tuple((n.strip(), n.strip()) for n in args.network_names.split(",") if n.strip())
    bs = args.net_batch or (4 if device.type == "cpu" else 64)
    size = args.net_size
    rows = []
    prog = _progress.ItemProgress(len(wanted), "networks")
    for title, name in wanted:
        prog.start(title)
        row = {"network": title, "model": None, "batch": bs, "image_size": size,
               "device": device.type, "error": None}
        try:
            model = create_model(name)
        except Exception as e:
            row["error"] = f"create_model({name!r}): {error_text(e)}"
            notes.append(f"network {title}: skipped ({row['error']})")
            rows.append(row)
            prog.advance()
            continue
        row["model"] = name
        try:
            model = model.to(device).train()
            row["params"] = sum(p.numel() for p in model.parameters())
            g = torch.Generator().manual_seed(args.seed)
            xb = torch.randn(bs, 3, size, size, generator=g).to(device)
            with torch.no_grad():
                n_cls = model(xb[:2].contiguous()).shape[-1]
            target = torch.randint(0, n_cls, (bs,), generator=g).to(device)

            def step():
                loss = torch.nn.functional.cross_entropy(model(xb), target)
                loss.backward()
                for p in model.parameters():
                    p.grad = None

            t = time_stmt(step, args.threads, args.min_run_time, max(2, args.min_reps - 1),
                          f"net {title}")
            row["fwdbwd"] = t
            row["images_per_s"] = bs / (t["median_ms"] * 1e-3)
        except Exception as e:
            row["error"] = error_text(e)
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        model = None     # free this network (and its graph) before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        prog.advance()
    prog.close()
    return rows
