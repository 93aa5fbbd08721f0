"""Micro-benchmarks of mpncov against the reference implementations.

    python -m benchmarks.run                  # = --quick (about two minutes on 2 CPU cores)
    python -m benchmarks.run --full           # the whole grid
    python -m benchmarks.run --ops covpool,pipeline --impls mpncov,published \\
                             --shapes "B=32,C=256,M=196,N=5;B=64,C=64,M=196,N=3"
    python -m benchmarks.run --networks       # network-level images/s only
    python -m benchmarks.run --smoke --out /tmp/x   # tiny end-to-end check (tests)

What is measured, for every (op, shape, dtype, implementation):

* fwd: the training forward (inputs require grad, so the graph is recorded and the
  backward's tensors are saved), i.e. the forward half of a training step.
* bwd: `torch.autograd.grad(out, x, g, retain_graph=True)` on a graph built once outside
  the timed region (g: a fixed random, non-symmetric incoming gradient).
* fwd+bwd: `torch.autograd.grad(f(x), x, g)`.
  Times come from torch.utils.benchmark (Timer.blocked_autorange with --min-run-time,
  topped up with single-block runs to at least --min-reps samples), in --rounds rounds in
  which the implementations of one configuration take turns (mpncov, published, autograd,
  eigh, mpncov, ...), so that a slow spell of a shared machine is spread over all of them
  rather than biasing one speed-up; the samples of all rounds are pooled and reported as
  the median and the inter-quartile range (IQR) of the per-call times (all samples are in
  the JSON as times_ms). The Timer
  synchronises CUDA before reading the clock, and runs with --threads torch threads.
* memory (one extra, untimed fwd+bwd call):
  - CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the call
    (peak_mb), and memory_allocated() right after the forward minus that base
    (saved_mb: output + tensors kept for backward).
  - CPU: torch has no CPU allocator statistics and tracemalloc does not see its
    allocations, so the call runs under torch.profiler with profile_memory=True; every
    allocation and free made through c10's CPU allocator is recorded as a "[memory]"
    event with its signed byte count; peak_mb is the maximum running sum of those events
    over the call (bytes alive above the state before the call), saved_mb the running sum
    when the backward starts. Memory obtained outside c10's allocator (BLAS/LAPACK
    workspaces, std::vector scratch in kernels) is NOT counted. Inputs and the incoming
    gradient are allocated before the call and not counted either.
* effective TFLOP/s (every device; printed on CUDA): a fixed count of the products the
  algorithm needs (the FLOP model below) divided by the time. The same numerator is used
  for every implementation, so the ratio of two TFLOP/s values is their speed ratio;
  an implementation doing extra work (the published dense centring matrix, its 10N-12
  backward products) does not get credit for it. Fraction of peak uses the GPU's FP32
  (non-tensor-core) peak for fp32 rows and its dense FP16/BF16 tensor-core peak for
  autocast rows, from a small table, or --peak-tflops for all rows. (mpncov computes in
  float32 even under autocast, by design, so its autocast rows are still FP32 work.)

FLOP model, per sample, d = C, one d x d product = 2 d^3 flops (SPEC section 7):
  covpool   fwd 2 d^2 M                  bwd 2 d^2 M           ((G+G^T) Xc)
  sqrtm     fwd (3N-3) products (N>=2; 1 for N=1)
            bwd (6N-6) products (N>=2; 2 for N=1): the count of mpncov's backward
            (csrc/cpu/sqrtm_cpu.cpp: last step 4, each middle step 6 via the shared
            dT = Yk dY + dZ Zk, first step 2), equal to plain autograd's count (SPEC
            section 7); the published backward does 10N-12. (mpncov computes only the
            upper triangle of symmetric products; that saving is not counted.)
  triuvec   0 (memory-bound; no TFLOP/s reported)
  pipeline  covpool + sqrtm
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

import mpncov
from benchmarks import baselines
from benchmarks import env as envmod

OPS = ("covpool", "sqrtm", "triuvec", "pipeline")
OP_KEYS = {
    "covpool": ("B", "C", "M"),
    "sqrtm": ("B", "C", "N"),
    "triuvec": ("B", "C"),
    "pipeline": ("B", "C", "M", "N"),
}
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

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# (substring of the device name, FP32 non-tensor TFLOP/s, dense FP16/BF16 tensor TFLOP/s).
# First match wins, so more specific names come first. Vendor datasheet numbers.
GPU_PEAKS = (
    ("H100 PCIe", 51.0, 756.0),
    ("H100 NVL", 60.0, 835.0),
    ("GH200", 67.0, 989.0),
    ("H200", 67.0, 989.0),
    ("H100", 67.0, 989.0),      # SXM
    ("H800", 67.0, 989.0),
    ("A100", 19.5, 312.0),
    ("A800", 19.5, 312.0),
    ("L40S", 91.6, 362.0),
    ("L40", 90.5, 181.0),
    ("L4", 30.3, 121.0),
    ("A10", 31.2, 125.0),
    ("A6000", 38.7, 155.0),
    ("V100", 15.7, 125.0),
    ("T4", 8.1, 65.0),
    ("RTX 4090", 82.6, 165.0),
    ("RTX 3090", 35.6, 71.0),
)


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
class Progress:
    """A tiny progress bar on stderr (tqdm may not be installed)."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 28):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, label: str):
        """Call before starting an item: shows what is running now."""
        self._draw(label)

    def advance(self):
        self.done += 1

    def _draw(self, label):
        frac = self.done / self.total
        fill = int(round(frac * self.width))
        el = time.perf_counter() - self.t0
        eta = (el / self.done * (self.total - self.done)) if self.done else float("nan")
        eta_s = "?" if math.isnan(eta) else f"{eta:4.0f}s"
        line = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{el:4.0f}s eta {eta_s}  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        self._draw("done")
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def shape_str(op, shape):
    return ",".join(f"{k}={shape[k]}" for k in OP_KEYS[op])


def parse_shapes(text: str):
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
            if k not in ("B", "C", "M", "N") or not v.strip():
                raise SystemExit(f"--shapes: cannot parse {kv!r} (use B=..,C=..,M=..,N=..)")
            d[k] = int(v)
        if "B" not in d or "C" not in d:
            raise SystemExit(f"--shapes: {part!r} needs at least B and C")
        shapes.append(d)
    return shapes


def build_configs(args):
    ops = [o for o in OPS if o in args.ops]
    out = []
    if args.smoke:
        base = [(op, dict(s)) for op, s in SMOKE]
    elif args.shapes:
        base = [(op, {**SHAPE_DEFAULTS, **s}) for s in parse_shapes(args.shapes) for op in OPS]
    elif args.full:
        base = []
        for op in OPS:
            keys = OP_KEYS[op]
            for vals in itertools.product(*(FULL_GRID[k] for k in keys)):
                base.append((op, dict(zip(keys, vals))))
    else:
        base = [(op, dict(s)) for op, s in (QUICK_CUDA if args.device == "cuda" else QUICK)]
    seen = set()
    for op, s in base:
        if op not in ops:
            continue
        s = {k: s.get(k, SHAPE_DEFAULTS.get(k)) for k in OP_KEYS[op]}
        key = (op, tuple(sorted(s.items())))
        if key in seen:
            continue
        seen.add(key)
        for dt in args.dtypes:
            out.append((op, s, dt))
    return out


def flops(op, s):
    """(forward, backward) flops of the FLOP model (module docstring), whole batch."""
    B, d = s["B"], s["C"]
    prod = 2.0 * d ** 3
    cov = 2.0 * d * d * s.get("M", 0)
    n = s.get("N", 0)
    sq_f = prod * (1 if n == 1 else 3 * n - 3)
    sq_b = prod * (2 if n == 1 else 6 * n - 6)
    f, b = {
        "covpool": (cov, cov),
        "sqrtm": (sq_f, sq_b),
        "triuvec": (0.0, 0.0),
        "pipeline": (cov + sq_f, cov + sq_b),
    }[op]
    return B * f, B * b


def gpu_peak(device, dtype_tag, override):
    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for sub, fp32, lowp in GPU_PEAKS:
        if sub.lower() in name.lower():
            if dtype_tag == "fp32":
                return fp32, f"{sub} FP32 (table)"
            return lowp, f"{sub} dense FP16/BF16 tensor (table)"
    return None, None


def make_input(op, s, device, seed):
    g = torch.Generator().manual_seed(seed)
    B, C = s["B"], s["C"]
    if op in ("covpool", "pipeline"):
        x = torch.randn(B, C, s["M"], generator=g)
    elif op == "sqrtm":
        # Full-rank SPD (eigh's gradient needs distinct eigenvalues).
        a = torch.randn(B, C, C, generator=g)
        x = a.bmm(a.transpose(1, 2)) / C + 1e-3 * torch.eye(C)
    else:
        x = torch.randn(B, C, C, generator=g)
    return x.to(device).requires_grad_(True)


def op_fn(impl, op, s):
    f = getattr(impl, op)
    if op in ("sqrtm", "pipeline"):
        n = s["N"]
        return lambda x: f(x, n)
    return f


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stats(times_s, number_per_run):
    """Summary of per-call times (seconds): median, IQR and min in ms."""
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


def time_stmt(f, threads, min_run_time, min_reps, label):
    timer = tbench.Timer(stmt="f()", globals={"f": f}, num_threads=threads, label=label)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_reps:
        times.extend(timer.timeit(m.number_per_run).times)
    return time_stats(times, m.number_per_run)


def merge_times(a, b):
    """Pool the samples of two time_stmt results of the same statement."""
    return time_stats([t * 1e-3 for t in a["times_ms"] + b["times_ms"]], a["number_per_run"])


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


def measure_memory(run_fwd, run_bwd, device):
    """(peak_mb, saved_mb, out, grad) of one fwd+bwd call; see module docstring."""
    mb = 1.0 / 2**20
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = run_fwd()
        _sync(device)
        saved = torch.cuda.memory_allocated(device) - base
        grad = run_bwd(out)
        _sync(device)
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


# ----------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------
def bench_one(impl, op, s, dtype_tag, x, gout_cache, ref_out, args, device):
    row = {"op": op, "shape": shape_str(op, s), **{k: s.get(k) for k in "BCMN"},
           "dtype": dtype_tag, "impl": impl.name, "device": device.type, "error": None}
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
        _sync(device)
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
        add_flop_rates(row, op, s, dtype_tag, args, device)

    add_flop_rates(row, op, s, dtype_tag, args, device)
    return row, new_ref, retime


def add_flop_rates(row, op, s, dtype_tag, args, device):
    f_fl, b_fl = flops(op, s)
    row["flops_fwd"], row["flops_bwd"] = f_fl, b_fl
    if f_fl > 0:
        for k, fl in (("fwd", f_fl), ("bwd", b_fl), ("fwdbwd", f_fl + b_fl)):
            row[f"{k}_tflops"] = fl / (row[k]["median_ms"] * 1e-3) / 1e12
        peak_t, src = gpu_peak(device, dtype_tag, args.peak_tflops)
        if peak_t:
            row["peak_tflops"], row["peak_source"] = peak_t, src
            row["fwdbwd_frac_peak"] = row["fwdbwd_tflops"] / peak_t


def run_ops(args, device, impl_objs, notes):
    configs = build_configs(args)
    work = [(c, name) for c in configs for name in impl_objs if c[0] in impl_objs[name].ops]
    rows = []
    prog = Progress(len(work) * args.rounds)
    gout_cache = {}
    for (op, s, dt) in configs:
        gout_cache.clear()
        x = make_input(op, s, device, args.seed)
        ref = None
        retimes = []
        for name, impl in impl_objs.items():
            if op not in impl.ops:
                continue
            prog.step(f"{op} {shape_str(op, s)} {dt} {name}")
            try:
                row, new_ref, retime = bench_one(impl, op, s, dt, x, gout_cache,
                                                 ref if name != "mpncov" else None, args, device)
                retimes.append((name, retime))
                if new_ref is not None:
                    ref = new_ref
            except Exception as e:  # record and go on: one failure must not end a sweep
                row = {"op": op, "shape": shape_str(op, s), **{k: s.get(k) for k in "BCMN"},
                       "dtype": dt, "impl": name, "device": device.type,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                if args.verbose:
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                for _ in range(1, args.rounds):
                    prog.advance()  # no further rounds for a failed configuration
            rows.append(row)
            prog.advance()
            gc.collect()
        # Further rounds: the implementations take turns, so a slow spell of a shared
        # machine is spread over all of them instead of biasing one ratio.
        for r in range(1, args.rounds):
            for name, retime in retimes:
                prog.step(f"{op} {shape_str(op, s)} {dt} {name} (round {r + 1})")
                try:
                    retime()
                except Exception as e:  # keep the earlier rounds' samples
                    notes.append(f"{op} {shape_str(op, s)} {dt} {name}: round {r + 1} failed: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
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


def add_speedups(rows):
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


# ----------------------------------------------------------------------------------------
# network-level section
# ----------------------------------------------------------------------------------------
# (title, candidate names in mpncov.models; the first that exists is used)
NETWORKS = (
    ("ResNet-50 + GAP", ("resnet50",)),
    ("ResNet-50 + SE", ("se_resnet50", "resnet50_se", "seresnet50")),
    ("GSoP-Net1 ResNet-50", ("gsop1_resnet50", "gsop_net1_resnet50", "gsopnet1_resnet50")),
    ("GSoP-Net2 ResNet-50", ("gsop2_resnet50", "gsop_net2_resnet50", "gsopnet2_resnet50")),
    ("iSQRT-COV ResNet-50", ("isqrt_cov_resnet50", "mpncov_resnet50", "isqrtcov_resnet50")),
)


def _list_models(models_mod):
    for fname in ("list_models", "available_models", "model_names"):
        fn = getattr(models_mod, fname, None)
        if callable(fn):
            try:
                return set(fn())
            except Exception:
                pass
    for attr in ("MODELS", "_MODELS", "_REGISTRY", "REGISTRY", "model_registry"):
        reg = getattr(models_mod, attr, None)
        if isinstance(reg, dict):
            return set(reg)
    return None


def run_networks(args, device, notes):
    try:
        import mpncov.models as models_mod
        create = models_mod.create_model
    except Exception as e:
        msg = f"network section skipped: mpncov.models.create_model unavailable ({type(e).__name__}: {e})"
        print(msg)
        notes.append(msg)
        return []
    known = _list_models(models_mod)
    wanted = NETWORKS
    if args.network_names:
        wanted = tuple((n, (n,)) for n in args.network_names.split(","))
    bs = args.net_batch or (4 if device.type == "cpu" else 64)
    size = args.net_size
    rows = []
    prog = Progress(len(wanted))
    for title, candidates in wanted:
        prog.step(title)
        names = [c for c in candidates if known is None or c in known]
        row = {"network": title, "model": None, "batch": bs, "image_size": size,
               "device": device.type, "error": None}
        model = None
        for name in names:
            try:
                model = create(name)
                row["model"] = name
                break
            except Exception as e:
                row["error"] = f"create_model({name!r}): {type(e).__name__}: {e}"
        if model is None:
            row["error"] = row["error"] or f"no model named any of {list(candidates)}"
            notes.append(f"network {title}: skipped ({row['error']})")
            rows.append(row)
            prog.advance()
            continue
        row["error"] = None
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
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        prog.advance()
    prog.close()
    return rows


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------
BASELINE_ORDER = ("published", "autograd", "eigh")


def _fmt_t(t):
    if not t:
        return "-"
    return f"{t['median_ms']:.3g}" if t["median_ms"] < 1 else f"{t['median_ms']:.1f}"


def _fmt_mb(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def format_table(rows, device):
    gpu = device.type == "cuda"
    head = ["op", "shape", "dtype", "impl", "fwd ms", "bwd ms", "fwd+bwd ms (IQR)", "peak MB",
            "saved MB"]
    if gpu:
        head += ["TFLOP/s", "%peak"]
    head += [f"x vs {b}" for b in BASELINE_ORDER]
    lines = []
    for r in rows:
        if r.get("error"):
            cells = [r["op"], r["shape"], r["dtype"], r["impl"], "ERROR", r["error"][:60]]
            cells += [""] * (len(head) - len(cells))
            lines.append(cells)
            continue
        fb = r["fwdbwd"]
        cells = [r["op"], r["shape"], r["dtype"], r["impl"], _fmt_t(r["fwd"]), _fmt_t(r["bwd"]),
                 f"{_fmt_t(fb)} ({fb['iqr_ms']:.2g})", _fmt_mb(r["peak_mb"]), _fmt_mb(r["saved_mb"])]
        if gpu:
            tf = r.get("fwdbwd_tflops")
            fr = r.get("fwdbwd_frac_peak")
            cells += ["-" if tf is None else f"{tf:.2f}", "-" if fr is None else f"{100 * fr:.1f}"]
        sp = r.get("speedup_fwdbwd", {})
        cells += [f"{sp[b]:.2f}x" if b in sp else "" for b in BASELINE_ORDER]
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


def format_networks(rows):
    out = [f"{'network':24s} {'model':22s} {'batch':>5s} {'img/s':>8s} {'ms/step':>9s} {'params':>12s}"]
    for r in rows:
        if r.get("error"):
            out.append(f"{r['network']:24s} {str(r.get('model')):22s} skipped: {r['error'][:80]}")
            continue
        out.append(f"{r['network']:24s} {r['model']:22s} {r['batch']:5d} {r['images_per_s']:8.2f} "
                   f"{r['fwdbwd']['median_ms']:9.1f} {r['params']:12,d}")
    return "\n".join(out)


CSV_FIELDS = ("op", "shape", "B", "C", "M", "N", "dtype", "impl", "device",
              "fwd_median_ms", "fwd_iqr_ms", "fwd_runs", "bwd_median_ms", "bwd_iqr_ms", "bwd_runs",
              "fwdbwd_median_ms", "fwdbwd_iqr_ms", "fwdbwd_runs", "peak_mb", "saved_mb",
              "flops_fwd", "flops_bwd", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops",
              "peak_tflops", "fwdbwd_frac_peak", "speedup_fwdbwd_vs_published",
              "speedup_fwdbwd_vs_autograd", "speedup_fwdbwd_vs_eigh", "rel_diff_vs_mpncov",
              "grad_finite", "error")


def csv_row(r):
    flat = {k: r.get(k) for k in CSV_FIELDS}
    for k in ("fwd", "bwd", "fwdbwd"):
        t = r.get(k)
        if t:
            flat[f"{k}_median_ms"] = round(t["median_ms"], 6)
            flat[f"{k}_iqr_ms"] = round(t["iqr_ms"], 6)
            flat[f"{k}_runs"] = t["runs"]
    for b in BASELINE_ORDER:
        v = r.get("speedup_fwdbwd", {}).get(b)
        flat[f"speedup_fwdbwd_vs_{b}"] = None if v is None else round(v, 4)
    return {k: ("" if v is None else v) for k, v in flat.items()}


def write_outputs(out_dir: Path, env, settings, rows, net_rows, notes):
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": 1,
        "env": env,
        "settings": settings,
        "flop_model": "see benchmarks/run.py docstring: covpool 2d^2M fwd and bwd; sqrtm "
                      "(3N-3) fwd and (6N-6) bwd d x d products of 2d^3 flops; per sample",
        "memory_method": settings["memory_method"],
        "results": rows,
        "networks": net_rows,
        "notes": notes,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(csv_row(r))
    written = [out_dir / "results.json", out_dir / "results.csv"]
    if net_rows:
        with open(out_dir / "networks.csv", "w", newline="") as f:
            fields = ("network", "model", "device", "batch", "image_size", "params",
                      "images_per_s", "fwdbwd_median_ms", "fwdbwd_iqr_ms", "error")
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in net_rows:
                t = r.get("fwdbwd") or {}
                w.writerow({k: ("" if v is None else v) for k, v in {
                    **{k: r.get(k) for k in fields},
                    "fwdbwd_median_ms": t.get("median_ms"), "fwdbwd_iqr_ms": t.get("iqr_ms")}.items()})
        written.append(out_dir / "networks.csv")
    return written


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark mpncov's covpool / sqrtm / triuvec / pipeline against the "
                    "published, plain-autograd and eigh implementations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no grid flag (--quick/--full/--shapes/--smoke) the --quick set runs, "
               "unless --networks is given alone (then only the network section runs).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="small set incl. the CPU targets (default); on CUDA every op at the GPU "
                        "target shapes B=128,C=256,M=196,N=5 and B=128,C=128,M=784,N=3")
    g.add_argument("--full", action="store_true",
                   help=f"whole grid {FULL_GRID} per op (fp32; + fp16/bf16 autocast on CUDA)")
    g.add_argument("--smoke", action="store_true", help="tiny shapes, very short timing (tests)")
    p.add_argument("--shapes", default=None,
                   help='explicit shapes, e.g. "B=32,C=256,M=196,N=5;B=64,C=64,M=196,N=3" '
                        "(missing M/N default to 196/5; keys an op does not use are ignored)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {OPS}")
    p.add_argument("--impls", default=",".join(baselines.IMPLS),
                   help=f"comma list from {baselines.IMPLS}")
    p.add_argument("--dtypes", default=None,
                   help="comma list from fp32,fp16,bf16 (fp16/bf16 = autocast rows); "
                        "default fp32 on CPU, fp32,fp16,bf16 on CUDA")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default cuda if available else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch.get_num_threads())")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/<device-tag>/)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for the %%peak column (default: known-GPU table)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange (default 0.2 quick, 0.5 full/shapes, 0.01 smoke)")
    p.add_argument("--min-reps", type=int, default=None,
                   help="minimum timed samples per measurement (default 3 quick/smoke, 5 otherwise)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per configuration, the implementations taking turns; "
                        "samples of all rounds are pooled (default 3 quick, 2 full/shapes, 1 smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--networks", action="store_true",
                   help="network-level fwd+bwd images/s (ResNet-50 GAP/SE/GSoP-Net1/GSoP-Net2/iSQRT-COV)")
    p.add_argument("--network-names", default=None,
                   help="comma list of mpncov.models names to run instead of the default five")
    p.add_argument("--net-batch", type=int, default=None, help="network batch (default 4 CPU, 64 CUDA)")
    p.add_argument("--net-size", type=int, default=224, help="network input size (default 224)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)

    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in args.ops:
        if o not in OPS:
            p.error(f"unknown op {o!r}; choose from {OPS}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in args.impls:
        if i not in baselines.IMPLS:
            p.error(f"unknown impl {i!r}; choose from {baselines.IMPLS}")
    grid_given = args.quick or args.full or args.smoke or args.shapes is not None
    args.run_ops = grid_given or not args.networks
    if not grid_given:
        args.quick = True
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.dtypes is None:
        args.dtypes = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    else:
        args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        for d in args.dtypes:
            if d not in DTYPES:
                parser.error(f"unknown dtype {d!r}; choose from {tuple(DTYPES)}")
    mode = "smoke" if args.smoke else "full" if args.full else "shapes" if args.shapes else "quick"
    if not args.run_ops:
        mode = "networks"
    if args.min_run_time is None:
        args.min_run_time = {"smoke": 0.01, "quick": 0.2}.get(mode, 0.5)
    if args.min_reps is None:
        args.min_reps = 3 if mode in ("smoke", "quick") else 5
    if args.rounds is None:
        args.rounds = {"smoke": 1, "quick": 3}.get(mode, 2)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    notes = []
    impl_objs = {}
    for name in args.impls:
        try:
            impl_objs[name] = baselines.get_impl(name)
        except Exception as e:
            msg = f"impl {name} unavailable: {type(e).__name__}: {e}"
            print("note:", msg)
            notes.append(msg)

    out_dir = Path(args.out) if args.out else \
        Path(__file__).resolve().parent / "results" / envmod.device_tag(device, args.threads)
    env = envmod.collect(device, args.threads)
    mem_method = ("torch.cuda.max_memory_allocated() - allocated before the call"
                  if device.type == "cuda" else
                  "torch.profiler profile_memory: max running sum of c10 CPU allocator "
                  "[memory] events during one fwd+bwd call (BLAS/LAPACK/std scratch not seen)")
    settings = {"mode": mode, "ops": args.ops, "impls": list(impl_objs), "dtypes": args.dtypes,
                "device": str(device), "threads": args.threads,
                "min_run_time_s": args.min_run_time, "min_reps": args.min_reps,
                "rounds": args.rounds,
                "seed": args.seed, "memory_method": mem_method,
                "timing": "torch.utils.benchmark.Timer.blocked_autorange; median and IQR of "
                          "per-call times; fwd = training forward (inputs require grad)"}

    if args.dry_run:
        for op, s, dt in build_configs(args) if args.run_ops else []:
            names = [n for n, i in impl_objs.items() if op in i.ops]
            print(f"{op:9s} {shape_str(op, s):24s} {dt:5s} {','.join(names)}")
        return 0

    where = env.get("gpu_name") or f"{env['cpu_model']}, {args.threads} threads"
    load = env.get("loadavg_start")
    if device.type == "cpu" and load and load[0] > 0.5:
        msg = (f"load average {load[0]:.2f} before start: other processes use the CPU, "
               "CPU timings will be noisy/slow")
        print("warning:", msg)
        notes.append(msg)
    print(f"mpncov benchmarks [{mode}] on {device} ({where}); torch {torch.__version__}",
          flush=True)
    t0 = time.perf_counter()
    rows = run_ops(args, device, impl_objs, notes) if args.run_ops and impl_objs else []
    net_rows = run_networks(args, device, notes) if args.networks else []
    elapsed = time.perf_counter() - t0
    settings["elapsed_s"] = round(elapsed, 1)

    if rows:
        print()
        print(format_table(rows, device))
        print("\nfwd = training forward; x vs B = mpncov speed-up over B on fwd+bwd (median "
              "ratio); IQR in ms; peak/saved MB:", mem_method)
    if net_rows:
        print()
        print(format_networks(net_rows))
    written = write_outputs(out_dir, env, settings, rows, net_rows, notes)
    if not args.no_plots and rows:
        from benchmarks import plot
        written += plot.make_plots(rows, out_dir, device_label=where)
    for n in notes:
        print("note:", n)
    print(f"\n{len(rows)} op rows, {len(net_rows)} network rows in {elapsed:.0f}s; wrote "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
