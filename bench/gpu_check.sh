#!/usr/bin/env bash
# The one script for a GPU machine without network access, about 9 minutes on an H100/H200
# by its budgets (the standard suite with every contender needs ~5 of them):
#   1. card.txt: date, commit, card, driver, versions (written first: it survives a cut run)
#   2. pytest -m gpu: every GPU test, T = 131072 parity on the 0.5B and 7B heads included
#   3. round 2: dhidden "accumulate" vs "recompute" (and memory-lean variants): time, TFLOP/s,
#      share of the matmul rate, extra peak memory, at T = 8192 and 32768 on the three heads,
#      then T = 131072 on the 0.5B and 7B heads (tools/triton_tune -> round2.json)
#   4. accuracy: every contender against float64 on the same inputs (bench.accuracy)
#   5. the standard suite with every contender, within what is left of the budget
#
#   bash bench/gpu_check.sh [OUT_DIR]      (OUT_DIR: default $OUT, else bench/out/gpu_check)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh /tmp/x    (no GPU: every step in its CPU form)
#
# Installs nothing but the peers, and only those missing: liger-kernel, cut-cross-entropy and
# trl, with datasets, dill and multiprocess for trl's package import (pure-Python wheels from
# $WHEELS, default .whl/, into a temporary folder on PYTHONPATH; pip --no-index --no-deps). torch,
# triton and transformers are the machine's own. The packages are used from this checkout
# (its root on PYTHONPATH), not installed.
#
# Writes at most 8 files into OUT_DIR (the device tool returns 8): gpu_check.log (everything
# printed), card.txt, round2.json, accuracy.json, results.json, table.md, time_vs_T.png,
# memory_vs_T.png.
#
# Environment: PYTHON (default python3), WHEELS, GPU_CHECK_BUDGET_S (whole script, default
# 540), PYTEST_BUDGET_S (default 200: 18 GPU tests took 153 s on an H200), ROUND2_BUDGET_S
# and LONG_BUDGET_S (default 0: measured on 2026-11-29; 85 and 35 rerun them),
# ACCURACY_BUDGET_S (default 60; a budget of 0 skips its step), RANKGRPO_COMMIT (recorded when the checkout has no .git), BENCH_SUITE (default
# standard), BENCH_ARGS (extra arguments for python -m bench), ROUND2_CANDIDATES,
# LONG_CANDIDATES (';'-separated RANKGRPO_TRITON_CONFIG strings).
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT_DIR=${1:-${OUT:-$REPO/bench/out/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1

PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
TOTAL=${GPU_CHECK_BUDGET_S:-540}
PYTEST_BUDGET=${PYTEST_BUDGET_S:-200}
# Round 2 was measured on 2026-11-29 (bench/results/2026-11-29-h200-round2/): off unless asked
ROUND2_BUDGET=${ROUND2_BUDGET_S:-0}
LONG_BUDGET=${LONG_BUDGET_S:-0}
ACCURACY_BUDGET=${ACCURACY_BUDGET_S:-60}
SUITE=${BENCH_SUITE:-standard}
WHEELS=${WHEELS:-$REPO/.whl}
ROUND2=${ROUND2_CANDIDATES:-"default;dhidden=recompute;dhidden=recompute,slab_mib=64;dhidden=recompute,slab_mib=32,fill=1"}
LONG=${LONG_CANDIDATES:-"default;dhidden=recompute;dhidden=recompute,slab_mib=32,fill=1"}
elapsed() { echo $(( $(date +%s) - START )); }
if [ "$DRY" != "0" ]; then
  SUITE=${BENCH_SUITE:-smoke}
  echo "DRY RUN (GPU_CHECK_DRY_RUN=$DRY): CPU forms of every step, suite $SUITE"
fi

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ): output $OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# 1. The peers, from wheels, only when missing.
need=()
"$PY" -c "import liger_kernel" >/dev/null 2>&1 || need+=("liger_kernel")
"$PY" -c "import cut_cross_entropy" >/dev/null 2>&1 || need+=("cut_cross_entropy")
"$PY" -c "import trl.kernels.chunked_logprob" >/dev/null 2>&1 || need+=("trl")
# trl's package import needs datasets (and it dill and multiprocess), absent from the GPU image
"$PY" -c "import datasets" >/dev/null 2>&1 || need+=("datasets" "dill" "multiprocess")
if [ ${#need[@]} -gt 0 ]; then
  files=()
  for n in "${need[@]}"; do
    for f in "$WHEELS/$n"-*.whl; do [ -e "$f" ] && files+=("$f"); done
  done
  if [ ${#files[@]} -gt 0 ]; then
    SITE=$(mktemp -d /tmp/rankgrpo_site.XXXXXX)
    echo "installing ${files[*]##*/} into a temporary folder"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${files[@]}"; then
      export PYTHONPATH="$SITE:$PYTHONPATH"
    else
      echo "pip install from $WHEELS failed: those peers will be reported as skipped"
    fi
  else
    echo "missing ${need[*]} and no wheels for them in $WHEELS: reported as skipped"
  fi
fi

# 2. The optional native op library, built against this machine's CUDA torch.
if [ "$DRY" = "0" ] && [ -z "${RANKGRPO_NATIVE_LIB:-}" ] && command -v cmake >/dev/null 2>&1; then
  NBUILD=$(mktemp -d /tmp/rankgrpo_native.XXXXXX)
  if timeout -k 5 120 cmake -S "$REPO" -B "$NBUILD" -DPYTHON_EXECUTABLE="$(command -v "$PY")" \
       >"$NBUILD/configure.log" 2>&1 && timeout -k 5 120 cmake --build "$NBUILD" -j8 \
       >"$NBUILD/build.log" 2>&1; then
    export RANKGRPO_NATIVE_LIB="$NBUILD/librankgrpo_native.so"
    echo "native op library built [$(elapsed) s]"
  else
    echo "native op library build failed; its tests and bench row will be skipped:"
    tail -n 15 "$NBUILD"/*.log
  fi
fi

# 3. card.txt: what every number of this run is tied to.
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "${RANKGRPO_COMMIT:-unknown}")
  dirty=$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | head -c1)
  echo "commit: $commit${dirty:+ (+ uncommitted changes)}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| GPU:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| SMs:", torch.cuda.get_device_properties(0).multi_processor_count
      if torch.cuda.is_available() else "-")
for d in ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "trl", "numpy",
          "matplotlib"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
import rankgrpo_kernels as rk
print("rankgrpo_kernels", rk.__version__, "| triton_available", rk.triton_available(),
      "| native_available", rk.native_available())
EOF
} > "$OUT_DIR/card.txt" 2>&1
cat "$OUT_DIR/card.txt"

# 4. GPU tests (tests/test_gpu_*.py and anything else marked gpu).
echo; echo "== pytest -m gpu (at most ${PYTEST_BUDGET} s) [$(elapsed) s]"
if [ "$PYTEST_BUDGET" -gt 0 ]; then
  timeout -k 10 "$PYTEST_BUDGET" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs \
    --durations=8 tests
  PYTEST_RC=$?
else
  PYTEST_RC=5; echo "skipped (PYTEST_BUDGET_S=0)"
fi
case $PYTEST_RC in
  0) PYTEST_STATUS="passed" ;;
  5) PYTEST_STATUS="no GPU tests collected" ;;
  124|137) PYTEST_STATUS="timed out after ${PYTEST_BUDGET} s" ;;
  *) PYTEST_STATUS="FAILED (exit $PYTEST_RC)" ;;
esac
echo "pytest -m gpu: $PYTEST_STATUS [$(elapsed) s]"

# 5. Round 2: dhidden accumulate vs recompute (phase 1 alone, bf16), then T = 131072.
TUNE=("$PY" -m tools.triton_tune --json "$OUT_DIR/round2.json")
[ "$DRY" != "0" ] && TUNE+=(--plan-only)
echo; echo "== round 2: dhidden modes at T=8192 and 32768 (at most ${ROUND2_BUDGET} s) [$(elapsed) s]"
R2_START=$(date +%s)
R2A=- R2B=- R2C=-
if [ "$ROUND2_BUDGET" -gt 0 ]; then
  timeout -k 5 $(( ROUND2_BUDGET * 2 / 5 )) "${TUNE[@]}" --tokens 8192 --candidates "$ROUND2"
  R2A=$?
  left=$(( ROUND2_BUDGET - ($(date +%s) - R2_START) ))
  [ "$left" -lt 20 ] && left=20
  timeout -k 5 "$left" "${TUNE[@]}" --tokens 32768 --candidates "$ROUND2"
  R2B=$?
else
  echo "skipped (ROUND2_BUDGET_S=0)"
fi
echo; echo "== long context: T=131072 (at most ${LONG_BUDGET} s) [$(elapsed) s]"
if [ "$LONG_BUDGET" -gt 0 ]; then
  timeout -k 5 "$LONG_BUDGET" "${TUNE[@]}" --tokens 131072 --shapes qwen2.5-0.5b,qwen2.5-7b \
    --reps 2 --candidates "$LONG"
  R2C=$?
else
  echo "skipped (LONG_BUDGET_S=0)"
fi
echo "round 2 exits: T=8192 $R2A, T=32768 $R2B, T=131072 $R2C [$(elapsed) s]"

# 5b. Accuracy: every contender's loss, gradients and log-probs against float64, same inputs.
echo; echo "== accuracy against float64 (at most ${ACCURACY_BUDGET} s) [$(elapsed) s]"
ACC_RC=-
if [ "$ACCURACY_BUDGET" -gt 0 ]; then
  ACC=("$PY" -m bench.accuracy --out "$OUT_DIR")
  if [ "$DRY" != "0" ]; then
    ACC+=(--device cpu --dtype float32 --shape small --tokens 256 --completion-len 128)
  else
    ACC+=(--device cuda --tokens 4096 --completion-len 1024)
  fi
  timeout -k 5 "$ACCURACY_BUDGET" "${ACC[@]}"
  ACC_RC=$?
else
  echo "skipped (ACCURACY_BUDGET_S=0)"
fi

# 6. The standard suite, every contender, within what is left (40 s kept for the end).
BUDGET=$(( TOTAL - $(elapsed) - 40 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo; echo "== python -m bench --suite $SUITE --budget-s $BUDGET [$(elapsed) s]"
# shellcheck disable=SC2086
timeout -k 10 $(( BUDGET + 60 )) \
  "$PY" -m bench --suite "$SUITE" --out "$OUT_DIR" --budget-s "$BUDGET" --no-table ${BENCH_ARGS:-}
BENCH_RC=$?
if [ -s "$OUT_DIR/results.json" ] && [ ! -s "$OUT_DIR/time_vs_T.png" ]; then
  "$PY" -m bench --replot "$OUT_DIR/results.json"  # the suite was cut short: plot what it has
fi

# 7. Summary, the short tables last.
echo; echo "== gpu_check done in $(elapsed) s: pytest -m gpu $PYTEST_STATUS; round 2 exits" \
  "$R2A/$R2B/$R2C; accuracy exit $ACC_RC; bench exit $BENCH_RC"
echo "files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if [ -s "$OUT_DIR/round2.json" ]; then
  "$PY" - "$OUT_DIR/round2.json" <<'EOF'
import json
import sys

rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
print(f"{'shape':13} {'T':>6} {'config':40} {'step ms':>8} {'%mm':>5} {'extra MiB':>9} "
      f"{'plan MiB':>8}")
for r in rows:
    if r.get("status") == "ok":
        got = (f"{r['step_ms']:8.2f} {100 * r['step_frac_mm']:5.0f} "
               f"{r['extra_mib']:9.0f}")
    else:
        got = f"{r.get('status', '?'):>24}"
    print(f"{r['shape']:13} {r['tokens']:>6} {r['config']:40} {got} {r['plan_mib']:8.1f}")
EOF
fi
if [ -s "$OUT_DIR/results.json" ]; then
  "$PY" -m bench --show "$OUT_DIR/results.json"
fi
[ "$BENCH_RC" -eq 0 ] && { [ "$PYTEST_RC" -eq 0 ] || [ "$PYTEST_RC" -eq 5 ]; }
