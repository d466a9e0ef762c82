#!/usr/bin/env bash
# Run the test suite (CPU, tiny models + the golden fixtures in $WAN_GOLDENS_DIR, default the shipped tests/goldens).
# With pytest-xdist installed (the test extra) the files are spread over $DWE_TEST_WORKERS processes (default 2, one
# thread each; a file stays on one worker); DWE_TEST_WORKERS=0 runs them in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
PY=${PYTHON:-python3}
workers=${DWE_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  parallel=(-n "$workers" --dist loadgroup)
fi
# -p no:benchmark: pytest-benchmark (not ours, when installed) warns at every start that xdist disables it; pytest
# accepts -p no:<name> for a plugin that is not installed
exec "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark ${parallel[@]+"${parallel[@]}"} "$@"
