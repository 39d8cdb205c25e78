#!/usr/bin/env bash
# Builds the optional native op library (backend="native") into build/librankgrpo_native.so.
# Same as `cmake -S . -B build && cmake --build build`, with torch taken from $PYTHON, else
# ./.venv/bin/python when there is one, else python3 on PATH.
# Usage: scripts/build_native.sh [extra cmake -D options, e.g. -DRANKGRPO_CUDA=OFF]
# Environment: PYTHON, BUILD_DIR (default build), JOBS (default: number of CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py="$PWD/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
build="${BUILD_DIR:-build}"
cmake -S . -B "$build" -DPYTHON_EXECUTABLE="$py" "$@"
cmake --build "$build" -j "${JOBS:-$(nproc)}"
echo "built $build/librankgrpo_native.so (export RANKGRPO_NATIVE_LIB=$PWD/$build/librankgrpo_native.so" \
     "to use it from elsewhere)"
