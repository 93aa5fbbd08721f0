"""PNG plots of benchmark results (matplotlib, if installed; nothing is installed for you).

    python -m mpncov.benchmarks.plot benchmarks/results/<tag>/results.json   # re-plot a run

speedup_vs_C.png   one panel per op: mpncov's fwd+bwd speed-up over each baseline against
                   C (one line per baseline and per setting of the other shape parameters
                   and dtype; dashed line at 1x).
pipeline_split.png one panel per pipeline shape: forward / backward median time per
                   implementation, stacked (log-scaled time axis when they differ a lot).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import OPS

COLORS = {"published": "tab:red", "autograd": "tab:blue", "eigh": "tab:green",
          "mpncov": "tab:purple", "mpncov-cov": "tab:olive", "mpncov-gram": "tab:cyan"}


def _mpl():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def make_plots(rows, out_dir, device_label=""):
    """Write the PNGs into out_dir; return the list of paths (empty without matplotlib)."""
    plt = _mpl()
    if plt is None:
        print("note: matplotlib is not installed: plots skipped (results.json/csv are written)")
        return []
    out_dir = Path(out_dir)
    written = []
    ok = [r for r in rows if not r.get("error")]
    p = _speedup_plot(plt, ok, out_dir / "speedup_vs_C.png", device_label)
    if p:
        written.append(p)
    p = _split_plot(plt, ok, out_dir / "pipeline_split.png", device_label)
    if p:
        written.append(p)
    return written


def _speedup_plot(plt, rows, path, device_label):
    from matplotlib import ticker

    ops = [op for op in OPS if any(r["op"] == op and r.get("speedup_fwdbwd") for r in rows)]
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        series = {}
        for r in rows:
            if r["op"] != op or r["impl"] != "mpncov":
                continue
            others = tuple((k, r.get(k)) for k in "BMN" if r.get(k) is not None)
            for base, sp in r.get("speedup_fwdbwd", {}).items():
                series.setdefault((base, others, r["dtype"]), []).append((r["C"], sp))
        labelled = set()
        for (base, others, dt), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            xs, ys = zip(*pts)
            lab = base if base not in labelled else None
            labelled.add(base)
            ax.plot(xs, ys, marker="o", color=COLORS.get(base, "gray"), label=lab,
                    linestyle="-" if dt == "fp32" else ":", alpha=0.8)
            ax.annotate(",".join(f"{k}{v}" for k, v in others) + ("" if dt == "fp32" else f" {dt}"),
                        (xs[-1], ys[-1]), fontsize=6, alpha=0.7,
                        xytext=(3, 0), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="both", labelsize=7)
        cs = sorted({c for pts in series.values() for c, _ in pts})
        ax.set_xticks(cs)
        ax.set_xticklabels([str(c) for c in cs])
        ax.set_xlabel("C")
        ax.set_ylabel("mpncov speed-up, fwd+bwd (x)")
        ax.set_title(op)
        ax.legend(fontsize=7)
    fig.suptitle(f"mpncov speed-up over baselines  {device_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _split_plot(plt, rows, path, device_label):
    pipe = [r for r in rows if r["op"] == "pipeline"]
    groups = {}
    for r in pipe:
        groups.setdefault((r["shape"], r["dtype"]), []).append(r)
    if not groups:
        return None
    keys = list(groups)[:12]
    ncol = min(3, len(keys))
    nrow = (len(keys) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rs = groups[key]
        names = [r["impl"] for r in rs]
        fwd = [r["fwd"]["median_ms"] for r in rs]
        bwd = [r["bwd"]["median_ms"] for r in rs]
        ax.bar(names, fwd, color="tab:blue", label="forward")
        ax.bar(names, bwd, bottom=fwd, color="tab:orange", label="backward")
        if max(f + b for f, b in zip(fwd, bwd)) > 20 * min(f + b for f, b in zip(fwd, bwd)):
            ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"pipeline {key[0]} {key[1]}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"pipeline time split (median)  {device_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    src = Path(argv[0])
    doc = json.loads(src.read_text())
    env = doc.get("env", {})
    label = env.get("gpu_name") or f"{env.get('cpu_model', '')}, {env.get('threads')} threads"
    for p in make_plots(doc["results"], src.parent, label):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
