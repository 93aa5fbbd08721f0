#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the micro-benchmark, --quick unless other options
# are given (see `python -m benchmarks.run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
if [ $# -eq 0 ]; then set -- --quick; fi
exec $PY -m benchmarks.run "$@"
