#!/usr/bin/env bash
# Build FlashAttention-3 (Dao-AILab/flash-attention hopper/, BSD-3-Clause; an optional benchmark dependency, never
# vendored into the package) on the GPU machine, from the source carried in the ignored folder .fa3src/
# (fa3src.tar.xz: hopper/ + the pinned cutlass include/, made by scripts/make_fa3src.sh).
#
# Usage (repo root):  bash benchmarks/fa3_build.sh [JOBS] [TARGET]
#   JOBS    parallel compiles (default 4: there are only 4 compile units, see below)
#   TARGET  where the wheel is installed (default /tmp/fa3/site; bench_sage2.py puts it first on sys.path, like
#           /tmp/sage2/site; FA3_SITE overrides it there). Installing it where Diffusers sees it at import would
#           also make Diffusers' `_flash_3` backend available.
# Background:  setsid nohup bash benchmarks/fa3_build.sh 4 > /tmp/fa3_build.out 2>&1 < /dev/null &
#              ... other benchmarks ...
#              while [ ! -f /tmp/fa3/DONE ] && [ ! -f /tmp/fa3/FAILED ]; do sleep 5; done
# Result: /tmp/fa3/wheel/flash_attn_3-*.whl, log /tmp/fa3/build.log, /tmp/fa3/DONE or /tmp/fa3/FAILED.
# Copy the wheel to $OUT (it should be a few MB: 4 compile units) and carry it later in the ignored folder .fa3whl/:
# a fresh machine then installs it instead of building (this script checks .fa3whl/ first). On a machine where
# this script already succeeded (a warm second call), it stops at once.
#
# What is built: forward only, head dim 128 only, bf16 and fp8 e4m3 (no fp16), sm_90a only, and none of split-KV,
# paged KV, append-KV, local (sliding window), softcap, pack-GQA, varlen, clusters, sm8x (hopper/setup.py's
# FLASH_ATTENTION_DISABLE_* switches). hopper/setup.py then compiles 4 units: flash_api_stable.cpp (g++, torch >=
# 2.9's stable ABI), instantiations/flash_fwd_hdim128_bf16_sm90.cu, instantiations/flash_fwd_hdim128_e4m3_sm90.cu
# (each: the non-causal and the causal kernel), flash_prepare_scheduler.cu (sm80 + sm90). setup.py always passes
# "-gencode arch=compute_90a,code=sm_90a" (torch then adds no arch flags of its own). CUDA: setup.py needs nvcc >=
# 12.3; with 13.x it uses the system nvcc and adds $CUDA_HOME/include/cccl to the include path itself; with 12.x
# (not 12.8) it would download nvcc 12.6 / ptxas 12.8: FLASH_ATTENTION_OFFLINE_BUILD=1 stops that (the machine has no
# network), so the system nvcc builds. Estimate: the two .cu instantiations dominate: compiled alone with the same
# flags and nvcc 13.0 on the CPU box (2026-12-06), the bf16 unit took 98 s of CPU (0.76 MB object), the e4m3 one
# about as long (0.87 MB, 268 s wall on a loaded machine); with JOBS=4 all 4 units run side by side: ~2-4 minutes.
# Patches, on the copy in /tmp/fa3/src only (the carried archive stays as upstream):
#   * setup.py's `git submodule update --init ../csrc/cutlass` call is removed (the copy is no git checkout, cutlass
#     is in the archive, and git may be missing)
#   * "-std=c++17" -> "-std=c++20" only when the installed torch's cpp_extension no longer mentions C++17 (as in
#     sage2_build.sh)
set -uo pipefail
JOBS=${1:-4}
TARGET=${2:-/tmp/fa3/site}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=/tmp/fa3
if [ -f "$W/DONE" ] && [ -f "$TARGET/flash_attn_interface.py" ]; then
  echo "fa3_build: already built and installed in $TARGET on this machine (rm $W/DONE to rebuild)"
  exit 0
fi
rm -rf "$W/src" "$W/wheel" "$W/DONE" "$W/FAILED"
mkdir -p "$W/wheel" "$TARGET"
LOG=$W/build.log
: > "$LOG"
# the log's last lines first, then the one-line reason (also appended to the log)
fail() { tail -60 "$LOG" | grep -iv "ptxas info\|bytes stack frame\|^$" | tail -25; echo "fa3_build: FAILED: $1 (log: $LOG)" | tee -a "$LOG"; touch "$W/FAILED"; exit 1; }
source "$ROOT/benchmarks/ext_build_lib.sh"
START=$(date +%s)
install_prebuilt fa3_build .fa3whl "flash_attn_3-*.whl"
[ -f "$ROOT/.fa3src/fa3src.tar.xz" ] || fail "no .fa3src/fa3src.tar.xz (run scripts/make_fa3src.sh here, carry .fa3src)"
mkdir -p "$W/src"
tar -xJf "$ROOT/.fa3src/fa3src.tar.xz" -C "$W/src" >> "$LOG" 2>&1 || fail "unpacking .fa3src/fa3src.tar.xz"
SRC=$W/src/flash-attention/hopper
[ -f "$SRC/setup.py" ] && [ -f "$SRC/../csrc/cutlass/include/cute/tensor.hpp" ] && [ -f "$SRC/../README.md" ] ||
  fail "the archive lacks hopper/setup.py, README.md or csrc/cutlass/include"
cd "$SRC" || fail "cd $SRC"

# build dependencies: use the machine's, else the carried wheels (in a private folder, only for this build)
export PYTHONPATH=${PYTHONPATH:-}
if ! python3 -c "import packaging, setuptools; from wheel.bdist_wheel import bdist_wheel" 2>/dev/null; then
  ls "$ROOT"/.fa3src/_build_wheels/*.whl > /dev/null 2>&1 ||
    fail "packaging / setuptools / wheel.bdist_wheel missing and no .fa3src/_build_wheels"
  python3 -m pip install -q --no-index --no-deps --target "$W/buildenv" "$ROOT"/.fa3src/_build_wheels/*.whl >> "$LOG" 2>&1 ||
    fail "installing the carried build wheels"
  export PYTHONPATH=$W/buildenv${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import ninja" 2>/dev/null || command -v ninja > /dev/null ||
  fail "ninja not found (torch would compile the units one after another)"

NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
export PATH=$CUDA_HOME/bin:$PATH
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "nvcc not found (CUDA_HOME=$CUDA_HOME)"
NVCC_VER=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
python3 -c "import sys; v = tuple(map(int, '$NVCC_VER'.split('.'))); sys.exit(v < (12, 3))" ||
  fail "nvcc $NVCC_VER: FlashAttention-3 needs CUDA >= 12.3"
python3 -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || fail "torch not importable or CPU-only"

export FLASH_ATTENTION_FORCE_BUILD=TRUE      # no attempt to download a prebuilt wheel
export FLASH_ATTENTION_OFFLINE_BUILD=1       # no nvcc / ptxas download for CUDA 12.x
for f in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 \
         SM80 HDIMDIFF64 HDIMDIFF192; do
  export FLASH_ATTENTION_DISABLE_$f=TRUE
done
export FLASH_ATTENTION_DISABLE_FP8=FALSE FLASH_ATTENTION_DISABLE_HDIM128=FALSE
export MAX_JOBS=$JOBS NVCC_THREADS=1 TORCH_CUDA_ARCH_LIST=9.0
# flash_prepare_scheduler.cu needs no driver library, but link against the stub if libcuda.so has no dev link
export LIBRARY_PATH=$CUDA_HOME/lib64/stubs:$CUDA_HOME/targets/x86_64-linux/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
grep -q 'subprocess.run(\["git", "submodule", "update", "--init", "../csrc/cutlass"\])' setup.py ||
  fail "setup.py changed: its git submodule call is not where fa3_build.sh expects it"
sed -i 's|^\( *\)subprocess.run(\["git", "submodule", "update", "--init", "../csrc/cutlass"\])|\1pass  # fa3_build.sh: cutlass is carried|' setup.py
cxx_std_and_versions fa3_build

wheel_and_install fa3_build "flash_attn_3-*.whl"
cd /tmp
PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH} python3 -c "
import torch, flash_attn_interface as f, flash_attn_config as c
flags = {k.split('DISABLE_')[-1]: v for k, v in c.CONFIG['build_flags'].items() if not v and 'DISABLE' in k}
print('fa3_build: import ok,', f.__file__, 'enabled:', ', '.join(flags))" 2>&1 | tee -a "$LOG" ||
  fail "importing the installed wheel"
touch "$W/DONE"
echo "fa3_build: $(basename "$WHL") ($(du -h "$WHL" | cut -f1)) -> $TARGET in $(( $(date +%s) - START )) s" | tee -a "$LOG"
