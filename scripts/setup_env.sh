#!/usr/bin/env bash
# Install what mpncov needs into the active Python and build the extension in place.
#
# torch: never a bare `pip install torch` (that downloads the newest CUDA build, several GB,
# and breaks the ABI). If torch is already importable (a GPU machine with its own CUDA torch,
# say) it is used as it is; otherwise torch==2.13.0 is installed, which on the project's
# machines comes from the local wheel. The build uses --no-build-isolation for the same
# reason. Editable (in-place) install, so `python -m pytest` and `python -m benchmarks.run`
# from the repository root import the built package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${MPNCOV_TORCH_VERSION:-2.13.0}"
  $PIP "torch==${MPNCOV_TORCH_VERSION:-2.13.0}"
fi
# Build and test tools; each is skipped if already there, so nothing pulls a new torch.
need=()
$PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
  || need+=("setuptools>=64")
for mod in wheel:wheel numpy:numpy pytest:pytest ninja:ninja; do
  $PY -c "import ${mod%%:*}" 2>/dev/null || need+=("${mod##*:}")
done
if [ "${MPNCOV_WITH_PLOTS:-1}" = "1" ] && ! $PY -c "import matplotlib" 2>/dev/null; then
  need+=(matplotlib)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  $PIP "${need[@]}"
fi
$PY -c "import torch; print('[setup] torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "[setup] building mpncov (MAX_JOBS=${MAX_JOBS:-auto}, FORCE_CUDA=${FORCE_CUDA:-0})"
$PIP --no-build-isolation -e .
$PY -c "import mpncov; print('[setup] mpncov', mpncov.__version__, 'ready')"
