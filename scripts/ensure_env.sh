#!/usr/bin/env bash
# Install what diffusers_wan_ext needs into the current Python ($PYTHON, default python3), one line per phase.
#
# torch: an installed torch (CPU or CUDA) is always kept.  Without one, torch comes from pip's own configuration
# (its index and find-links: pip config list) and only as a CPU build: a torch wheel in pip's find-links is preferred,
# and if what pip would install is a CUDA build, this stops and asks you to install torch first
# (https://pytorch.org/get-started/locally/ gives the command for your platform, CPU or CUDA).
# TORCH_INDEX_URL=<url>: resolve torch with that package index instead (e.g. PyTorch's CPU index); still CPU only.
# DWE_EXTRAS (default test: pytest, gguf, triton, bitsandbytes, torchao -- none asks for another torch): the extras
# of the editable install; DWE_REINSTALL=1 reinstalls the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "ensure_env: $*"; }

# resolve ARGS...: "<version> <cpu|gpu>" of the torch wheel pip would pick with ARGS (nothing when none is found)
resolve() {
  local report
  report=$(mktemp)
  if "$PY" -m pip install -q --dry-run --ignore-installed --no-deps --report "$report" "$@" torch >/dev/null 2>&1; then
    "$PY" - "$report" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"].lower() == "torch":
        needs = [r.lower() for r in meta.get("requires_dist", [])]
        local = meta["version"].partition("+")[2]  # "cpu", "cu124", "rocm6.2", or "" (PyPI: its requirements tell)
        gpu = any(r.startswith(("nvidia-", "cuda-")) for r in needs) or local.startswith(("cu", "rocm"))
        print(meta["version"], "gpu" if gpu else "cpu")
EOF
  fi
  rm -f "$report"
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    where="TORCH_INDEX_URL=$TORCH_INDEX_URL"
    source_args=(--index-url "$TORCH_INDEX_URL")
    read -r version build < <(resolve "${source_args[@]}"; echo) || true
  else
    where="pip's configured sources"
    source_args=()
    read -r version build < <(resolve --no-index; echo) || true       # a wheel in pip's find-links
    if [ -z "${version:-}" ] || [ "$build" != cpu ]; then
      read -r version build < <(resolve; echo) || true                 # pip's configured indexes
    fi
  fi
  if [ -z "${version:-}" ]; then
    say "error: pip finds no torch to install from $where; install torch first" \
        "(https://pytorch.org/get-started/locally/ )" >&2
    exit 1
  fi
  if [ "$build" != cpu ]; then
    say "error: pip would install torch $version from $where, a CUDA build (several GB). Install the torch you want" \
        "first (CUDA or CPU: https://pytorch.org/get-started/locally/ ), or set TORCH_INDEX_URL to PyTorch's CPU" \
        "index, then run this again." >&2
    exit 1
  fi
  say "installing torch $version (CPU build) from $where"
  # the exact version (its "+cpu" label included), so that no other configured index swaps the build
  "$PY" -m pip install -q "torch==$version" ${source_args[@]+"${source_args[@]}"}
fi
extras=${DWE_EXTRAS:-test}
if [ "${DWE_REINSTALL:-0}" = 1 ] || ! "$PY" -c "import diffusers_wan_ext, pytest" >/dev/null 2>&1; then
  say "installing diffusers_wan_ext[$extras] (editable) and its dependencies (diffusers, transformers, ...)"
  "$PY" -m pip install -q -e ".[${extras}]"
  versions="import torch, diffusers_wan_ext as d; print('torch', torch.__version__, '|', d.__name__, d.__version__)"
  say "ready: $("$PY" -c "$versions")"
fi
