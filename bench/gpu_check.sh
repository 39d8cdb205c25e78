#!/usr/bin/env bash
# The one script for a GPU machine without network access: GPU tests, then the `standard`
# benchmark suite, in about 7.5 minutes on an H100.
#
#   bash bench/gpu_check.sh [OUT_DIR]      (OUT_DIR: default $OUT, else bench/out/gpu_check)
#
# It installs nothing but the two peers, and only when they are missing: liger-kernel and
# cut-cross-entropy, pure-Python wheels taken from $WHEELS (default .whl/) into a temporary
# target folder put on PYTHONPATH (pip --no-index --no-deps). torch and triton are the
# machine's own. The package is used from this checkout without installing it (a link named
# rankgrpo_kernels -> kernels/ on PYTHONPATH).
#
# Writes five files into OUT_DIR: gpu_check.log (everything printed, pytest included),
# results.json, table.md, time_vs_T.png, memory_vs_T.png; prints the short table last.
#
# Environment: PYTHON (default python3), WHEELS (default <repo>/.whl), GPU_CHECK_BUDGET_S
# (whole script, default 450), PYTEST_BUDGET_S (default 150), RANKGRPO_COMMIT (recorded as
# the commit when the checkout has no .git), BENCH_SUITE (default standard; `smoke` for a dry
# run on a machine without a GPU), BENCH_ARGS (extra arguments for python -m bench).
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
TOTAL=${GPU_CHECK_BUDGET_S:-450}
PYTEST_BUDGET=${PYTEST_BUDGET_S:-150}
SUITE=${BENCH_SUITE:-standard}
WHEELS=${WHEELS:-$REPO/.whl}
elapsed() { echo $(( $(date +%s) - START )); }

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ): repo $REPO, output $OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv
else
  echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
EOF

# 1. This checkout's kernel package under its import name, without installing it.
if ! "$PY" -c "import rankgrpo_kernels" >/dev/null 2>&1; then
  LINKS=$(mktemp -d /tmp/rankgrpo_path.XXXXXX)
  ln -s "$REPO/kernels" "$LINKS/rankgrpo_kernels"
  [ -d "$REPO/rankgrpo" ] && ln -s "$REPO/rankgrpo" "$LINKS/rankgrpo"
  export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# 2. The peers, from wheels, only when missing.
need=()
"$PY" -c "import liger_kernel" >/dev/null 2>&1 || need+=("liger_kernel")
"$PY" -c "import cut_cross_entropy" >/dev/null 2>&1 || need+=("cut_cross_entropy")
if [ ${#need[@]} -gt 0 ]; then
  files=()
  for n in "${need[@]}"; do
    for f in "$WHEELS/$n"-*.whl; do [ -e "$f" ] && files+=("$f"); done
  done
  if [ ${#files[@]} -gt 0 ]; then
    SITE=$(mktemp -d /tmp/rankgrpo_site.XXXXXX)
    echo "installing ${files[*]##*/} into $SITE"
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
# 2b. The optional native op library, built here against this machine's CUDA torch (a build
# made elsewhere would not load), so its CUDA parity tests and bench row run too.
if [ -z "${RANKGRPO_NATIVE_LIB:-}" ] && command -v cmake >/dev/null 2>&1; then
  NBUILD=$(mktemp -d /tmp/rankgrpo_native.XXXXXX)
  if timeout -k 5 120 cmake -S "$REPO" -B "$NBUILD" -DPYTHON_EXECUTABLE="$(command -v "$PY")" \
       >"$NBUILD/configure.log" 2>&1 && timeout -k 5 120 cmake --build "$NBUILD" -j8 \
       >"$NBUILD/build.log" 2>&1; then
    export RANKGRPO_NATIVE_LIB="$NBUILD/librankgrpo_native.so"
    echo "native op library built: $RANKGRPO_NATIVE_LIB [$(elapsed) s]"
  else
    echo "native op library build failed; its tests and bench row will be skipped:"
    tail -n 15 "$NBUILD"/*.log
  fi
fi
"$PY" - <<'EOF'
import importlib.metadata as md
import rankgrpo_kernels as rk
print("rankgrpo_kernels from", rk.__file__, "| triton_available", rk.triton_available(),
      "| native_available", rk.native_available())
for d in ("liger-kernel", "cut-cross-entropy"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
EOF

# 3. GPU tests (tests/test_gpu_*.py and anything else marked gpu).
echo; echo "== pytest -m gpu (at most ${PYTEST_BUDGET} s) [$(elapsed) s]"
timeout -k 10 "$PYTEST_BUDGET" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests
PYTEST_RC=$?
case $PYTEST_RC in
  0) PYTEST_STATUS="passed" ;;
  5) PYTEST_STATUS="no GPU tests collected" ;;
  124|137) PYTEST_STATUS="timed out after ${PYTEST_BUDGET} s" ;;
  *) PYTEST_STATUS="FAILED (exit $PYTEST_RC)" ;;
esac
echo "pytest -m gpu: $PYTEST_STATUS [$(elapsed) s]"

# 4. The benchmark, within what is left (40 s kept for the last cell, plots and the table).
BUDGET=$(( TOTAL - $(elapsed) - 40 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo; echo "== python -m bench --suite $SUITE --budget-s $BUDGET [$(elapsed) s]"
# The budget is the suite's own (it skips what would not fit); the timeout is a backstop.
# shellcheck disable=SC2086
timeout -k 10 $(( BUDGET + 60 )) \
  "$PY" -m bench --suite "$SUITE" --out "$OUT_DIR" --budget-s "$BUDGET" --no-table ${BENCH_ARGS:-}
BENCH_RC=$?
if [ -s "$OUT_DIR/results.json" ] && [ ! -s "$OUT_DIR/time_vs_T.png" ]; then
  "$PY" -m bench --replot "$OUT_DIR/results.json"  # the suite was cut short: plot what it has
fi

# 5. Summary, the short table last.
echo; echo "== gpu_check done in $(elapsed) s: pytest -m gpu $PYTEST_STATUS; bench exit $BENCH_RC"
echo "files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if [ -s "$OUT_DIR/results.json" ]; then
  "$PY" -m bench --show "$OUT_DIR/results.json"
fi
[ "$BENCH_RC" -eq 0 ] && { [ "$PYTEST_RC" -eq 0 ] || [ "$PYTEST_RC" -eq 5 ]; }
