#!/usr/bin/env python3
"""Static report of the CUDA kernels: ptxas resources and SASS counts of the product loops.

    python scripts/cuda_static_report.py [--archs 80,90] [--out FILE.md] [--check]

1. Every csrc/cuda/*.cu is compiled to a cubin per arch with the nvcc flags of the real
   build (torch.utils.cpp_extension's COMMON_NVCC_FLAGS, setup.py's -O3 and defines,
   -std=c++17) plus -Xptxas -v. Per kernel: registers, spill stores/loads, stack frame,
   static shared memory, and the resulting resident warps per SM.
2. The product kernels are compiled once more with -DMPNCOV_GEMM_ASSUME_FAST (the
   bounds-checked staging path compiled out, nothing else changed) and disassembled with
   cuobjdump. In the slab loop (the loop holding the FMAs) the instructions of the
   cheapest and the costliest path from its head to its back edge are counted by class.
   The paths differ by run-time operand layout: operands copied by cp.async (vectors
   along the tile: symmetric sqrtm operands, covpool's) or staged through registers
   (vectors along k: a non-symmetric P of sqrtm beyond 8 iterations). A path that stages
   nothing (the loop's last slab) is not counted.

3. The on-chip sqrtm kernels (sqrtm_on_chip.cu, one block per sample): threads, dynamic
   shared memory and residency at the sides they serve (from the same formulas as
   sqrtm_on_chip.cuh), and the SASS counts of their k loop (per k).

Writes markdown (default benchmarks/results/static/cuda-kernels.md). --check exits 1 if
a float kernel spills, a float product kernel has fewer than 12 resident warps per SM,
a float product loop path has more than 300 staging instructions per slab, or the float
on-chip kernels do not fit an sm_90 block at C = 128. Needs nvcc
(NVCC, CUDA_HOME or PATH) and, for part 2, cuobjdump (PATH, CUDA_HOME/bin, or the one in
triton's package); without cuobjdump part 2 is skipped with a note (an error with
--require-sass, as CI runs it). Takes about a minute
on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "static" / "cuda-kernels.md"
# The same literal list torch.utils.cpp_extension uses (read from it when importable).
FALLBACK_COMMON = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                   "--expt-relaxed-constexpr"]
# setup.py's nvcc flags and defines of the extension build.
BUILD_FLAGS = ["-O3", "-std=c++17", "-DMPNCOV_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C"]
# Threads per block, by kernel name (gemm::kBlock for the tile kernels, else kThreads).
TILE_KERNELS = ("product_kernel", "covpool_kernel", "covpool_backward_kernel", "gram_product_kernel")
TILE_THREADS, OTHER_THREADS = 64, 256
# Per-SM limits (registers, shared memory for blocks, blocks, warps) of the archs.
SM_LIMITS = {80: (65536, 164 * 1024, 32, 64), 86: (65536, 100 * 1024, 16, 48),
             89: (65536, 100 * 1024, 24, 48), 90: (65536, 228 * 1024, 32, 64)}
MAX_STAGING = 300
MIN_WARPS = 12
MAX_MMA_SPILL = 64  # bytes a TF32 tile kernel may spill outside its product loop
# Shared memory one block may opt in to (bytes), per arch.
MAX_BLOCK_SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# The on-chip sqrtm kernels (sqrtm_on_chip.cu): outputs per thread (rows, cols) by dtype,
# the k loop's unrolling, and the sides reported.
ON_CHIP_KERNELS = ("on_chip_forward_kernel", "on_chip_backward_kernel")
ON_CHIP_CELL = {"float": (8, 8), "double": (4, 8)}
ON_CHIP_UNROLL = {"float": 4, "double": 2}
ON_CHIP_SIDES = {"float": (32, 64, 100, 128), "double": (32, 64, 90, 96)}
ON_CHIP_SLAB = 16


def on_chip_threads(n: int, dtype: str) -> int:
    """Threads of an on-chip sqrtm block at side n: one per cell of the upper cover."""
    r, c = ON_CHIP_CELL[dtype]
    nr, nc = -(-n // r), -(-n // c)
    cells = sum(nc - (r * i) // c for i in range(nr))
    return -(-cells // 32) * 32


def on_chip_smem(n: int, dtype: str, backward: bool) -> int:
    """Dynamic shared memory of an on-chip sqrtm block: three n x p matrices (+ two slabs)."""
    p = -(-n // 8) * 8
    size = 4 if dtype == "float" else 8
    return (3 * n * p + (2 * ON_CHIP_SLAB * p if backward else 0)) * size


def is_tile_kernel(mangled: str) -> bool:
    return short_name(mangled).split("<")[0] in TILE_KERNELS


def is_on_chip_kernel(mangled: str) -> bool:
    return short_name(mangled).split("<")[0] in ON_CHIP_KERNELS


def find_tool(name: str, env: str | None = None) -> str | None:
    if env and os.environ.get(env):
        return os.environ[env]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", name)):
        return os.path.join(cuda_home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    for cand in [f"/usr/local/cuda/bin/{name}"] + glob.glob(
            os.path.join(sys.prefix, "lib", "python3*", "site-packages", "triton", "backends",
                         "nvidia", "bin", name)):
        if os.path.exists(cand):
            return cand
    try:  # triton installed elsewhere on sys.path
        import triton  # noqa: F401
        cand = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return None


def common_flags() -> tuple[list[str], str]:
    try:
        from torch.utils import cpp_extension
        return list(cpp_extension.COMMON_NVCC_FLAGS), "torch.utils.cpp_extension.COMMON_NVCC_FLAGS"
    except Exception:
        return list(FALLBACK_COMMON), "built-in copy of torch's COMMON_NVCC_FLAGS (torch not importable)"


# The int template argument of the tile kernels: their Fp32Math (csrc/cuda/mma_tf32.cuh).
MATH_NAMES = {"0": "", "1": ", tf32", "2": ", 3xtf32"}


def short_name(mangled: str) -> str:
    """`sym_prep_kernel<float, backward>`, `product_kernel<float, tf32>` from the mangled
    name of a kernel template (a bool argument: backward/forward; an int: the Fp32Math)."""
    m = re.search(r"\d([a-z][a-z_]*_kernel)I([df])(L([bi])(\d+)E)?", mangled)
    if not m:
        return mangled
    kind = {"d": "double", "f": "float"}[m.group(2)]
    if m.group(4) == "b":
        extra = {"1": ", backward", "0": ", forward"}[m.group(5)]
    else:
        extra = MATH_NAMES.get(m.group(5) or "0", f", math {m.group(5)}")
    return f"{m.group(1)}<{kind}{extra}>"


def is_mma_kernel(mangled: str) -> bool:
    return "tf32" in short_name(mangled)


def compile_cubin(nvcc, src, arch, flags, out, extra=()):
    cmd = [nvcc, "-cubin", *flags, *extra, "-Xptxas", "-v",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr}")
    return res.stderr


def parse_ptxas(text: str):
    """[(kernel, regs, spill_st, spill_ld, stack, smem)] from -Xptxas -v output."""
    rows, cur, info = [], None, {}
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur, info = m.group(1), {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            info.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            info["smem"] = int(sm.group(1)) if sm else 0
            rows.append((cur, info["regs"], info.get("spill_st", 0), info.get("spill_ld", 0),
                         info.get("stack", 0), info["smem"]))
            cur = None
    return rows


def resident_warps(arch: int, regs: int, smem: int, threads: int) -> int:
    reg_file, smem_sm, max_blocks, max_warps = SM_LIMITS.get(arch, SM_LIMITS[80])
    if smem > MAX_BLOCK_SMEM.get(arch, MAX_BLOCK_SMEM[80]):
        return 0
    warps = (threads + 31) // 32
    warp_regs = ((max(regs, 1) + 7) // 8 * 8 * 32 + 255) // 256 * 256
    by_regs = (reg_file // warp_regs) // warps
    by_smem = smem_sm // ((smem + 127) // 128 * 128 + 1024)
    blocks = min(by_regs, by_smem, max_blocks, max_warps // warps)
    return blocks * warps


# ---- SASS: slab loop paths ------------------------------------------------------------

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_functions(text: str):
    funcs, cur, body = {}, None, []
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            if cur:
                funcs[cur] = body
            cur, body = m.group(1), []
            continue
        m = SASS_LINE.search(line)
        if m and cur:
            body.append((int(m.group(1), 16), m.group(2) is not None, m.group(3),
                         m.group(4).strip()))
    if cur:
        funcs[cur] = body
    return funcs


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("FFMA", "DFMA"):
        return "FMA"
    if base == "HMMA":
        return "MMA"
    if base in ("LDL", "STL"):  # local memory: spills
        return "local"
    if base == "LDS":
        return "LDS"
    if base == "STS":
        return "STS"
    if base in ("LDG", "LD", "LDGSTS"):  # global loads and cp.async copies
        return "LDG"
    if base in ("BAR",):
        return "BAR"
    if base in ("BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "WARPSYNC"):
        return "control"
    return "other"


def loop_paths(body, min_fmas, require_load=True, unit="FMA"):
    """Cheapest and costliest path (by instruction count) through the innermost loop with
    at least min_fmas FMAs (the slab loop), from its head to its back edge, as
    {class: count} dicts."""
    index = {addr: i for i, (addr, *_rest) in enumerate(body)}
    best = None
    for i, (addr, pred, op, args) in enumerate(body):
        if not op.startswith("BRA"):
            continue
        m = re.match(r"(0x[0-9a-f]+)", args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in index:
            continue
        lo, hi = index[target], i
        fmas = sum(classify(o) == unit for _, _, o, _ in body[lo:hi + 1])
        if fmas >= min_fmas and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi, fmas)
    if best is None:
        return None
    lo, hi, _ = best
    # DP over instructions lo..hi (a DAG once the back edge is dropped): each instruction
    # falls through unless it is an unpredicated branch; a branch inside the loop adds an
    # edge to its target. Paths end at the back edge (hi). Only paths that stage the next
    # slab count (at least one global load or async copy): the loop's last iteration,
    # which skips the staging, is not a slab's cost.
    inf = float("inf")
    n = hi + 2
    # best[i][need]: (cost, next) of the cheapest / costliest path from i to the end; need=1
    # while no global load has been passed yet.
    cmin = [[inf, inf] for _ in range(n)]
    cmax = [[-inf, -inf] for _ in range(n)]
    nmin = [[None, None] for _ in range(n)]
    nmax = [[None, None] for _ in range(n)]
    cmin[hi + 1][0] = cmax[hi + 1][0] = 0
    for i in range(hi, lo - 1, -1):
        _addr, pred, op, args = body[i]
        succ = []
        if i == hi:
            succ = [hi + 1]
        else:
            is_branch = op.startswith("BRA")
            if not is_branch or pred:
                succ.append(i + 1)
            if is_branch:
                m = re.match(r"(0x[0-9a-f]+)", args)
                t = index.get(int(m.group(1), 16)) if m else None
                if t is not None and lo <= t <= hi and t > i:
                    succ.append(t)
        loads = classify(op) == "LDG" or not require_load
        for need in (0, 1):
            after = 0 if loads else need
            for s in succ:
                if cmin[s][after] + 1 < cmin[i][need]:
                    cmin[i][need], nmin[i][need] = cmin[s][after] + 1, (s, after)
                if cmax[s][after] + 1 > cmax[i][need]:
                    cmax[i][need], nmax[i][need] = cmax[s][after] + 1, (s, after)

    def walk(nxt):
        counts, i, need = {}, lo, 1
        while i is not None and i <= hi:
            c = classify(body[i][2])
            counts[c] = counts.get(c, 0) + 1
            step = nxt[i][need]
            if step is None:
                break
            i, need = step
        return counts

    if cmin[lo][1] == inf:
        return None
    return walk(nmin), walk(nmax)


def per_slab(counts: dict, slab_fmas: int) -> dict:
    """Counts scaled to one slab (the compiler may unroll the slab loop)."""
    slabs = max(1, round(counts.get("FMA", 0) / slab_fmas))
    out = {k: v / slabs for k, v in counts.items()}
    out["slabs"] = slabs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--require-sass", action="store_true",
                    help="fail (exit 2) instead of skipping part 2 when cuobjdump is missing")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",") if a]
    nvcc = find_tool("nvcc", "NVCC")
    if nvcc is None:
        print("cuda_static_report: nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 2
    cuobjdump = find_tool("cuobjdump", "CUOBJDUMP")
    if cuobjdump is None and args.require_sass:
        print("cuda_static_report: cuobjdump not found (PATH, CUDA_HOME/bin, CUOBJDUMP or "
              "triton's package) and --require-sass was given", file=sys.stderr)
        return 2
    common, common_src = common_flags()
    flags = common + BUILD_FLAGS
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = version.strip().splitlines()[-1] if version else "?"
    sources = sorted(CUDA_SRC.glob("*.cu"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mpncov_static_"))
    jobs = [(src, arch, extra) for src in sources for arch in archs
            for extra in ([()] + ([("-DMPNCOV_GEMM_ASSUME_FAST",)] if cuobjdump else []))]

    def run(job):
        src, arch, extra = job
        tag = "fast" if extra else "real"
        cubin = tmp / f"{src.stem}.sm{arch}.{tag}.cubin"
        return job, cubin, compile_cubin(nvcc, src, arch, flags, cubin, extra)

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, jobs))

    resources, loops, failures, on_chip, on_chip_loops, mma_loops = [], [], [], [], [], []
    for (src, arch, extra), cubin, log in results:
        if not extra:
            for name, regs, sst, sld, stack, smem in parse_ptxas(log):
                sname = short_name(name)
                if is_on_chip_kernel(name):
                    dtype = "float" if "<float" in sname else "double"
                    backward = "backward" in sname
                    for n in ON_CHIP_SIDES[dtype]:
                        threads = on_chip_threads(n, dtype)
                        dyn = on_chip_smem(n, dtype, backward)
                        warps = resident_warps(arch, regs, smem + dyn, threads)
                        on_chip.append((sname, arch, n, threads, regs, sst, sld, smem, dyn, warps))
                        if dtype == "float" and arch == 90 and n == 128 and warps == 0:
                            failures.append(f"{sname} sm_90: C = 128 does not fit a block")
                    threads = max(on_chip_threads(n, dtype) for n in ON_CHIP_SIDES[dtype])
                    if dtype == "float" and (sst or sld):
                        failures.append(f"{sname} sm_{arch}: spills {sst}/{sld} bytes")
                    resources.append((src.name, sname, arch, regs, sst, sld, stack, smem,
                                      threads, resident_warps(arch, regs, smem, threads)))
                    continue
                threads = TILE_THREADS if is_tile_kernel(name) else OTHER_THREADS
                warps = resident_warps(arch, regs, smem, threads)
                resources.append((src.name, sname, arch, regs, sst, sld, stack, smem, threads,
                                  warps))
                is_float = "<float" in sname
                # TF32 variants: a few long-lived scalars may go to local memory (outside the
                # product loop, which the SASS check below keeps free of local accesses).
                allowed = MAX_MMA_SPILL if is_mma_kernel(name) else 0
                if is_float and max(sst, sld) > allowed:
                    failures.append(f"{sname} sm_{arch}: spills {sst}/{sld} bytes")
                if is_float and is_tile_kernel(name) and warps < MIN_WARPS:
                    failures.append(f"{sname} sm_{arch}: {warps} warps/SM < {MIN_WARPS}")
            continue
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                              text=True).stdout
        for name, body in sass_functions(sass).items():
            if is_on_chip_kernel(name):
                sname = short_name(name)
                dtype = "float" if "<float" in sname else "double"
                rows, cols = ON_CHIP_CELL[dtype]
                per_k = rows * cols
                paths = loop_paths(body, per_k * ON_CHIP_UNROLL[dtype], require_load=False)
                if paths is None:
                    failures.append(f"{sname} sm_{arch}: no k loop found in the SASS")
                    continue
                counts = paths[1]
                ks = max(1, round(counts.get("FMA", 0) / per_k))
                on_chip_loops.append((sname, arch, ks, {k: v / ks for k, v in counts.items()}))
                continue
            if not is_tile_kernel(name):
                continue
            if is_mma_kernel(name):
                # The TF32 multiply keeps its k8 loop rolled (batched_gemm.cuh): per k8 step
                # 16 MMAs (48 for 3xTF32) with their fragment loads and TF32 conversions.
                sname = short_name(name)
                per_k8 = 48 if "3xtf32" in sname else 16
                paths = loop_paths(body, per_k8, require_load=False, unit="MMA")
                if paths is None:
                    failures.append(f"{sname} sm_{arch}: no MMA loop found in the SASS")
                    continue
                if (sname, arch, paths[1]) not in mma_loops:  # the same kernel in two files
                    mma_loops.append((sname, arch, paths[1]))
                if paths[1].get("local"):
                    failures.append(f"{sname} sm_{arch}: local memory in the MMA loop")
                continue
            slab_fmas = 16 * 64  # kSlab x 8 x 8 per thread
            paths = loop_paths(body, slab_fmas)
            sname = short_name(name)
            labels = ("cheapest", "costliest")
            if paths is None and "<double" in sname:
                # double keeps its k loop rolled (batched_gemm.cuh, kUnrollK): the FMA loop is
                # one k of 64 FMAs; its counts are per k, the staging is outside it.
                paths = loop_paths(body, 64, require_load=False)
                labels = ("k loop (rolled)", "k loop (rolled)")
            if paths is None:
                failures.append(f"{sname} sm_{arch}: no slab loop found in the SASS")
                continue
            for label, counts in zip(labels, paths):
                c = per_slab(counts, slab_fmas) if "rolled" not in label else dict(counts)
                staging = sum(v for k, v in c.items() if k not in ("FMA", "LDS", "slabs"))
                if "rolled" in label:
                    if label in (x[2] for x in loops if x[0] == sname and x[1] == arch):
                        continue
                    staging = float("nan")
                if (sname, arch, label, c, staging) in loops:
                    continue  # square_products.cuh's kernel, the same in sqrtm and gram files
                loops.append((sname, arch, label, c, staging))
                if staging > MAX_STAGING and "<float" in sname:
                    failures.append(f"{sname} sm_{arch} {label} path: {staging:.0f} staging "
                                    f"instructions per slab > {MAX_STAGING}")
    shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "# CUDA kernels: static resources and SASS counts",
        "",
        f"Made by `python scripts/cuda_static_report.py --archs {args.archs}` on "
        f"{datetime.date.today().isoformat()} with {version}.",
        "",
        f"Flags (those of the extension build): `{' '.join(flags)}` "
        f"(common flags from {common_src}), one `-gencode` per arch, plus `-Xptxas -v`.",
        "Warps/SM: resident warps per multiprocessor from registers (allocated per warp in "
        "units of 256), static shared memory (+1 KB reserved per block) and block size, "
        "with the arch's limits; the float tile kernels are compiled for 6 blocks of 64 "
        "threads (`__launch_bounds__(64, 6)`, at most 168 registers).",
        "",
        "| file | kernel | arch | threads | registers | spill st/ld (B) | stack (B) | smem (B) | warps/SM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f, k, arch, regs, sst, sld, stack, smem, threads, warps in sorted(resources):
        lines.append(f"| {f} | `{k}` | sm_{arch} | {threads} | {regs} | {sst}/{sld} | {stack} | "
                     f"{smem} | {warps} |")
    lines += ["", "## Slab loop of the product kernels (SASS, per 16-deep slab, per thread)", ""]
    if not cuobjdump:
        lines.append("Skipped: cuobjdump not found.")
    else:
        lines += [
            "Compiled with `-DMPNCOV_GEMM_ASSUME_FAST` (the bounds-checked path of edge "
            "slabs removed) and disassembled with `cuobjdump -sass`. Paths from the loop head "
            "to its back edge that stage the next slab: cheapest (both operands copied by "
            "cp.async: every sqrtm product up to 8 iterations, covpool) and costliest (P "
            "staged through registers: sqrtm's T / Z products beyond 8 iterations; covpool "
            "kernels have one layout, so both rows agree; gram_product_kernel: both operands "
            "staged through registers, as in G = W^T W of token-major features, whose rows "
            "run along the channels it sums over). Staging = every instruction but "
            "the FMAs and "
            "the shared loads feeding them (LDG, STS, integer/address, control, barrier). "
            "FMA share = FMA / all, an upper bound of the FMA pipe's share of issue slots. "
            "double keeps its k loop rolled (8 x 8 double accumulators take 128 registers): "
            "its rows are one k of that loop (64 DFMA), the staging is outside it.",
            "",
            "| kernel | arch | path | FMA | LDS | LDG/LDGSTS | STS | other | control+BAR | staging | FMA share |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k, arch, label, c, staging in sorted(loops):
            total = sum(v for kk, v in c.items() if kk != "slabs")
            lines.append(
                f"| `{k}` | sm_{arch} | {label} | {c.get('FMA', 0):.0f} | {c.get('LDS', 0):.0f} | "
                f"{c.get('LDG', 0):.0f} | {c.get('STS', 0):.0f} | {c.get('other', 0):.0f} | "
                f"{c.get('control', 0) + c.get('BAR', 0):.0f} | "
                f"{'-' if staging != staging else f'{staging:.0f}'} | "
                f"{100 * c.get('FMA', 0) / total:.0f} % |")
    if mma_loops:
        lines += [
            "", "## TF32 variants of the tile kernels (MPNCOV_CUDA_TF32)", "",
            "Float tile kernels whose slab multiply runs on tensor cores "
            "(`mma.sync.m16n8k8.tf32`, SASS `HMMA.1688.F32.TF32`; `csrc/cuda/mma_tf32.cuh`): "
            "per k8 step of a slab and per thread, 16 MMAs (3xTF32: 48) with the loads of their "
            "A and B fragments from shared memory and the TF32 rounding of each fragment "
            "(`cvt.rna.tf32.f32`, which compiles to integer/compare instructions, and for "
            "3xTF32 the split into big and small parts). One MMA is 16 x 8 x 8 = 1,024 "
            "multiply-adds of the warp, 32 per thread: the 16 MMAs do the work of 512 FFMAs "
            "per thread. Staging (cp.async, barriers) is the FFMA kernels' (above).",
            "",
            "| kernel | arch | HMMA | LDS | other | control+BAR | local | HMMA share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, arch, c in sorted(mma_loops):
            total = sum(c.values())
            lines.append(f"| `{k}` | sm_{arch} | {c.get('MMA', 0)} | {c.get('LDS', 0)} | "
                         f"{c.get('other', 0)} | {c.get('control', 0) + c.get('BAR', 0)} | "
                         f"{c.get('local', 0)} | {100 * c.get('MMA', 0) / total:.0f} % |")
    lines += [
        "", "## On-chip sqrtm kernels (C <= 128, short mode: one block per sample)", "",
        "Threads = one per cell of the upper-triangle cover (float 8 x 8 outputs, double "
        "4 x 8), in whole warps; dynamic shared memory = three C x p matrices (p = C rounded "
        f"up to 8), plus two slabs of {ON_CHIP_SLAB} rows in the backward (the formulas of "
        "`sqrtm_on_chip.cuh`); warps/SM from registers and static + dynamic shared memory "
        "(0: the block does not fit this arch's opt-in limit, so that size takes the tiled "
        "path there). The table of all kernels above lists these kernels at their largest "
        "block with static shared memory only.",
        "",
        "| kernel | arch | C | threads | registers | spill st/ld (B) | smem static + dynamic (B) | blocks/SM | warps/SM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, arch, n, threads, regs, sst, sld, smem, dyn, warps in sorted(on_chip):
        blocks = warps // max(1, threads // 32)
        lines.append(f"| `{k}` | sm_{arch} | {n} | {threads} | {regs} | {sst}/{sld} | "
                     f"{smem} + {dyn} | {blocks} | {warps} |")
    if on_chip_loops:
        lines += [
            "", "Their k loop (`cuobjdump -sass`, the unrolled loop of the products, per k and "
            "thread: float 64 FMA, double 32; every operand is in shared memory, so there is no "
            "staging in the loop; the backward streams the saved iterates into its slabs "
            "between the loops):", "",
            "| kernel | arch | k per loop trip | FMA | LDS | other | control | FMA share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, arch, ks, c in sorted(on_chip_loops):
            total = sum(c.values())
            lines.append(f"| `{k}` | sm_{arch} | {ks} | {c.get('FMA', 0):.0f} | "
                         f"{c.get('LDS', 0):.1f} | {c.get('other', 0):.2f} | "
                         f"{c.get('control', 0) + c.get('BAR', 0):.2f} | "
                         f"{100 * c.get('FMA', 0) / total:.0f} % |")
    lines += ["", "Check (`--check`): no float kernel spills, float tile kernels >= "
              f"{MIN_WARPS} warps/SM, <= {MAX_STAGING} staging instructions per slab, the float "
              "on-chip kernels fit an sm_90 block at C = 128, TF32 variants spill at most "
              f"{MAX_MMA_SPILL} bytes and never in their MMA loop: "
              + ("passed." if not failures else "FAILED: " + "; ".join(failures)), ""]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {out}")
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
