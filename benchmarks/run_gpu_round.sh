#!/usr/bin/env bash
# One GPU call: install the carried wheels (diffusers etc. in .whl, optional flash-attn 4 in .fa4b + /tmp/fa4) into a
# folder named site-packages (quack's kernel cache fingerprints the source of every function outside one, and fails on
# CUTLASS internals), then run the commands given as arguments from benchmarks/ (the exploratory probes are under
# probes/). Usage: bash benchmarks/run_gpu_round.sh "python3 bench_dit.py" "python3 probes/probe_profile.py dit13" ...
set -uo pipefail
cd "$(dirname "$0")/.."
# every carried wheel (diffusers, ftfy, wcwidth; optional: torchao, gguf, sageattention, deepspeed and its small
# pure dependencies, pytest); installed once per machine (a marker file), so a second call on a warm machine skips it
if [ ! -f /tmp/sp/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sp/site-packages \
    .whl/*.whl || exit 1
  touch /tmp/sp/.installed
fi
export PYTHONPATH=/tmp/sp/site-packages:$PWD/src
if [ -d .fa4b ] && [ -f /tmp/fa4/cu13part.aa ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sp/site-packages .fa4b/*.whl &&
    cat /tmp/fa4/cu13part.aa .fa4b/cu13part.a* | xz -d -T8 | tar -x -C /tmp/sp/site-packages &&
    export PYTHONPATH=$PYTHONPATH:/tmp/sp/site-packages/nvidia_cutlass_dsl/dsl_packages
fi
cd benchmarks
for cmd in "$@"; do
  # drop warning noise, but keep pytest's summary lines ("3 passed, 2 warnings")
  echo "=== $cmd"; eval "$cmd" 2>&1 | awk 'tolower($0) ~ / passed| failed|error/ || tolower($0) !~ /warn|float32: \[|experimental feature/' ; done
