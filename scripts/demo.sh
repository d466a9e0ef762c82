#!/usr/bin/env bash
# The main job on the built-in default: build a tiny original-layout Wan2.1 T2V release (random weights),
# convert it with the real converter, load it with DiffusionPipeline.from_pretrained, render an mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
PY=${PYTHON:-python3}
exec "$PY" -m diffusers_wan_ext_cli demo --output "${1:-outputs/demo.mp4}"
