"""Command line of the micro-benchmark: ``python -m mpncov.benchmarks`` or ``mpncov-bench``.

    python -m mpncov.benchmarks                  # = --quick (about two minutes on 2 CPU cores)
    python -m mpncov.benchmarks --full           # the whole grid
    python -m mpncov.benchmarks --ops covpool,pipeline --impls mpncov,published \\
                                --shapes "B=32,C=256,M=196,N=5;B=64,C=64,M=196,N=3"
    python -m mpncov.benchmarks --networks       # network-level images/s only
    python -m mpncov.benchmarks --smoke --out /tmp/x   # tiny end-to-end check (tests)

Results go to --out, by default ``benchmarks/results/<device tag>/`` under the current
directory (from the repository root: next to the committed results).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import baselines, config, env as envmod, memory
from .networks import run_networks
from .output import write_outputs
from .report import format_networks, format_table
from .sweep import run_ops

TIMING_METHOD = ("torch.utils.benchmark.Timer.blocked_autorange; median and IQR of "
                 "per-call times; fwd = training forward (inputs require grad)")


def _comma_list(text: str, allowed, what: str, parser) -> list:
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items:
        parser.error(f"no {what} given in {text!r}; choose from {tuple(allowed)}")
    for i in items:
        if i not in allowed:
            parser.error(f"unknown {what} {i!r}; choose from {tuple(allowed)}")
    return items


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark mpncov's covpool / sqrtm / triuvec / pipeline against the "
                    "published, plain-autograd and eigh implementations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no grid flag (--quick/--full/--shapes/--smoke) the --quick set runs, "
               "unless --networks is given alone (then only the network section runs). "
               "A progress bar is shown on a terminal when tqdm is installed; otherwise "
               "one line per item goes to stderr.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="small set incl. the CPU targets (default); on CUDA every op at the GPU "
                        "target shapes B=128,C=256,M=196,N=5 and B=128,C=128,M=784,N=3")
    g.add_argument("--full", action="store_true",
                   help=f"whole grid {config.FULL_GRID} per op (fp32; + fp16/bf16 autocast on CUDA)")
    g.add_argument("--smoke", action="store_true", help="tiny shapes, very short timing (tests)")
    p.add_argument("--shapes", default=None,
                   help='explicit shapes, e.g. "B=32,C=256,M=196,N=5;B=64,C=64,M=196,N=3" '
                        "(missing M/N default to 196/5; keys an op does not use are ignored)")
    p.add_argument("--ops", default=",".join(config.OPS), help=f"comma list from {config.OPS}")
    p.add_argument("--impls", default=",".join(baselines.IMPLS),
                   help=f"comma list from {baselines.IMPLS}")
    p.add_argument("--dtypes", default=None,
                   help="comma list from fp32,fp16,bf16 (fp16/bf16 = autocast rows); "
                        "default fp32 on CPU, fp32,fp16,bf16 on CUDA")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default cuda if available else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch.get_num_threads())")
    p.add_argument("--out", default=None,
                   help="output dir (default: benchmarks/results/<device-tag>/ under the "
                        "current directory)")
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
    return p


def default_prog() -> str:
    """How this process was started, as far as the user typed it."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "mpncov-bench" if script.startswith("mpncov-bench") else "python -m mpncov.benchmarks"


def parse_args(argv=None, prog: str | None = None):
    """(args, parser). What depends on the machine is filled in by :func:`main`; here: the
    lists, the mode ('smoke', 'quick', 'full', 'shapes' or 'networks') and its presets."""
    p = build_parser(prog or default_prog())
    args = p.parse_args(argv)
    args.ops = _comma_list(args.ops, config.OPS, "op", p)
    args.impls = _comma_list(args.impls, baselines.IMPLS, "impl", p)
    if args.dtypes is not None:
        args.dtypes = _comma_list(args.dtypes, config.DTYPES, "dtype", p)
    args.shape_list = None
    if args.shapes is not None:
        try:
            args.shape_list = config.parse_shapes(args.shapes)
        except ValueError as e:
            p.error(f"--shapes: {e}")
    grid_given = args.quick or args.full or args.smoke or args.shapes is not None
    args.mode = ("smoke" if args.smoke else "full" if args.full else "shapes" if args.shapes
                 else "quick" if grid_given or not args.networks else "networks")
    if args.min_run_time is None:
        args.min_run_time = config.MIN_RUN_TIME[args.mode]
    if args.min_reps is None:
        args.min_reps = config.MIN_REPS[args.mode]
    if args.rounds is None:
        args.rounds = config.ROUNDS[args.mode]
    for name in ("rounds", "min_reps", "threads", "net_batch", "net_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.min_run_time <= 0:
        p.error(f"--min-run-time must be > 0, got {args.min_run_time}")
    return args, p


def main(argv=None, prog: str | None = None) -> int:
    """Run the benchmark; `argv` defaults to sys.argv[1:], `prog` names the command in
    --help and in the stored command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, parser = parse_args(argv, prog)
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

    notes = []
    impl_objs = {name: baselines.get_impl(name) for name in args.impls}
    configs = config.build_configs(args.mode, args.ops, args.dtypes, args.shape_list, device.type)
    if args.dry_run:
        for op, s, dt in configs:
            names = [n for n, i in impl_objs.items() if op in i.ops]
            print(f"{op:9s} {config.shape_str(op, s):24s} {dt:5s} {','.join(names)}")
        return 0

    out_dir = Path(args.out) if args.out else \
        Path.cwd() / "benchmarks" / "results" / envmod.device_tag(device, args.threads)
    env = envmod.collect(device, args.threads, envmod.command_line(parser.prog, argv), argv)
    settings = {"mode": args.mode, "ops": args.ops, "impls": list(impl_objs),
                "dtypes": args.dtypes, "device": str(device), "threads": args.threads,
                "min_run_time_s": args.min_run_time, "min_reps": args.min_reps,
                "rounds": args.rounds, "seed": args.seed,
                "memory_method": memory.method(device), "timing": TIMING_METHOD}

    where = env.get("gpu_name") or f"{env['cpu_model']}, {args.threads} threads"
    load = env.get("loadavg_start")
    if device.type == "cpu" and load and load[0] > 0.5:
        msg = (f"load average {load[0]:.2f} before start: other processes use the CPU, "
               "CPU timings will be noisy/slow")
        print("warning:", msg)
        notes.append(msg)
    print(f"mpncov benchmarks [{args.mode}] on {device} ({where}); torch {torch.__version__}; "
          f"writing to {out_dir}", flush=True)
    t0 = time.perf_counter()
    rows = run_ops(configs, impl_objs, args, device, notes) if configs else []
    net_rows = run_networks(args, device, notes) if args.networks else []
    elapsed = time.perf_counter() - t0
    settings["elapsed_s"] = round(elapsed, 1)

    if rows:
        print()
        print(format_table(rows, device))
        print("\nfwd = training forward; x vs B = mpncov speed-up over B on fwd+bwd (median "
              "ratio); IQR in ms; peak/saved MB:", settings["memory_method"])
    if net_rows:
        print()
        print(format_networks(net_rows))
    written = write_outputs(out_dir, env, settings, rows, net_rows, notes)
    if not args.no_plots and rows:
        from . import plot
        written += plot.make_plots(rows, out_dir, device_label=where)
    for n in notes:
        print("note:", n)
    print(f"\n{len(rows)} op rows, {len(net_rows)} network rows in {elapsed:.0f}s; wrote "
          + ", ".join(str(p) for p in written))
    return 0
