#!/usr/bin/env bash
# CI check: compiles csrc/segment_stage_cuda.cu for sm_90 with nvcc (compile only, nothing
# runs) and fails on a compile error or on any register spill reported by ptxas.
# Skips (exit 0, with a message) when nvcc is absent. Env: NVCC (default: nvcc on PATH),
# CUDA_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "check_native_cuda_compile: SKIP (nvcc not found)"
  exit 0
fi
arch="${CUDA_ARCH:-90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
log="$tmp/ptxas.log"
if ! "$nvcc" -std=c++17 -O3 --fmad=false -gencode "arch=compute_${arch},code=sm_${arch}" \
     -Xptxas -v -c csrc/segment_stage_cuda.cu -o "$tmp/segment_stage_cuda.o" >"$log" 2>&1; then
  cat "$log"
  echo "check_native_cuda_compile: FAIL (nvcc error, sm_${arch})"
  exit 1
fi
# One line per kernel: registers, stack and spills, name.
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
awk '/Compiling entry function/ {split($0, q, "'"'"'"); name = q[2]}
     /spill stores/ {spill = $0; sub(/^[ \t]+/, "", spill)}
     /Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/)
       printf "  %s, %s: %s\n", substr($0, RSTART, RLENGTH), spill, name}' "$log" \
  | demangle | sed -E 's/rankgrpo::\(anonymous namespace\):://; s/\(.*//'
if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "$log"; then
  echo "check_native_cuda_compile: FAIL (register spills, sm_${arch})"
  exit 1
fi
echo "check_native_cuda_compile: OK ($("$nvcc" --version | tail -1 | sed 's/^ *//'), sm_${arch}," \
     "no spills)"
