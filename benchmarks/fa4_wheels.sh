#!/usr/bin/env bash
# Prepare flash-attn 4 (optional, the fastest exact attention on Hopper) for a GPU machine without a package index.
# Run here, where the package index is reachable: bash benchmarks/fa4_wheels.sh
# Everything that travels with one device call must stay under 64 MiB, and nvidia-cutlass-dsl-libs-cu13 alone is
# 92 MB, so its unpacked contents go as an xz archive in two parts: .fa4a/cu13part.aa (first call: copy it to
# /tmp/fa4) and .fa4b/cu13part.a[b-z] with the other wheels (second call: benchmarks/run_gpu_round.sh installs it all).
# Both folders must be ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$tmp/w" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir -p "$tmp/cu13"
python3 -m zipfile -e "$tmp"/w/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/cu13"
rm "$tmp"/w/nvidia_cutlass_dsl_libs_cu13-*.whl
tar -C "$tmp/cu13" -c . | xz -9 -T0 > "$tmp/cu13.tar.xz"
split -b 32000000 "$tmp/cu13.tar.xz" "$tmp/cu13part."
rm -rf .fa4a .fa4b
mkdir -p .fa4a .fa4b
mv "$tmp/cu13part.aa" .fa4a/
mv "$tmp"/cu13part.a* "$tmp"/w/*.whl .fa4b/
du -sh .fa4a .fa4b
