#!/bin/bash
# The recorded CPU run (docs/rra): SmolLM2-135M-Instruct teacher, shipped ReDial splits.
# Run from the repository root with its venv active: bash docs/rra/smollm2-redial-24/run_rec.sh
# (N=48 for the resumed 48-record run in smollm2-redial-48/; OUT: the run folder).
set -e
N=${N:-24}
OUT=${OUT:-runs/rra}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
python -c "import rankgrpo; print('rankgrpo from', rankgrpo.__file__)"
date -u
/usr/bin/time -v nice -n 10 python -m rankgrpo.rra.cli \
  max_records=$N max_eval_records=$N teacher_list_size=10 max_new_tokens=96 \
  reflect_top=8 rate_max_new_tokens=112 teacher_batch_size=8 output_dir=$OUT "$@"
date -u
