"""Timing of one statement: torch.utils.benchmark, summarised as median and IQR.

Times come from torch.utils.benchmark (Timer.blocked_autorange with --min-run-time,
topped up with single-block runs to at least --min-reps samples). The Timer synchronises
CUDA before reading the clock and runs with --threads torch threads. Samples of several
rounds of the same statement are pooled (:func:`merge_times`) and reported as the median
and the inter-quartile range (IQR) of the per-call times; all samples are kept in the
result as times_ms.
"""
from __future__ import annotations

import statistics

import torch
import torch.utils.benchmark as tbench


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stats(times_s, number_per_run: int) -> dict:
    """Summary of per-call times (seconds): median, IQR and min in ms, and all samples."""
    times = sorted(times_s)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median_ms": statistics.median(times) * 1e3,
        "iqr_ms": (q[2] - q[0]) * 1e3,
        "min_ms": times[0] * 1e3,
        "runs": len(times),
        "number_per_run": number_per_run,
        "times_ms": [round(t * 1e3, 6) for t in times],
    }


def time_stmt(f, threads: int, min_run_time: float, min_reps: int, label: str) -> dict:
    """Time f() (see the module docstring); returns :func:`time_stats`."""
    timer = tbench.Timer(stmt="f()", globals={"f": f}, num_threads=threads, label=label)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_reps:
        times.extend(timer.timeit(m.number_per_run).times)
    return time_stats(times, m.number_per_run)


def merge_times(a: dict, b: dict) -> dict:
    """Pool the samples of two time_stmt results of the same statement."""
    return time_stats([t * 1e-3 for t in a["times_ms"] + b["times_ms"]], a["number_per_run"])
