#!/usr/bin/env bash
# One GPU call: install the carried wheels (diffusers etc. in .whl, optional flash-attn 4 in .fa4b + /tmp/fa4), then
# run the commands given as arguments from benchmarks/. Usage: bash benchmarks/run_gpu_round.sh "python3 x.py" ...
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/ftfy*.whl .whl/wcwidth*.whl $(ls .whl/torchao*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
if [ -d .fa4b ] && [ -f /tmp/fa4/cu13part.aa ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .fa4b/*.whl &&
    cat /tmp/fa4/cu13part.aa .fa4b/cu13part.ab | xz -d -T8 | tar -x -C /tmp/site &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
fi
cd benchmarks
for cmd in "$@"; do
  echo "=== $cmd"; eval "$cmd" 2>&1 | grep -v -i -E "warn|float32: \[|experimental feature" ; done
