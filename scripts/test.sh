#!/usr/bin/env bash
# Run the test suite (CPU, tiny models + the golden fixtures in $WAN_GOLDENS_DIR, default the shipped tests/goldens).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
