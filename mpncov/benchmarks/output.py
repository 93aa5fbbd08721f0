"""The files of a run: results.json (everything), results.csv (one line per op row),
networks.csv (one line per network row, when the network section ran)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .baselines import COMPARED
from .flops import SUMMARY as FLOP_MODEL

SCHEMA = 1
CSV_FIELDS = ("op", "shape", "B", "C", "M", "N", "dtype", "impl", "space", "device",
              "fwd_median_ms", "fwd_iqr_ms", "fwd_runs", "bwd_median_ms", "bwd_iqr_ms", "bwd_runs",
              "fwdbwd_median_ms", "fwdbwd_iqr_ms", "fwdbwd_runs", "peak_mb", "saved_mb",
              "flops_fwd", "flops_bwd", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops",
              "peak_tflops", "fwdbwd_frac_peak",
              *(f"speedup_fwdbwd_vs_{b}" for b in COMPARED),
              "rel_diff_vs_mpncov", "grad_finite", "error")
NETWORK_CSV_FIELDS = ("network", "model", "device", "batch", "image_size", "params",
                      "images_per_s", "fwdbwd_median_ms", "fwdbwd_iqr_ms", "error")


def _blank_none(d: dict) -> dict:
    return {k: ("" if v is None else v) for k, v in d.items()}


def csv_row(r: dict) -> dict:
    """One op row flattened to CSV_FIELDS (timings: median, IQR, sample count)."""
    flat = {k: r.get(k) for k in CSV_FIELDS}
    for k in ("fwd", "bwd", "fwdbwd"):
        t = r.get(k)
        if t:
            flat[f"{k}_median_ms"] = round(t["median_ms"], 6)
            flat[f"{k}_iqr_ms"] = round(t["iqr_ms"], 6)
            flat[f"{k}_runs"] = t["runs"]
    for b in COMPARED:
        v = r.get("speedup_fwdbwd", {}).get(b)
        flat[f"speedup_fwdbwd_vs_{b}"] = None if v is None else round(v, 4)
    return _blank_none(flat)


def network_csv_row(r: dict) -> dict:
    t = r.get("fwdbwd") or {}
    return _blank_none({**{k: r.get(k) for k in NETWORK_CSV_FIELDS},
                        "fwdbwd_median_ms": t.get("median_ms"), "fwdbwd_iqr_ms": t.get("iqr_ms")})


def _write_csv(path: Path, fields, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_outputs(out_dir: Path, env: dict, settings: dict, rows: list, net_rows: list,
                  notes: list) -> list:
    """Write the files into out_dir (created if missing); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "env": env,
        "settings": settings,
        "flop_model": FLOP_MODEL,
        "memory_method": settings["memory_method"],
        "results": rows,
        "networks": net_rows,
        "notes": notes,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    _write_csv(out_dir / "results.csv", CSV_FIELDS, (csv_row(r) for r in rows))
    written = [out_dir / "results.json", out_dir / "results.csv"]
    if net_rows:
        _write_csv(out_dir / "networks.csv", NETWORK_CSV_FIELDS,
                   (network_csv_row(r) for r in net_rows))
        written.append(out_dir / "networks.csv")
    return written
