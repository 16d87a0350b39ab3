#!/usr/bin/env bash
# The 60-step pilot that chose the training recipe (recipes/smollm2-chimera.toml): full vs 8192-token
# draft vocabulary, lr 1e-3 vs 3e-3, on the first 80k tokens of ShareGPT (dataset answers), one
# thread each, run one after the other. Results: results/training/pilot-*/metrics.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
out="$runs/pilot"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--target smollm2 --num-heads 4 --max-length 512 --train-tokens 80000 --val-tokens 10000
        --batch-size 4 --micro-batch-size 2 --warmup-ratio 0.05 --save-every 1000 --num-threads 1
        --seed 0 --no-progress --epochs 3 --stop-at-step 60)
pilot() {
  local name="$1"; shift
  "$py" -m vllm_chimera.commands.train "${common[@]}" --output-dir "$out/$name" "$@"
  mkdir -p "$here/results/training/pilot-$name"
  cp "$out/$name/metrics.json" "$here/results/training/pilot-$name/"
}
pilot full-lr1e-3 --lr 1e-3
pilot v8k-lr1e-3 --lr 1e-3 --draft-vocab-size 8192
pilot v8k-lr3e-3 --lr 3e-3 --draft-vocab-size 8192
