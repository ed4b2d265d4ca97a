#!/bin/bash
# Interleaved before (8584f49, the tree before issue 20) / after (main) runs of bench rnn's
# four committed 2-thread settings, with their committed commands, R rounds. Quiet machine only.
R=${R:-2}
out=/work/runs/ba
declare -A S
S[gru_pixel]="--cell gru --seq-len 1024 --batch 128 --hidden 64 --input-size 3"
S[gru_long]="--cell gru --seq-len 4096 --batch 16 --hidden 128"
S[gru_char]="--cell gru --seq-len 256 --batch 32 --hidden 512"
S[lstm_char]="--cell lstm --seq-len 256 --batch 32 --hidden 512"
for r in $(seq 1 $R); do
  for name in gru_pixel gru_long gru_char lstm_char; do
    for tree in before after; do
      src=/work/main/src; [ $tree = before ] && src=/work/wt/before/src
      echo "$(date +%T) round $r $name $tree load $(cut -d' ' -f1-3 /proc/loadavg)"
      (cd /tmp && PYTHONPATH=$src python -m highwaybp bench rnn ${S[$name]} --k 0,1,3 --threads 2 --repeats 9 --train-steps 0 --fidelity-k 0 --out $out/${name}_${tree}_r$r.json > $out/${name}_${tree}_r$r.log 2>&1) || echo FAILED $name $tree $r
    done
  done
done
echo "$(date +%T) done"
