#!/usr/bin/env bash
# A short GPU session for kernel configuration work (about 5 minutes on an H200): the Triton
# GPU parity tests, then `tools.triton_tune` over candidate configurations at
# T=8192 (three shapes) and T=32768 (the small and the large head). Logs go to OUT_DIR.
#
#   bash bench/gpu_tune.sh [OUT_DIR]      (default $OUT, else bench/out/gpu_tune)
#
# Environment: PYTHON (default python3); TUNE_CANDIDATES / TUNE_CANDIDATES_LONG override the
# candidate lists (';'-separated RANKGRPO_TRITON_CONFIG strings).
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT_DIR=${1:-${OUT:-$REPO/bench/out/gpu_tune}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # rankgrpo_kernels and tools, uninstalled
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 \
  | tee "$OUT_DIR/env.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" \
  | tee -a "$OUT_DIR/env.log"

timeout -k 5 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/test_gpu_triton.py \
  2>&1 | tee "$OUT_DIR/pytest.log"
RC=$?

SHORT=${TUNE_CANDIDATES:-"default;fwd=128x256x64w8s3,dz=128x256x64w8s3;fwd=64x256x64w8s4,dz=64x256x64w8s4;fwd=128x128x128w8s3,dz=128x128x128w8s3;fwd=64x128x64w4s4,dz=64x128x64w4s4;v_split=16384;v_split=4096;group=32;dw=128x256x64w8s3,dh=128x256x64w8s3;dh=128x128x64w4s4"}
LONG=${TUNE_CANDIDATES_LONG:-"default;slab_mib=16;slab_mib=256;dw=128x256x64w8s3,dh=128x256x64w8s3"}
timeout -k 5 200 "$PY" -m tools.triton_tune --tokens 8192 --candidates "$SHORT" \
  2>&1 | tee "$OUT_DIR/tune_T8192.log"
timeout -k 5 90 "$PY" -m tools.triton_tune --tokens 32768 \
  --shapes qwen2.5-0.5b,qwen2.5-7b --candidates "$LONG" 2>&1 | tee "$OUT_DIR/tune_T32768.log"
exit $RC
