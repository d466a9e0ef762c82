#!/usr/bin/env bash
# Shared by sage2_build.sh and fa3_build.sh (sourced after they set ROOT, W, LOG, TARGET, JOBS and fail(); CUDA_HOME
# before cxx_std_and_versions):
#   install_prebuilt TAG FOLDER PATTERN   a carried earlier wheel installed instead of a build (exits the script)
#   cxx_std_and_versions TAG       -std=c++17 -> c++20 in setup.py when the installed torch's cpp_extension no longer
#                                   mentions C++17 (its default since torch 2.12); logs torch / nvcc / jobs
#   wheel_and_install TAG PATTERN   pip wheel of the current folder into $W/wheel, the wheel matching PATTERN
#                                   installed into $TARGET (sets WHL)
cxx_std_and_versions() {
  local cpp_ext
  cpp_ext=$(python3 -c "import torch.utils.cpp_extension as c; print(c.__file__)") || fail "torch not importable"
  if ! grep -q "c++17" "$cpp_ext"; then
    sed -i 's/-std=c++17/-std=c++20/g' setup.py
    echo "$1: torch's cpp_extension uses C++20: setup.py patched to -std=c++20" | tee -a "$LOG"
  fi
  { echo "torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)')"
    "$CUDA_HOME/bin/nvcc" --version | tail -2
    echo "jobs $JOBS, target $TARGET"; } | tee -a "$LOG"
}

wheel_and_install() {
  nice -n 5 python3 -m pip wheel -v --no-build-isolation --no-deps --no-index -w "$W/wheel" . >> "$LOG" 2>&1 ||
    fail "pip wheel"
  WHL=$(ls "$W"/wheel/$2 2>/dev/null | head -1)
  [ -n "$WHL" ] || fail "no wheel written"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$TARGET" "$WHL" >> "$LOG" 2>&1 ||
    fail "installing $WHL into $TARGET"
}

# install_prebuilt TAG FOLDER PATTERN: a wheel built earlier (copied back from $OUT, carried in the ignored FOLDER,
# e.g. .sage2whl/): installed into $TARGET, DONE marked, and the script exits -- no build
install_prebuilt() {
  local prebuilt
  prebuilt=$(ls "$ROOT/$2"/$3 2>/dev/null | head -1)
  [ -n "$prebuilt" ] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$TARGET" "$prebuilt" >> "$LOG" 2>&1 ||
    fail "installing $prebuilt"
  touch "$W/DONE"
  echo "$1: installed the carried $(basename "$prebuilt") into $TARGET (no build)" | tee -a "$LOG"
  exit 0
}
