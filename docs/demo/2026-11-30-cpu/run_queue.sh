#!/usr/bin/env bash
# Two workers draining a queue of demo runs (issue 16 seeds), each a separate process.
cd <checkout> || exit 2
export PYTHONPATH=<checkout> OMP_WAIT_POLICY=PASSIVE
RG=rankgrpo
job() {  # world seed modes
  local name="$1-seed$2-$(echo "$3" | tr , _)"
  local t0=$SECONDS
  nice -n 10 "$RG" demo --compare --world "$1" --seed "$2" --seeds 1 --segment-modes "$3" \
    --skip-redial --out "runs/cmp3/$name" > "runs/cmp3/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0)) s $(date -u +%H:%M:%S)" >> runs/cmp3/queue.txt
}
worker() { while read -r w s m; do job "$w" "$s" "$m"; done; }
printf '%s\n' "coherent 1 newline,aligned" "coherent 2 newline,aligned" "coherent 0 aligned" | worker &
printf '%s\n' "control 1 newline,aligned" "control 2 newline,aligned" "control 0 aligned" | worker &
wait
