#!/bin/bash
# Stage 1 over the whole shipped ReDial train split (2,503 records), ablation on the whole test
# split (333 records), SmolLM2-135M-Instruct teacher in bfloat16 on CPU. Run from the
# repository root with its venv active:
#   OUT=runs/rra-full/lists bash docs/rra/smollm2-redial-full/run_full.sh reflect=false
#   OUT=runs/rra-full/constrained bash docs/rra/smollm2-redial-full/run_full.sh rate_decoding=constrained
# Both share CACHE (every teacher answer), so the second asks the teacher for ratings only, and
# rerunning either resumes. List length and N_r are shortened as in ../smollm2-redial-24.
set -e
OUT=${OUT:-runs/rra-full/out}
CACHE=${CACHE:-runs/rra-full/cache}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
git rev-parse --short HEAD 2>/dev/null || true
date -u
/usr/bin/time -v python -m rankgrpo.rra.cli \
  max_records=null max_eval_records=null teacher_list_size=10 max_new_tokens=96 \
  reflect_top=8 rate_max_new_tokens=112 teacher_batch_size=16 teacher_dtype=bfloat16 \
  output_dir=$OUT cache_dir=$CACHE "$@"
date -u
