#!/usr/bin/env bash
# Install what diffusers_wan_ext needs into the current Python ($PYTHON, default python3).
# torch is installed first and only as a CPU build when it is missing (the local CPU wheel where pip's
# find-links has one, else PyTorch's CPU index), so nothing here ever pulls a CUDA torch by accident.
# A CUDA user installs their torch first; it is kept as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if "$PY" -m pip download -q --no-deps --no-index -d "$(mktemp -d)" "torch==2.13.0+cpu" >/dev/null 2>&1; then
    # the exact local build (a "+cpu" version exists only there); its dependencies come from the package index
    "$PY" -m pip install -q "torch==2.13.0+cpu"
  else
    "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
extras=${DWE_EXTRAS:-test}
if ! "$PY" -c "import diffusers_wan_ext, pytest" >/dev/null 2>&1 || [ "${DWE_REINSTALL:-0}" = 1 ]; then
  "$PY" -m pip install -q -e ".[${extras}]"
fi
