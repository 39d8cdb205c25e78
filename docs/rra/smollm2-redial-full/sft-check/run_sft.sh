#!/bin/bash
# `rankgrpo sft` on the full-split rra output (the constrained/expected run), a short CPU run
# that shows the 2,503 records load and the loss falls. Run from the repository root with its
# venv active: OUT=runs/rra-full/expected bash docs/rra/smollm2-redial-full/sft-check/run_sft.sh
set -e
OUT=${OUT:-runs/rra-full/expected}
STEPS=${STEPS:-30}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
git rev-parse --short HEAD 2>/dev/null || true
date -u
/usr/bin/time -v python -m rankgrpo.cli sft \
  --config smollm2-135m-instruct data.catalog=redial data.train_file=$OUT/sft.jsonl \
  data.eval_file=null sft.max_steps=$STEPS sft.per_device_train_batch_size=4 \
  sft.gradient_accumulation_steps=1 sft.learning_rate=1.0e-4 sft.logging_steps=1 \
  sft.save_steps=0 sft.max_length=1024 sft.long_prompts=skip sft.disable_tqdm=true \
  sft.seed=42 sft.output_dir=$OUT-sft
date -u
