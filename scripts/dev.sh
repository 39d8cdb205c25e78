#!/usr/bin/env bash
# One entry point for a fresh machine: bootstraps .venv, then runs a job.
#   bash scripts/dev.sh demo [args]   the main job: `rankgrpo demo` (synthetic world + ReDial)
#   bash scripts/dev.sh test [args]   the test suite (what CI runs)
# The CPU torch wheel is installed first, so pip never pulls a multi-GB CUDA build; set
# TORCH_SPEC to choose another torch (a torch already in the venv is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RANKGRPO_VENV:-.venv}
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # absolute: cmake runs elsewhere
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.rankgrpo-install"
# keyed by this checkout too: a venv shared by several clones is re-pointed to the one running
want=$( (cat pyproject.toml; echo "$PWD") | sha1sum | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$py" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
job=${1:-}
shift || true
case "$job" in
  demo)
    exec "$venv/bin/rankgrpo" demo "$@"
    ;;
  test)
    # The optional native op library is built when cmake is there, so its parity suite runs.
    if command -v cmake >/dev/null 2>&1 && [ -f CMakeLists.txt ]; then
      cmake -S . -B build -DPython_EXECUTABLE="$py" >build.log 2>&1 \
        && cmake --build build -j2 >>build.log 2>&1 \
        || { echo "native build failed (see build.log)"; [ -z "${CI:-}" ] || exit 1; }
    fi
    # The CUDA kernel of that library compiles for sm_90 wherever nvcc exists (nothing runs).
    bash scripts/check_native_cuda_compile.sh
    # tests/test_integration_verl.py: verl without its dependencies (it pins an older
    # transformers, and would pull a CUDA stack), plus what verl.trainer.ppo.core_algos imports.
    # An extra cannot say --no-deps; the stamp makes it once per verl pin.
    verl_want="verl==0.9.1 ray omegaconf tensordict<=0.10 codetiming"
    verl_stamp="$venv/.rankgrpo-verl"
    if [ "$(cat "$verl_stamp" 2>/dev/null || true)" != "$verl_want" ]; then
      "$py" -m pip install -q --no-deps "verl==0.9.1" \
        && "$py" -m pip install -q ray omegaconf "tensordict<=0.10" codetiming \
        && echo "$verl_want" > "$verl_stamp" \
        || { echo "verl install failed: its tests will be skipped"; [ -z "${CI:-}" ] || exit 1; }
    fi
    exec "$py" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh {demo|test} [args]" >&2
    exit 2
    ;;
esac
