#!/usr/bin/env bash
# The real CUDA build, on a machine without a GPU (CI runs it with --tests):
#  1. compile and link mpncov with its CUDA kernels (FORCE_CUDA=1, `pip install
#     --no-build-isolation -e .`) against PyPI's CUDA build of torch (scripts/cuda_torch_venv.sh);
#     setup.py finds the CUDA toolkit itself (no CUDA_HOME needed);
#  2. import it, and check with `python -m mpncov.info --check-cuda` that every operator has a
#     kernel for CUDA (registration needs no GPU);
#  3. with --tests, run the test suite against that build (the CUDA tests skip without a GPU).
# Everything happens in a scratch copy of this tree (tracked and untracked, not ignored, files)
# and a per-run venv that sees the cached CUDA-torch venv through a .pth file: neither this
# checkout's in-place build nor the cached venv changes. Extra arguments after --tests go to
# pytest. Exit codes: 3 torch download failed, 1 anything else failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_TESTS=0
if [ "${1:-}" = "--tests" ]; then RUN_TESTS=1; shift; fi

fail() { printf '\n######## %s\n\n' "$*" >&2; exit 1; }

BASE=$(bash "$ROOT/scripts/cuda_torch_venv.sh" | tail -n 1)   # exits 3 on a failed download

WORK=$(mktemp -d -t mpncov-cuda-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$BASE/bin/python" -m venv --without-pip "$WORK/venv"
PY="$WORK/venv/bin/python"
"$BASE/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))" \
  > "$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/cuda-torch-venv.pth"
export PATH="$WORK/venv/bin:$BASE/bin:$PATH"   # ninja and pip's scripts of the cached venv

mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
cd "$WORK/src"

echo "== CUDA build: FORCE_CUDA=1 pip install --no-build-isolation -e . (torch $("$PY" -c 'import torch; print(torch.__version__)'), MAX_JOBS=${MAX_JOBS:=2})"
start=$(date +%s)
if ! FORCE_CUDA=1 MAX_JOBS=$MAX_JOBS "$PY" -m pip install --disable-pip-version-check \
    --no-build-isolation -v -e . > "$WORK/build.log" 2>&1; then
  grep -v "is ignored: it is neither" "$WORK/build.log" | tail -n 150 >&2
  fail "CUDA BUILD FAILED: compile or link error (last lines of the build log above)"
fi
grep -E "^ *mpncov setup:" "$WORK/build.log" | sort -u
echo "   built in $(( $(date +%s) - start )) s"

if ! "$PY" -m mpncov.info --check-cuda; then
  fail "CUDA IMPORT/KERNEL CHECK FAILED: the CUDA build does not load, or an operator has no CUDA kernel"
fi

if [ "$RUN_TESTS" = 1 ]; then
  echo "== test suite against the CUDA build"
  env -u MPNCOV_TEST_PIP_INSTALL "$PY" -m pytest -q -ra -p no:cacheprovider "$@" tests
fi
