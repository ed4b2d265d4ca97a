#!/bin/bash
# issue 19: the GRU word LM with hbp.GRU(split="diagonal"), every arm, 5 seeds (e3df7a9)
cd /work/wt/split
export PYTHONPATH=src
ARMS="exact;highway:k=1;highway:k=2;highway:k=3;highway:k=5;highway:k=2,anderson=5;highway:k=3,anderson=5;highway:k=5,anderson=5;auto"
python -m highwaybp experiment recipes --recipe wordlm-gru --split diagonal --steps 300 --eval-every 50 --probe-every 100 \
    --probe-k 1,2,3,5,8 --probe-anderson 5 --arms "$ARMS" --seeds 0,1,2 --threads 1 --out /work/runs/split/a > /work/runs/split/a.log 2>&1 &
python -m highwaybp experiment recipes --recipe wordlm-gru --split diagonal --steps 300 --eval-every 50 --probe-every 100 \
    --probe-k 1,2,3,5,8 --probe-anderson 5 --arms "$ARMS" --seeds 3,4 --threads 1 --out /work/runs/split/b > /work/runs/split/b.log 2>&1 &
wait
