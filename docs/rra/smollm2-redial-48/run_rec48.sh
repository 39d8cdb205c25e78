#!/bin/bash
# The recorded CPU run (docs/rra): SmolLM2-135M-Instruct teacher, shipped ReDial splits.
set -e
export PYTHONPATH=/tmp/rg/rra-snap OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
cd /tmp/rg/h3
/work/main/.venv/bin/python -c "import rankgrpo; print('rankgrpo from', rankgrpo.__file__)"
date -u
/usr/bin/time -v nice -n 10 /work/main/.venv/bin/python -m rankgrpo.rra.cli \
  max_records=48 max_eval_records=48 teacher_list_size=10 max_new_tokens=96 \
  reflect_top=8 rate_max_new_tokens=112 teacher_batch_size=8 output_dir=/tmp/rg/h3/rec "$@"
date -u
