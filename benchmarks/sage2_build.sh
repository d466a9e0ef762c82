#!/usr/bin/env bash
# Build SageAttention 2 (thu-ml/SageAttention, Apache-2.0; an optional dependency, never vendored into the package)
# on the GPU machine from the source tree carried in the ignored folder .sage2src/ (git archive of the upstream HEAD
# without assets/examples; _build_wheels/ holds packaging / wheel / setuptools in case the machine lacks them).
#
# Usage (repo root):  bash benchmarks/sage2_build.sh [JOBS] [TARGET]
#   JOBS    parallel compiles (default 16; use fewer, e.g. 6, when it runs in the background next to benchmarks)
#   TARGET  where the wheel is installed (default /tmp/sage2/site: a separate folder, so benchmarks run from
#           run_gpu_round.sh -- PYTHONPATH=/tmp/sp/site-packages -- keep sageattention 1.0.6 and their "auto"
#           attention choice; bench_sage2.py puts /tmp/sage2/site first on sys.path). Pass /tmp/sp/site-packages to
#           make it visible everywhere (then Diffusers' `sage` backend becomes available and "auto" picks it).
# Background:  setsid nohup bash benchmarks/sage2_build.sh 6 > /tmp/sage2_build.out 2>&1 < /dev/null &
#              ... other benchmarks ...
#              while [ ! -f /tmp/sage2/DONE ] && [ ! -f /tmp/sage2/FAILED ]; do sleep 5; done
# Result: /tmp/sage2/wheel/sageattention-*.whl, log /tmp/sage2/build.log, /tmp/sage2/DONE or /tmp/sage2/FAILED.
# Copy the wheel to $OUT and carry it later in the ignored folder .sage2whl/: a fresh machine then installs it
# instead of building (this script checks .sage2whl/ first).
#
# Only TORCH_CUDA_ARCH_LIST=9.0 is built (sm_90a). setup.py then builds 4 extensions (_qattn_sm80, _qattn_sm89,
# _qattn_sm90, _fused); it has no switch to drop the sm80/sm89 ones, and they are kept (the micro-bench times
# their kernels on sm90 too). Patches, on the copy in /tmp/sage2/src only (the carried tree stays as upstream):
#   * nvcc's "--threads=8" -> "--threads=1" (one arch: nothing for nvcc to run in parallel; the jobs are parallel)
#   * "-std=c++17" -> "-std=c++20" only when the installed torch's cpp_extension no longer mentions C++17 (its
#     default became C++20 in torch 2.12; newer headers need it); torch 2.11 keeps upstream's C++17.
set -uo pipefail
JOBS=${1:-16}
TARGET=${2:-/tmp/sage2/site}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=/tmp/sage2
rm -rf "$W/src" "$W/wheel" "$W/DONE" "$W/FAILED"
mkdir -p "$W/wheel" "$TARGET"
LOG=$W/build.log
: > "$LOG"
fail() { echo "sage2_build: FAILED: $1 (log: $LOG)" | tee -a "$LOG"; tail -40 "$LOG" | grep -iv "ptxas info\|bytes stack frame\|^$" | tail -25; touch "$W/FAILED"; exit 1; }
source "$ROOT/benchmarks/ext_build_lib.sh"
START=$(date +%s)
install_prebuilt sage2_build .sage2whl "sageattention-*.whl"
[ -f "$ROOT/.sage2src/setup.py" ] || fail "no .sage2src/setup.py (carry .sage2src)"
cp -r "$ROOT/.sage2src" "$W/src"
cd "$W/src" || fail "cd $W/src"

# build dependencies: use the machine's, else the carried wheels (in a private folder, only for this build)
export PYTHONPATH=${PYTHONPATH:-}
if ! python3 -c "import packaging, setuptools, wheel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$W/buildenv" _build_wheels/*.whl >> "$LOG" 2>&1 ||
    fail "installing the carried build wheels"
  export PYTHONPATH=$W/buildenv${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf _build_wheels

NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
export PATH=$CUDA_HOME/bin:$PATH
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "nvcc not found (CUDA_HOME=$CUDA_HOME)"
# _qattn_sm90 links -lcuda (cuTensorMapEncodeTiled): let the linker find the driver stub if libcuda.so has no dev link
export LIBRARY_PATH=$CUDA_HOME/lib64/stubs:$CUDA_HOME/targets/x86_64-linux/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export TORCH_CUDA_ARCH_LIST=9.0
# setup.py builds its 4 extensions at once (EXT_PARALLEL); _qattn_sm89 has 8 .cu files (ninja, MAX_JOBS), the others
# one each: about MAX_JOBS + 3 compiles run at the same time
export EXT_PARALLEL=$(( JOBS < 4 ? JOBS : 4 ))
export MAX_JOBS=$(( JOBS > 4 ? JOBS - 3 : 1 ))
sed -i 's/"--threads=8"/"--threads=1"/' setup.py
cxx_std_and_versions sage2_build

wheel_and_install sage2_build "sageattention-*.whl"
cd /tmp
PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH} python3 -c "
import importlib.metadata as m, sageattention.core as c
print('sage2_build: import ok, version', m.version('sageattention'), 'SM90', c.SM90_ENABLED, 'SM89', c.SM89_ENABLED,
      'SM80', c.SM80_ENABLED)" 2>&1 | tee -a "$LOG" || fail "importing the installed wheel"
touch "$W/DONE"
echo "sage2_build: $(basename "$WHL") -> $TARGET in $(( $(date +%s) - START )) s" | tee -a "$LOG"
