#!/usr/bin/env bash
# The one script a GPU session runs on a CUDA machine (no internet needed):
#   build + install the extension with CUDA, report the build, nvidia-smi, run the test
#   suite (GPU tests included) and the quick CUDA benchmark when benchmarks/run.py exists.
# Usage: bash scripts/gpu_check.sh [LOG_DIR]   (default benchmarks/results/gpu-<date>)
#   STEPS=build,test,bench,profile (default: all) picks steps, so the work can be split over
#   two device calls of at most 10 minutes, e.g. STEPS=build,test then STEPS=bench,profile
#   (the installed build stays on a warm machine). BENCH_ROUNDS (default 1) is passed to
#   benchmarks.run --rounds. Benchmark JSON/CSV/plots and kernel profiles go to LOG_DIR.
# Every step runs even if an earlier one failed, so every log is produced; the exit status
# is non-zero if any step failed. A summary is printed and written to LOG_DIR/summary.txt.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LOG_DIR="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FORCE_CUDA="${FORCE_CUDA:-1}"
STEPS=",${STEPS:-build,test,bench,profile},"
want() { [[ "$STEPS" == *",$1,"* ]]; }

failed=()
summary="$LOG_DIR/summary.txt"
: >"$summary"

# step NAME LOGFILE CMD...: run CMD with stdout+stderr to LOGFILE, record the outcome.
step() {
  local name="$1" log="$2"
  shift 2
  echo "== $name (log: $log)"
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  local line="$name: rc=$rc ($((SECONDS - start)) s)"
  echo "   $line"
  echo "$line" >>"$summary"
  if [[ $rc -ne 0 ]]; then
    failed+=("$name")
    tail -n 30 "$log"
  fi
  return 0
}

{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=$FORCE_CUDA"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >"$LOG_DIR/env.txt" 2>&1

if want build; then
step "build" "$LOG_DIR/build.log" "$PYTHON" -m pip install --no-build-isolation -v .
# pytest and the benchmarks run from the repo root, where ./mpncov shadows the installed
# package: copy the installed extension (mpncov/_C*.so) next to the sources so both see
# the same build. Run from $LOG_DIR so that find_spec sees the installed package.
step "copy-extension" "$LOG_DIR/copy-extension.log" bash -c "cd '$LOG_DIR' && '$PYTHON' - '$ROOT/mpncov'" <<'PY'
import glob, importlib.util, os, shutil, sys
dst = os.path.realpath(sys.argv[1])
spec = importlib.util.find_spec("mpncov")
src = os.path.realpath(os.path.dirname(spec.origin))
libs = glob.glob(os.path.join(src, "_C*.so")) + glob.glob(os.path.join(src, "_C*.pyd"))
print("installed package:", src)
if not libs:
    sys.exit("no built extension mpncov/_C* in the installed package")
if src != dst:
    for f in libs:
        shutil.copy2(f, dst)
        print("copied", f, "->", dst)
PY
fi
step "info" "$LOG_DIR/info.txt" bash -c "cd '$LOG_DIR' && '$PYTHON' -m mpncov.info"
step "nvidia-smi" "$LOG_DIR/nvidia-smi.txt" nvidia-smi
if want test; then
  # CUDA tests first: they are the point of a GPU session if time runs short.
  step "pytest-cuda" "$LOG_DIR/pytest-cuda.log" "$PYTHON" -m pytest -q -rs tests/test_cuda.py \
    --junitxml="$LOG_DIR/pytest-cuda.xml"
  step "pytest" "$LOG_DIR/pytest.log" "$PYTHON" -m pytest -q -rs tests/ \
    --ignore=tests/test_cuda.py --junitxml="$LOG_DIR/pytest.xml"
fi
if want bench; then
  step "benchmark" "$LOG_DIR/benchmark.log" "$PYTHON" -m benchmarks.run --device cuda --quick \
    --rounds "${BENCH_ROUNDS:-1}" --out "$LOG_DIR/bench"
fi
if want profile; then
  for shape in B=128,C=256,M=196,N=5 B=128,C=128,M=784,N=3; do
    for impl in mpncov published autograd; do
      step "profile $impl $shape" "$LOG_DIR/profile-$impl-${shape//[=,]/_}.txt" \
        "$PYTHON" -m benchmarks.profile_kernels --device cuda --impl "$impl" --shape "$shape" \
        --out "$LOG_DIR/profile-$impl-${shape//[=,]/_}.json"
    done
  done
fi

if [[ ${#failed[@]} -ne 0 ]]; then
  echo "FAILED steps: ${failed[*]}" | tee -a "$summary"
  echo "logs in $LOG_DIR"
  exit 1
fi
echo "all steps passed; logs in $LOG_DIR" | tee -a "$summary"
exit 0
