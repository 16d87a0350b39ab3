#!/usr/bin/env bash
# After /tmp/chain/after_generation.sh: the shipped draft's held-out figures on the same
# validation cache, then acceptance inside vLLM: shipped vs continued (parallel, sequential).
set -uo pipefail
cd /work/main
until grep -q trained /tmp/chain/chain.log; do sleep 20; done
runs=/root/.cache/vllm-chimera/runs
val=/root/.cache/vllm-chimera/data/sharegpt/validation.smollm2-self.jsonl
OMP_NUM_THREADS=2 .venv/bin/python -m vllm_chimera.training.cli --target smollm2 --train-data "$val" \
  --val-data "$val" --max-length 512 --val-tokens 20000 --num-threads 2 --no-progress \
  --output-dir "$runs/eval-shipped" --evaluate vllm_chimera/drafts/smollm2-chimera > /tmp/chain/eval-shipped.log 2>&1
echo "$(date) evaluated"
.venv/bin/python scripts/measure_acceptance.py --target smollm2 \
  --draft shipped-v2-e3=chimera:vllm_chimera/drafts/smollm2-chimera \
  --draft continued=chimera:$runs/smollm2-chimera-k4-v2-e2-new-from-shipped/draft \
  --draft continued-seq=chimera:$runs/smollm2-chimera-k4-seq-v2-e2-new-from-shipped/draft \
  --num-tokens 4 --output results/training/acceptance-continued > /tmp/chain/acceptance.log 2>&1
echo "$(date) measured"
