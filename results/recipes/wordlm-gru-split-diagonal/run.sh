#!/bin/bash
# Issue 19's study with hbp.GRU(split="diagonal"): every file under results/recipes/*split-diagonal*.
# Run from the repository root (or a worktree of the commit to measure); OUT: scratch runs;
# two processes of 1 thread at a time (a 2-core machine), then --combine into results/.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PYTHONPATH=src
OUT=${OUT:-runs/split-diagonal}
HBP="python -m highwaybp experiment recipes --split diagonal --threads 1"
ARMS="exact;highway:k=1;highway:k=2;highway:k=3;highway:k=5;highway:k=2,anderson=5;highway:k=3,anderson=5;highway:k=5,anderson=5;auto"
STUDY="--recipe wordlm-gru --steps 300 --eval-every 50 --probe-every 100 --probe-k 1,2,3,5,8 --probe-anderson 5"
$HBP $STUDY --arms "$ARMS" --seeds 0,1,2 --out $OUT/a > $OUT/a.log 2>&1 &
$HBP $STUDY --arms "$ARMS" --seeds 3,4 --out $OUT/b > $OUT/b.log 2>&1 &
wait
$HBP --combine $OUT/a/wordlm-gru/recipes.json $OUT/b/wordlm-gru/recipes.json \
    --out results/recipes/wordlm-gru-split-diagonal
GPU="--recipe wordlm-gru --steps 300 --eval-every 50 --probe-every 0 --arms exact;auto:break_even=5"
$HBP $GPU --seeds 0,1,2 --out $OUT/gpu-a > $OUT/gpu-a.log 2>&1 &
$HBP $GPU --seeds 3,4 --out $OUT/gpu-b > $OUT/gpu-b.log 2>&1 &
wait
$HBP --combine $OUT/gpu-a/wordlm-gru/recipes.json $OUT/gpu-b/wordlm-gru/recipes.json \
    --out results/recipes/wordlm-gru-split-diagonal-gpu-break-even
# goal 1's gradient (1 layer, 50 steps), both tokenisations
G1="--layers 1 --steps 50 --arms exact --seeds 0 --probe-every 50 --probe-k 1,2,3,5,8,10,35 --probe-anderson 3,5"
$HBP $G1 --out results/recipes/grad1layer-split-diagonal > $OUT/g1.log 2>&1 &
$HBP $G1 --tokenize raw --out results/recipes/grad1layer-split-diagonal-raw > $OUT/g1raw.log 2>&1 &
wait
# the other GRU recipes' gradient under this split (the exact arm's model, seed 0)
PROBE="--steps 300 --eval-every 150 --arms exact --seeds 0 --probe-every 150 --probe-k 1,2,3,5,8 --probe-anderson 5"
$HBP $PROBE --recipe pixel-gru --out results/recipes/split-diagonal-probes > $OUT/pixel.log 2>&1 &
$HBP $PROBE --recipe charlm-gru --out results/recipes/split-diagonal-probes > $OUT/charlm.log 2>&1 &
wait
rm -rf results/recipes/*split-diagonal*/*/checkpoints results/recipes/*split-diagonal*/*/config.json
