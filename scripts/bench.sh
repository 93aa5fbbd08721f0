#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the micro-benchmark, --quick unless other options
# are given (see `python -m mpncov.benchmarks --help`). Results go to
# benchmarks/results/<device tag>/ unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
if [ $# -eq 0 ]; then set -- --quick; fi
exec $PY -m mpncov.benchmarks "$@"
