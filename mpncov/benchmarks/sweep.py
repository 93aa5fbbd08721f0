"""The op sweep: every configuration (op, shape, dtype) for every implementation.

What is measured for each:

* fwd: the training forward (inputs require grad, so the graph is recorded and the
  backward's tensors are saved), i.e. the forward half of a training step.
* bwd: `torch.autograd.grad(out, x, g, retain_graph=True)` on a graph built once outside
  the timed region (g: a fixed random, non-symmetric incoming gradient).
* fwd+bwd: `torch.autograd.grad(f(x), x, g)`.
* memory: one extra, untimed fwd+bwd call (:mod:`.memory`); its output is also compared
  with mpncov's (rel_diff_vs_mpncov) and its gradient checked for finiteness.
* space: for mpncov's pipeline rows, the space its recurrence ran in ("cov" C x C, "gram"
  M x M): chosen by the cost model for "mpncov", forced for "mpncov-cov"/"mpncov-gram".
* effective TFLOP/s (:mod:`.flops`).

Timings (:mod:`.timing`) run in --rounds rounds in which the implementations of one
configuration take turns (mpncov, published, autograd, eigh, mpncov, ...), so that a slow
spell of a shared machine is spread over all of them rather than biasing one speed-up;
the samples of all rounds are pooled. A failing implementation gives a row with its
error and the sweep goes on.
"""
from __future__ import annotations

import contextlib
import gc
import traceback

import torch

from .. import _progress
from .baselines import pipeline_space
from .config import DTYPES, Config, shape_str
from .flops import add_flop_rates
from .memory import measure_memory
from .report import error_text
from .timing import merge_times, sync, time_stmt


def make_input(op: str, s: dict, device: torch.device, seed: int) -> torch.Tensor:
    """The input of `op` at shape `s` (requires grad); covariances for sqrtm are full-rank
    SPD (eigh's gradient needs distinct eigenvalues)."""
    g = torch.Generator().manual_seed(seed)
    B, C = s["B"], s["C"]
    if op in ("covpool", "pipeline"):
        x = torch.randn(B, C, s["M"], generator=g)
    elif op == "sqrtm":
        a = torch.randn(B, C, C, generator=g)
        x = a.bmm(a.transpose(1, 2)) / C + 1e-3 * torch.eye(C)
    else:
        x = torch.randn(B, C, C, generator=g)
    return x.to(device).requires_grad_(True)


def op_fn(impl, op: str, s: dict):
    """x -> impl's `op` at shape `s` (with its iteration count N where the op has one)."""
    f = getattr(impl, op)
    if op in ("sqrtm", "pipeline"):
        n = s["N"]
        return lambda x: f(x, n)
    return f


def _row_head(cfg: Config, impl_name: str, device: torch.device) -> dict:
    op, s, dtype_tag = cfg
    space = pipeline_space(impl_name, s, device) if op == "pipeline" else None
    return {"op": op, "shape": shape_str(op, s), **{k: s.get(k) for k in "BCMN"},
            "dtype": dtype_tag, "impl": impl_name, "space": space, "device": device.type,
            "error": None}


def bench_one(impl, cfg: Config, x, gout_cache: dict, ref_out, args, device):
    """Memory, sanity columns and one round of timings of `impl` on `cfg`.

    Returns (row, this output if impl is mpncov (the reference of the others) else None,
    retime: a function that adds one more round of timings to the row)."""
    op, s, dtype_tag = cfg
    row = _row_head(cfg, impl.name, device)
    f = op_fn(impl, op, s)
    low = DTYPES[dtype_tag]
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=low)) if low is not None \
        else contextlib.nullcontext

    def run_fwd():
        with ctx():
            return f(x)

    out0 = run_fwd()
    key = (tuple(out0.shape), out0.dtype)
    if key not in gout_cache:
        g = torch.Generator().manual_seed(args.seed + 1)
        gout_cache[key] = torch.randn(out0.shape, generator=g).to(device=device, dtype=out0.dtype)
    gout = gout_cache[key]
    del out0

    def run_bwd(out):
        return torch.autograd.grad(out, x, gout, retain_graph=True)[0]

    def run_fwdbwd():
        return torch.autograd.grad(run_fwd(), x, gout)[0]

    label = f"{op} {row['shape']} {dtype_tag} {impl.name}"
    if device.type == "cuda":
        # Warm the backward path too (cuBLAS/cuSOLVER handles and workspaces of the autograd
        # thread are allocated on first use and would otherwise count as peak memory).
        run_fwdbwd()
        sync(device)
    # Memory (untimed) first: also gives the output and gradient for sanity columns.
    peak, saved, out, grad = measure_memory(run_fwd, run_bwd, device)
    row["peak_mb"], row["saved_mb"] = round(peak, 3), round(saved, 3)
    row["grad_finite"] = bool(torch.isfinite(grad).all().item())
    if ref_out is not None:
        o, r = out.detach().float(), ref_out.float()
        row["rel_diff_vs_mpncov"] = (torch.linalg.vector_norm(o - r)
                                     / torch.linalg.vector_norm(r).clamp_min(1e-30)).item()
    new_ref = out.detach() if impl.name == "mpncov" else None
    graph = [out]            # keeps the graph alive for the bwd-only timing
    del grad, out

    def timings(graph):
        mrt, reps = args.min_run_time, args.min_reps
        t = {"fwd": time_stmt(run_fwd, args.threads, mrt, reps, label + " fwd"),
             "bwd": time_stmt(lambda: run_bwd(graph[0]), args.threads, mrt, reps,
                              label + " bwd")}
        graph.clear()        # free the graph before the fwd+bwd timing
        t["fwdbwd"] = time_stmt(run_fwdbwd, args.threads, mrt, reps, label + " fwd+bwd")
        return t

    row.update(timings(graph))

    def retime():
        """One more round of the three timings, pooled into the row (see --rounds)."""
        for k, t in timings([run_fwd()]).items():
            row[k] = merge_times(row[k], t)
        add_flop_rates(row, s, device, args.peak_tflops)

    add_flop_rates(row, s, device, args.peak_tflops)
    return row, new_ref, retime


def run_ops(configs, impl_objs: dict, args, device, notes: list) -> list:
    """Rows of every (configuration, implementation that has its op), with speed-ups."""
    work = [(c, name) for c in configs for name in impl_objs if c.op in impl_objs[name].ops]
    rows = []
    prog = _progress.ItemProgress(len(work) * args.rounds, "ops")
    gout_cache = {}
    for cfg in configs:
        op, s, dt = cfg
        gout_cache.clear()
        x = make_input(op, s, device, args.seed)
        ref = None
        retimes = []
        for name, impl in impl_objs.items():
            if op not in impl.ops:
                continue
            prog.start(f"{op} {shape_str(op, s)} {dt} {name}")
            try:
                row, new_ref, retime = bench_one(impl, cfg, x, gout_cache,
                                                 ref if name != "mpncov" else None, args, device)
                retimes.append((name, retime))
                if new_ref is not None:
                    ref = new_ref
            except Exception as e:  # record and go on: one failure must not end a sweep
                row = {**_row_head(cfg, name, device), "error": error_text(e)}
                if args.verbose:
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                prog.advance(args.rounds - 1)  # no further rounds for a failed configuration
            rows.append(row)
            prog.advance()
            gc.collect()
        # Further rounds: the implementations take turns, so a slow spell of a shared
        # machine is spread over all of them instead of biasing one ratio.
        for r in range(1, args.rounds):
            for name, retime in retimes:
                prog.start(f"{op} {shape_str(op, s)} {dt} {name} (round {r + 1})")
                try:
                    retime()
                except Exception as e:  # keep the earlier rounds' samples
                    notes.append(f"{op} {shape_str(op, s)} {dt} {name}: round {r + 1} failed: "
                                 f"{error_text(e, 200)}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                prog.advance()
                gc.collect()
        del x, ref, retimes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    prog.close()
    add_speedups(rows)
    return rows


def add_speedups(rows: list) -> None:
    """speedup_{fwd,bwd,fwdbwd}[baseline] = baseline median / mpncov median, on mpncov's
    row of each configuration."""
    by_cfg = {}
    for r in rows:
        by_cfg.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    for group in by_cfg.values():
        m = group.get("mpncov")
        if not m or m.get("error"):
            continue
        for name, r in group.items():
            if name == "mpncov" or r.get("error"):
                continue
            for k in ("fwd", "bwd", "fwdbwd"):
                m.setdefault(f"speedup_{k}", {})[name] = r[k]["median_ms"] / m[k]["median_ms"]
