#!/usr/bin/env bash
# Recreate the ignored folder .fa3src/ (the FlashAttention-3 source that benchmarks/fa3_build.sh builds on the GPU
# machine; issue 21) from local git mirrors. Nothing from it goes into src/: it is a carried build input only.
#
# Usage (repo root):  bash scripts/make_fa3src.sh
#   FA_MIRROR       flash-attention git dir   (default /work/.mirror/Dao-AILab+flash-attention/repo)
#   CUTLASS_MIRROR  cutlass git dir           (default /work/.mirror/NVIDIA+cutlass/repo)
#   FA_REV          flash-attention commit    (default 0251105a2fb19d2957484b7f023cd8c115286ced; cutlass is taken at
#                   the commit that this revision pins as its csrc/cutlass submodule)
#
# Result (~1.5 MB): .fa3src/fa3src.tar.xz holding flash-attention/{README.md,LICENSE,AUTHORS} (hopper/setup.py reads
# ../README.md), flash-attention/hopper/ (FA3: setup.py, kernels, instantiations, flash_attn_interface.py) and
# flash-attention/csrc/cutlass/{include,LICENSE.txt} (the only cutlass part hopper/setup.py puts on the include
# path); .fa3src/_build_wheels/ (packaging / setuptools / wheel, copied from .sage2src/_build_wheels when there: used
# only if the GPU machine lacks them); .fa3src/SOURCES.txt (the commits).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FA=${FA_MIRROR:-/work/.mirror/Dao-AILab+flash-attention/repo}
CUT=${CUTLASS_MIRROR:-/work/.mirror/NVIDIA+cutlass/repo}
FA_REV=${FA_REV:-0251105a2fb19d2957484b7f023cd8c115286ced}
die() { echo "make_fa3src: $1" >&2; exit 1; }
git -C "$FA" cat-file -e "$FA_REV^{commit}" 2>/dev/null || die "no commit $FA_REV in $FA (FA_MIRROR)"
CUT_REV=$(git -C "$FA" rev-parse "$FA_REV:csrc/cutlass") || die "$FA_REV has no csrc/cutlass submodule"
git -C "$CUT" cat-file -e "$CUT_REV^{commit}" 2>/dev/null || die "no cutlass commit $CUT_REV in $CUT (CUTLASS_MIRROR)"
grep -qx "/.fa3src/" "$ROOT/.git/info/exclude" 2>/dev/null || die ".fa3src/ is not ignored: add /.fa3src/ to .git/info/exclude"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# (the mirrors lack some large binary blobs outside these paths; git may name them on stderr, harmlessly)
git -C "$FA" archive --prefix=flash-attention/ "$FA_REV" README.md LICENSE AUTHORS hopper 2>/dev/null |
  tar -x -C "$TMP" || die "git archive of flash-attention $FA_REV failed"
git -C "$CUT" archive --prefix=flash-attention/csrc/cutlass/ "$CUT_REV" include LICENSE.txt 2>/dev/null |
  tar -x -C "$TMP" || die "git archive of cutlass $CUT_REV failed"
[ -f "$TMP/flash-attention/hopper/setup.py" ] || die "no hopper/setup.py in the archive"
[ -f "$TMP/flash-attention/csrc/cutlass/include/cute/tensor.hpp" ] || die "no cutlass include/cute/tensor.hpp"

OUTDIR=$ROOT/.fa3src
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$TMP" -cf - flash-attention |
  xz -9 -T2 > "$OUTDIR/fa3src.tar.xz"
if ls "$ROOT"/.sage2src/_build_wheels/*.whl >/dev/null 2>&1; then
  mkdir -p "$OUTDIR/_build_wheels"
  cp "$ROOT"/.sage2src/_build_wheels/*.whl "$OUTDIR/_build_wheels/"
fi
{ echo "flash-attention $FA_REV (hopper/, README.md, LICENSE, AUTHORS; BSD-3-Clause)"
  echo "cutlass $CUT_REV (include/, LICENSE.txt; BSD-3-Clause), pinned by flash-attention's csrc/cutlass"
  echo "made by scripts/make_fa3src.sh"; } > "$OUTDIR/SOURCES.txt"
echo "make_fa3src: $(du -sh "$OUTDIR" | cut -f1) in $OUTDIR (flash-attention ${FA_REV:0:8}, cutlass ${CUT_REV:0:8})"
