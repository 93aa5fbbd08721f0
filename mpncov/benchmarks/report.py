"""The printed tables: one line per op row, one per network row."""
from __future__ import annotations

import torch

from .baselines import COMPARED


def error_text(e: Exception, limit: int = 300) -> str:
    """The error column of a row: exception type and the first line of its message."""
    first = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _fmt_t(t):
    if not t:
        return "-"
    return f"{t['median_ms']:.3g}" if t["median_ms"] < 1 else f"{t['median_ms']:.1f}"


def _fmt_mb(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _impl_cell(r: dict) -> str:
    """The implementation, with the space of mpncov's automatic choice: "mpncov (gram)"."""
    return f"{r['impl']} ({r['space']})" if r["impl"] == "mpncov" and r.get("space") else r["impl"]


def format_table(rows: list, device: torch.device) -> str:
    """Aligned table of op rows, a blank line between configurations; TFLOP/s and %peak
    columns on CUDA; "x vs B" = mpncov's fwd+bwd speed-up over baseline B."""
    gpu = device.type == "cuda"
    head = ["op", "shape", "dtype", "impl", "fwd ms", "bwd ms", "fwd+bwd ms (IQR)", "peak MB",
            "saved MB"]
    if gpu:
        head += ["TFLOP/s", "%peak"]
    head += [f"x vs {b}" for b in COMPARED]
    lines = []
    for r in rows:
        if r.get("error"):
            cells = [r["op"], r["shape"], r["dtype"], _impl_cell(r), "ERROR", r["error"][:60]]
            cells += [""] * (len(head) - len(cells))
            lines.append(cells)
            continue
        fb = r["fwdbwd"]
        cells = [r["op"], r["shape"], r["dtype"], _impl_cell(r), _fmt_t(r["fwd"]), _fmt_t(r["bwd"]),
                 f"{_fmt_t(fb)} ({fb['iqr_ms']:.2g})", _fmt_mb(r["peak_mb"]), _fmt_mb(r["saved_mb"])]
        if gpu:
            tf = r.get("fwdbwd_tflops")
            fr = r.get("fwdbwd_frac_peak")
            cells += ["-" if tf is None else f"{tf:.2f}", "-" if fr is None else f"{100 * fr:.1f}"]
        sp = r.get("speedup_fwdbwd", {})
        cells += [f"{sp[b]:.2f}x" if b in sp else "" for b in COMPARED]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(head, widths)),
           sep.join("-" * w for w in widths)]
    prev = None
    for r, cells in zip(rows, lines):
        k = (r["op"], r["shape"], r["dtype"])
        if prev is not None and k != prev:
            out.append("")
        prev = k
        out.append(sep.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(out)


def format_networks(rows: list) -> str:
    out = [f"{'network':24s} {'model':22s} {'batch':>5s} {'img/s':>8s} {'ms/step':>9s} {'params':>12s}"]
    for r in rows:
        if r.get("error"):
            out.append(f"{r['network']:24s} {str(r.get('model')):22s} skipped: {r['error'][:80]}")
            continue
        out.append(f"{r['network']:24s} {r['model']:22s} {r['batch']:5d} {r['images_per_s']:8.2f} "
                   f"{r['fwdbwd']['median_ms']:9.1f} {r['params']:12,d}")
    return "\n".join(out)
