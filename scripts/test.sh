#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
exec $PY -m pytest -q -ra "$@" tests
