#!/usr/bin/env bash
# Compile-only check of the CUDA backend on a machine without a GPU (CI runs it).
#
# 1. Every csrc/cuda/*.cu is compiled with nvcc for sm_80 and sm_90 (object files go to a
#    temp dir and are discarded).
# 2. csrc/cuda/*_binding.cpp (the torch side) are syntax-checked with g++ against torch's include paths and
#    the CUDA headers. The CPU wheel of torch ships c10/cuda headers but not the generated
#    c10/cuda/impl/cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include
#    (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters for linking, not syntax).
#    If torch is not importable, step 2 is skipped with a message.
#
# Environment: NVCC (default: nvcc on PATH, else /usr/local/bin/nvcc or
# $CUDA_HOME/bin/nvcc), CXX (default g++), PYTHON (default python3).
# Exits non-zero on any failure.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x /usr/local/bin/nvcc ]]; then
    NVCC=/usr/local/bin/nvcc
  else
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  fi
fi
CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

status=0
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if [[ ${#cu_files[@]} -eq 0 ]]; then
  echo "FAIL: no csrc/cuda/*.cu files found" >&2
  exit 1
fi

echo "== nvcc: $("$NVCC" --version | tail -n 1)"
pids=()
names=()
for f in "${cu_files[@]}"; do
  obj="$TMP/$(basename "$f" .cu).o"
  ( "$NVCC" -c -std=c++17 -O3 \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -Wall -Werror cross-execution-space-call \
      "$f" -o "$obj" >"$TMP/$(basename "$f").log" 2>&1 ) &
  pids+=($!)
  names+=("$f")
done
for i in "${!pids[@]}"; do
  f="${names[$i]}"
  if wait "${pids[$i]}"; then
    echo "ok   nvcc $f"
  else
    echo "FAIL nvcc $f"
    status=1
  fi
  cat "$TMP/$(basename "$f").log"
done

echo "== g++ -fsyntax-only csrc/cuda/*_binding.cpp"
if inc=$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig
import torch.utils.cpp_extension as c
print("\n".join(c.include_paths() + [sysconfig.get_paths()["include"]]))
PY
); then
  args=()
  while IFS= read -r d; do [[ -n "$d" ]] && args+=(-isystem "$d"); done <<<"$inc"
  for f in csrc/cuda/*_binding.cpp; do
    log="$TMP/$(basename "$f").log"
    # -std=c++17 matches setup.py's cxx flags.
    if "$CXX" -std=c++17 -fsyntax-only -Wall -DMPNCOV_WITH_CUDA \
        -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${args[@]}" -I "$CUDA_INC" \
        "$f" >"$log" 2>&1; then
      echo "ok   g++ $f"
    else
      echo "FAIL g++ $f"
      status=1
    fi
    grep -v -e "Wc++20-extensions" "$log" | grep -E "error|warning:" | head -50
  done
else
  echo "skip: torch is not importable with $PYTHON; binding syntax check not run"
fi

if [[ $status -ne 0 ]]; then
  echo "check_cuda_compile: FAILED"
else
  echo "check_cuda_compile: all passed"
fi
exit $status
