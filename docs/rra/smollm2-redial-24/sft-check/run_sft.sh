#!/bin/bash
# `rankgrpo sft` a few steps on the recorded rra output (proves the format trains).
# Run from the repository root with its venv active, after run_rec.sh (OUT: its run folder).
set -e
OUT=${OUT:-runs/rra}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
python -c "import rankgrpo; print('rankgrpo from', rankgrpo.__file__)"
date -u
/usr/bin/time -v nice -n 10 python -m rankgrpo.cli sft \
  --config smollm2-135m-instruct data.catalog=redial data.train_file=$OUT/sft.jsonl \
  sft.max_steps=3 sft.per_device_train_batch_size=2 sft.gradient_accumulation_steps=1 \
  sft.save_steps=0 sft.max_length=1024 sft.disable_tqdm=true sft.output_dir=$OUT-sft
date -u
