#!/usr/bin/env bash
# The one script a GPU session runs (no internet needed), in at most BUDGET_S = 480 s so
# that a failed first run can be repeated within 15 minutes of device time, writing at
# most 8 files into LOG_DIR (all a device call can bring back):
#
#   summary.txt      environment, mpncov.info, one line per step (status, seconds, budget)
#   build.log        pip install -e . with CUDA (MAX_JOBS = cores, CUDA_HOME set)
#   smoke.log        scripts/gpu_smoke.py under CUDA_LAUNCH_BLOCKING=1 (odd sizes, zero
#                    trace, storage offset 1, channels_last, expanded gradient, B > 65535,
#                    long mode, CUDA graph replay = eager, the Gram space on tokens and
#                    channels first; kernels and cuBLAS products)
#   sanitizer.log    compute-sanitizer memcheck, racecheck, synccheck on small shapes
#   pytest-cuda.log  tests/test_cuda.py
#   bench.log        the quick CUDA benchmark (fp32), four variants: all implementations with
#                    mpncov's own kernels (sqrtm on chip where C <= 128), among them the
#                    pipeline forced into each space (mpncov-cov, mpncov-gram: the Gram
#                    space's own kernels), which says where "auto" should pick the Gram
#                    space on CUDA (it keeps "cov" there so far); mpncov with sqrtm tiled
#                    (MPNCOV_CUDA_SQRTM=tiled); mpncov and mpncov-gram with cuBLAS
#                    products; TF32 allowed (mpncov's kernels with TF32 tensor-core
#                    products, plain autograd with TF32 cuBLAS)
#   bench.json       the variants' results.json merged
#   profile.log      per-kernel profile of a training step, kernels and cuBLAS products,
#                    at (B=128, C=256, M=196, N=5) and (B=128, C=128, M=784, N=3), the
#                    latter with sqrtm tiled, and the former in the Gram space
#
# Usage: bash scripts/gpu_check.sh [LOG_DIR]    (default benchmarks/results/gpu-<date>)
#   DRY_RUN=1: on a machine without a GPU, run what can run (info, the smoke script on CPU
#   tensors, the test file's collection, a tiny CPU benchmark and profile), print the GPU
#   commands instead of running them, and lay out the same files. DRY_RUN_BUILD=1 builds
#   in a dry run too. Each step runs under `timeout` with its budget (BUDGET_<STEP> to
#   change one) or what is left of BUDGET_S; a step that would start with less than 10 s
#   left is skipped. Exit status: 0 if every step passed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LOG_DIR="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-480}"
SHAPES="B=128,C=256,M=196,N=5;B=128,C=128,M=784,N=3"

# The toolkit the build itself would find (setup.py's search: CUDA_HOME, CUDA_PATH, nvcc on
# PATH through links and wrappers, /usr/local/cuda), set so every step sees the same one.
export CUDA_HOME="${CUDA_HOME:-$("$PYTHON" build_backend/mpncov_build/cuda_toolkit.py 2>/dev/null || echo /usr/local/cuda)}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FORCE_CUDA=1
export PYTHONUNBUFFERED=1

SUMMARY="$LOG_DIR/summary.txt"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
failed=()
: >"$SUMMARY"
for f in build.log smoke.log sanitizer.log pytest-cuda.log bench.log profile.log; do
  : >"$LOG_DIR/$f"
done

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME BUDGET LOG CMD...: run CMD under timeout, output appended to LOG.
step() {
  local name="$1" budget="$2" log="$3"
  shift 3
  local var="BUDGET_${name//[^A-Za-z0-9]/_}"
  budget="${!var:-$budget}"
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 10)); then
    say "$(printf '%-22s skipped: %d s left of %d' "$name" "$left" "$BUDGET_S")"
    failed+=("$name")
    return 0
  fi
  ((budget > left)) && budget=$left
  echo "== $name (budget $budget s) $*" >>"$log"
  local t0=$SECONDS
  timeout --kill-after=5 "$budget" "$@" >>"$log" 2>&1
  local rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status="FAIL (timed out)"
  elif ((rc != 0)); then
    status="FAIL (rc $rc)"
  fi
  [[ $status != ok ]] && failed+=("$name")
  say "$(printf '%-22s %-18s %4d s of %4d s  (%s)' "$name" "$status" $((SECONDS - t0)) "$budget" "$(basename "$log")")"
  return 0
}

# dry NAME LOG CMD...: in a dry run, record the command instead of running it.
dry() {
  local name="$1" log="$2"
  shift 2
  echo "== $name (dry run, not run): $*" >>"$log"
  say "$(printf '%-22s dry run: not run      (%s)' "$name" "$(basename "$log")")"
}

{
  echo "date: $(date -Is)  dry_run=$DRY_RUN  budget=${BUDGET_S}s"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none), $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
} >>"$SUMMARY"

# 1. Build (about 90 s on 16 cores: the C++ sources plus three .cu files for one arch).
if [[ $DRY_RUN == 1 && ${DRY_RUN_BUILD:-0} != 1 ]]; then
  dry build "$LOG_DIR/build.log" "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
else
  step build 150 "$LOG_DIR/build.log" "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
fi

# 2. What was built (into the summary).
step info 20 "$SUMMARY" "$PYTHON" -m mpncov.info

# 3. Smoke test, every launch synchronous so a fault names its kernel (~20 s).
if [[ $DRY_RUN == 1 ]]; then
  step smoke 60 "$LOG_DIR/smoke.log" "$PYTHON" scripts/gpu_smoke.py --dry-run
else
  step smoke 60 "$LOG_DIR/smoke.log" env CUDA_LAUNCH_BLOCKING=1 "$PYTHON" scripts/gpu_smoke.py
fi

# 4. compute-sanitizer on the small shapes (~20 s per tool), on mpncov's kernels only where
# this compute-sanitizer has the kernel filter (torch's own kernels would cost minutes).
filter=()
if command -v compute-sanitizer >/dev/null &&
    compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name"; then
  filter=(--kernel-name kns=mpncov)
fi
for tool in memcheck racecheck synccheck; do
  cmd=(compute-sanitizer --tool "$tool" --error-exitcode 1 "${filter[@]}"
       "$PYTHON" scripts/gpu_smoke.py --quick)
  if [[ $DRY_RUN == 1 ]] || ! command -v compute-sanitizer >/dev/null; then
    dry "sanitizer-$tool" "$LOG_DIR/sanitizer.log" "${cmd[@]}"
  else
    step "sanitizer-$tool" 50 "$LOG_DIR/sanitizer.log" "${cmd[@]}"
  fi
done

# 5. The CUDA tests (~60-100 s). Without a GPU the module skips itself: pytest's exit
# status 5 (nothing ran) is the expected outcome of a dry run.
pytest_cmd=("$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py)
if [[ $DRY_RUN == 1 ]]; then
  step pytest-cuda 60 "$LOG_DIR/pytest-cuda.log" bash -c '"$@"; rc=$?; ((rc == 5)) && rc=0; exit $rc' \
    _ "${pytest_cmd[@]}"
else
  step pytest-cuda 150 "$LOG_DIR/pytest-cuda.log" "${pytest_cmd[@]}"
fi

# 6. Benchmark (python -m mpncov.benchmarks): three variants, each its own process (the
# product path and TF32 are read when each op runs, so a backward run by autograd after
# a wrapper returned would not see a setting made inside it), results merged into
# bench.json.
bench() {  # bench VARIANT ENV... -- ARGS...
  local variant="$1"
  shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  # MPNCOV_TF32=1: torch.backends.cuda.matmul.allow_tf32 = True inside the benchmark run.
  step "bench-$variant" "$BENCH_BUDGET" "$LOG_DIR/bench.log" env "${envs[@]}" \
    "$PYTHON" -c 'import os, runpy, sys, torch
torch.backends.cuda.matmul.allow_tf32 = os.environ.get("MPNCOV_TF32") == "1"
sys.argv = ["mpncov.benchmarks"] + sys.argv[1:]
runpy.run_module("mpncov.benchmarks", run_name="__main__")' \
    --no-plots --out "$TMP/bench-$variant" "$@"
}
if [[ $DRY_RUN == 1 ]]; then
  BENCH_BUDGET=90
  bench kernels MPNCOV_CUDA_PRODUCTS=kernels -- --smoke --device cpu --impls mpncov,published \
    --ops pipeline --rounds 1
else
  # fp32 rows only (mpncov computes in float32 under autocast anyway): ~32 configurations.
  BENCH_BUDGET=110
  # (every implementation, mpncov-cov and mpncov-gram included)
  bench kernels MPNCOV_CUDA_PRODUCTS=kernels -- --device cuda --quick --rounds 1 --dtypes fp32 \
    --impls mpncov,mpncov-cov,mpncov-gram,published,autograd,eigh
  BENCH_BUDGET=30
  bench tiled MPNCOV_CUDA_PRODUCTS=kernels MPNCOV_CUDA_SQRTM=tiled -- --device cuda --quick \
    --rounds 1 --dtypes fp32 --impls mpncov --ops sqrtm,pipeline
  BENCH_BUDGET=45
  bench cublas MPNCOV_CUDA_PRODUCTS=cublas -- --device cuda --quick --rounds 1 --dtypes fp32 \
    --impls mpncov,mpncov-gram --ops sqrtm,pipeline
  bench tf32 MPNCOV_CUDA_PRODUCTS=kernels MPNCOV_TF32=1 -- --device cuda \
    --quick --rounds 1 --dtypes fp32 --impls mpncov,mpncov-gram,autograd --ops sqrtm,pipeline
fi
"$PYTHON" - "$TMP" "$LOG_DIR/bench.json" <<'PY' >>"$LOG_DIR/bench.log" 2>&1
import glob, json, os, sys
tmp, out = sys.argv[1], sys.argv[2]
merged = {}
for d in sorted(glob.glob(os.path.join(tmp, "bench-*"))):
    f = os.path.join(d, "results.json")
    if os.path.exists(f):
        with open(f) as fh:
            merged[os.path.basename(d)[len("bench-"):]] = json.load(fh)
with open(out, "w") as fh:
    json.dump({"variants": merged}, fh, indent=1)
print("bench.json: variants", sorted(merged))
PY

# 7. Per-kernel profile of a training step of mpncov (~10 s each).
if [[ $DRY_RUN == 1 ]]; then
  step profile 60 "$LOG_DIR/profile.log" "$PYTHON" -m mpncov.benchmarks.profile_kernels \
    --device cpu --impl mpncov --shape B=2,C=8,M=9,N=3 --steps 1
else
  IFS=';' read -r -a shapes <<<"$SHAPES"
  for shape in "${shapes[@]}"; do
    for products in kernels cublas; do
      step "profile-$products-${shape//[=,]/}" 30 "$LOG_DIR/profile.log" \
        env MPNCOV_CUDA_PRODUCTS=$products "$PYTHON" -m mpncov.benchmarks.profile_kernels \
        --device cuda --impl mpncov --shape "$shape"
    done
  done
  # C = 128: sqrtm on chip (above, the default) against its tiled path.
  step "profile-tiled-${shapes[1]//[=,]/}" 30 "$LOG_DIR/profile.log" \
    env MPNCOV_CUDA_PRODUCTS=kernels MPNCOV_CUDA_SQRTM=tiled \
    "$PYTHON" -m mpncov.benchmarks.profile_kernels --device cuda --impl mpncov --shape "${shapes[1]}"
  # C = 256, M = 196: the Gram space's kernels, kernel by kernel.
  step "profile-gram-${shapes[0]//[=,]/}" 30 "$LOG_DIR/profile.log" \
    env MPNCOV_CUDA_PRODUCTS=kernels \
    "$PYTHON" -m mpncov.benchmarks.profile_kernels --device cuda --impl mpncov-gram --shape "${shapes[0]}"
fi

nfiles=$(find "$LOG_DIR" -type f | wc -l)
if ((nfiles > 8)); then
  say "too many files in $LOG_DIR: $nfiles > 8"
  failed+=(files)
fi
if ((${#failed[@]})); then
  say "gpu_check: FAILED steps: ${failed[*]} ($((SECONDS - START)) s; logs in $LOG_DIR)"
  exit 1
fi
say "gpu_check: all steps passed ($((SECONDS - START)) s; logs in $LOG_DIR)"
exit 0
