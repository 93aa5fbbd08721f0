"""Peak and saved memory of one (untimed) forward+backward call.

* CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the call
  (peak_mb), and memory_allocated() right after the forward minus that base (saved_mb:
  output + tensors kept for backward).
* CPU: torch has no CPU allocator statistics and tracemalloc does not see its
  allocations, so the call runs under torch.profiler with profile_memory=True; every
  allocation and free made through c10's CPU allocator is recorded as a "[memory]" event
  with its signed byte count; peak_mb is the maximum running sum of those events over the
  call (bytes alive above the state before the call), saved_mb the running sum when the
  backward starts. Memory obtained outside c10's allocator (BLAS/LAPACK workspaces,
  std::vector scratch in kernels) is NOT counted. Inputs and the incoming gradient are
  allocated before the call and not counted either.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

import mpncov

from .timing import sync


def method(device: torch.device) -> str:
    """One line saying how memory was measured on `device` (stored with the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() - allocated before the call"
    return ("torch.profiler profile_memory: max running sum of c10 CPU allocator "
            "[memory] events during one fwd+bwd call (BLAS/LAPACK/std scratch not seen)")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints profiler_start/stop lines from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_memory(run_fwd, run_bwd, device: torch.device):
    """(peak_mb, saved_mb, out, grad) of out = run_fwd(); grad = run_bwd(out)."""
    mb = 1.0 / 2**20
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = run_fwd()
        sync(device)
        saved = torch.cuda.memory_allocated(device) - base
        grad = run_bwd(out)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return peak * mb, saved * mb, out, grad
    from torch.profiler import ProfilerActivity, profile, record_function

    # mpncov keeps the buffer of sqrtm's saved iterates for reuse between calls; drop it,
    # so that this call allocates it again and the profiler counts it.
    mpncov.release_cpu_buffers()

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("mpncov_bench::fwd"):
            out = run_fwd()
        with record_function("mpncov_bench::bwd"):
            grad = run_bwd(out)
    events = prof.profiler.kineto_results.events()
    bwd_start = min((e.start_ns() for e in events if e.name() == "mpncov_bench::bwd"),
                    default=None)
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    cum = peak = 0
    saved = None
    for t, nb in mem:
        if saved is None and bwd_start is not None and t >= bwd_start:
            saved = cum
        cum += nb
        peak = max(peak, cum)
    if saved is None:
        saved = cum
    return peak * mb, max(saved, 0) * mb, out, grad
