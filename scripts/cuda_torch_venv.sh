#!/usr/bin/env bash
# Create, or reuse when it is valid, the virtual environment with PyPI's CUDA build of torch
# that the real CUDA build check (scripts/check_cuda_compile.sh) compiles against. Prints the
# venv's path as its last line.
#
# PyPI's torch==2.11.0 is 2.11.0+cu130 (CUDA 13.0, as the local nvcc 13.0 and the GPU
# machine's torch). `pip --isolated` skips this machine's pip configuration, whose local
# wheel directory would give the CPU build. About 4 GB with its CUDA libraries, ~2 min.
#
# The venv lives outside any clone, in MPNCOV_CUDA_VENV (default
# ~/.cache/mpncov/venv-torch-<version>-cu<cuda>), so later CI runs on the same machine reuse
# it and a fresh machine creates it. Nothing is installed into it after creation (builds go
# into a per-run venv layered on it), and creation holds a lock, so parallel runs share it.
# A failed download exits 3 with a message that says so; any other failure exits 1.
set -euo pipefail

TORCH_VERSION=${MPNCOV_CUDA_TORCH:-2.11.0}
TORCH_CUDA=${MPNCOV_CUDA_TORCH_CUDA:-13.0}
VENV=${MPNCOV_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mpncov/venv-torch-$TORCH_VERSION-cu${TORCH_CUDA//./}}
# What the build and the test suite need besides torch (setuptools, wheel: build; ninja:
# parallel compiles; the rest: tests and the [bench]/[test] extras).
PACKAGES=("torch==$TORCH_VERSION" numpy pytest ninja setuptools wheel tqdm matplotlib)
READY="$VENV/.mpncov-ready"

# usable: the venv imports everything and has the expected torch (errors on stderr).
usable() {
  "$VENV/bin/python" - "$TORCH_VERSION" "$TORCH_CUDA" <<'PY'
import sys
import matplotlib, ninja, numpy, pytest, setuptools, torch, tqdm  # noqa: F401
version, cuda = sys.argv[1:]
print("[cuda-venv] torch", torch.__version__, "CUDA", torch.version.cuda, file=sys.stderr)
sys.exit(not (torch.__version__.split("+")[0] == version and torch.version.cuda == cuda))
PY
}
# valid: created completely by this script earlier, and still usable.
valid() { [ -f "$READY" ] && [ -x "$VENV/bin/python" ] && usable 2>/dev/null; }

loud() {
  {
    echo "########################################################################"
    printf '# %s\n' "$@"
    echo "########################################################################"
  } >&2
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if valid; then
  echo "[cuda-venv] reusing $VENV" >&2
else
  echo "[cuda-venv] creating $VENV (torch==$TORCH_VERSION, CUDA $TORCH_CUDA, from PyPI)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  start=$(date +%s)
  if ! "$VENV/bin/python" -m pip --isolated install --disable-pip-version-check --no-input \
      --retries 5 --timeout 60 --progress-bar off -q "${PACKAGES[@]}"; then
    rm -rf "$VENV"
    loud "DOWNLOAD FAILED: pip could not download/install ${PACKAGES[*]}" \
         "from PyPI (pip --isolated; see pip's error above)." \
         "This is not a build failure of mpncov: the CUDA build check could not start."
    exit 3
  fi
  if ! usable; then  # left for inspection; without the ready mark the next run recreates it
    loud "$VENV does not import its packages, or its torch is not $TORCH_VERSION with CUDA $TORCH_CUDA (see above)."
    exit 1
  fi
  touch "$READY"
  echo "[cuda-venv] created in $(( $(date +%s) - start )) s" >&2
fi
echo "$VENV"
