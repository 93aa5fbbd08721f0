"""The cost model that picks the pipeline's space (mpncov/_space.py) against measured times.

    python -m mpncov.benchmarks.spaces                 # measure the grid, compare the model
    python -m mpncov.benchmarks.spaces --fit           # ... and fit its two constants again
    python -m mpncov.benchmarks.spaces --shapes "C=256,M=196,N=5;C=128,M=100,N=3"

For every (C, M, N) it times fwd+bwd of ``mpncov.isqrt_cov`` with space="cov" and
space="gram" in turns (--reps rounds), as the CPU time of the process (time.process_time:
the work done, which a shared machine's other processes disturb less than the wall clock)
with one thread by default, and keeps the fastest round of each. It prints the measured
and the modelled ratio cov / gram, and which space each says is faster. --fit searches the
model's two constants (BLAS_CALL, PASS) for the smallest squared log error of the ratio.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

import mpncov
from mpncov import _space

DEFAULT_GRID = [(C, max(2, round(C * r)), N) for C in (64, 128, 256, 384)
                for r in (0.25, 0.5, 0.7, 0.85, 1.0, 1.25) for N in (1, 3, 5)]


def measure(C: int, M: int, N: int, batch: int, reps: int, seed: int = 0) -> dict:
    """Fastest CPU time (ms) of fwd+bwd in each space."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, M, generator=g).requires_grad_()
    grad = torch.randn(batch, C * (C + 1) // 2, generator=g)

    def step(space):
        torch.autograd.grad(mpncov.isqrt_cov(x, N, space=space), x, grad)

    best = {}
    for space in ("cov", "gram"):
        step(space)  # warm-up (buffers, BLAS)
    for _ in range(reps):
        for space in ("cov", "gram"):
            t0 = time.process_time()
            step(space)
            best[space] = min(best.get(space, math.inf), (time.process_time() - t0) * 1e3)
    return best


def log_error(rows, **constants) -> float:
    """Sum of squared log errors of the modelled ratio cov / gram."""
    total = 0.0
    for r in rows:
        shape = (r["C"], r["M"], r["N"])
        model = _space.cost("cov", *shape, **constants) / _space.cost("gram", *shape, **constants)
        total += math.log(r["cov"] / r["gram"] / model) ** 2
    return total


def fit(rows):
    """(BLAS_CALL, PASS) of a grid search for the smallest :func:`log_error`."""
    grid = itertools.product((0, 10000, 20000, 40000, 60000, 80000, 120000, 160000, 240000),
                             (0, 10, 20, 40, 80, 160))
    return min(grid, key=lambda p: log_error(rows, blas_call=p[0], elementwise=p[1]))


def _parse(text: str):
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        d = {k.strip().upper(): int(v) for k, v in (kv.split("=") for kv in part.split(","))}
        shapes.append((d["C"], d["M"], d["N"]))
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpncov.benchmarks.spaces",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help='e.g. "C=256,M=196,N=5;C=64,M=49,N=3"')
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fit", action="store_true", help="fit BLAS_CALL and PASS to the runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = _parse(args.shapes) if args.shapes else DEFAULT_GRID
    rows = []
    for C, M, N in shapes:
        t = measure(C, M, N, args.batch, args.reps)
        model = _space.cost("cov", C, M, N) / _space.cost("gram", C, M, N)
        faster = "gram" if t["gram"] < t["cov"] else "cov"
        rows.append({"C": C, "M": M, "N": N, **t})
        print(f"C={C:4d} M={M:4d} N={N}  cov {t['cov']:9.2f} ms  gram {t['gram']:9.2f} ms  "
              f"cov/gram measured {t['cov'] / t['gram']:5.2f} model {model:5.2f}  "
              f"faster {faster:4s} picked {_space.choose(C, M, N):4s}", flush=True)
    wrong = [r for r in rows if ("gram" if r["gram"] < r["cov"] else "cov")
             != _space.choose(r["C"], r["M"], r["N"])]
    loss = max((max(r["cov"], r["gram"]) / min(r["cov"], r["gram"]) for r in wrong), default=1.0)
    n = len(rows)
    plain = math.sqrt(log_error(rows, blas_call=0, elementwise=0) / n)
    print(f"\nmodel picks the slower space in {len(wrong)} of {n} (at most {loss:.2f}x slower); "
          f"rms log error of the ratio {math.sqrt(log_error(rows) / n):.3f} "
          f"(multiply-adds alone: {plain:.3f})")
    if args.fit:
        blas_call, elementwise = fit(rows)
        print(f"fitted BLAS_CALL = {blas_call}, PASS = {elementwise} (in use: {_space.BLAS_CALL}, "
              f"{_space.PASS}); rms log error "
              f"{math.sqrt(log_error(rows, blas_call=blas_call, elementwise=elementwise) / n):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
