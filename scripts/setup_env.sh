#!/usr/bin/env bash
# Install what mpncov needs into the active Python and build the extension in place.
#
# torch: never a bare `pip install torch` (that downloads the newest CUDA build, several GB,
# and breaks the ABI). If torch is already importable (a GPU machine with its own CUDA torch,
# say) it is used as it is; otherwise torch==2.13.0 is installed, which on the project's
# machines comes from the local wheel. Then ninja (parallel compiles) and setuptools if
# missing, and mpncov itself, editable (in place, so `python -m pytest` from the repository
# root imports the built package), with the extras the tests and the benchmark need
# (`[test,train,bench]`, setup.py; MPNCOV_WITH_PLOTS=0 leaves out [bench]'s matplotlib).
# --no-build-isolation: the build uses this Python's setuptools and needs no index (plain
# `pip install -e .` works too; README, Build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${MPNCOV_TORCH_VERSION:-2.13.0}"
  $PIP "torch==${MPNCOV_TORCH_VERSION:-2.13.0}"
fi
# Build tools; each is skipped if already there, so nothing pulls a new torch.
need=()
for mod in setuptools:setuptools ninja:ninja; do
  $PY -c "import ${mod%%:*}" 2>/dev/null || need+=("${mod##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  $PIP "${need[@]}"
fi
extras="test,train"
if [ "${MPNCOV_WITH_PLOTS:-1}" = "1" ]; then extras="$extras,bench"; fi
$PY -W ignore -c "import torch; print('[setup] torch', torch.__version__, 'CUDA', torch.version.cuda)"  # -W: no numpy yet
echo "[setup] building mpncov[$extras] (MAX_JOBS=${MAX_JOBS:-auto}, FORCE_CUDA=${FORCE_CUDA:-0})"
$PIP --no-build-isolation -e ".[$extras]"
$PY -c "import mpncov; print('[setup] mpncov', mpncov.__version__, 'ready')"
