#!/usr/bin/env bash
# The README's results: SmolLM2-135M-Instruct + the shipped draft against every method vLLM
# offers without training (plain, n-gram, suffix decoding), at vLLM's default compilation
# (compile mode on CPU), one engine per method in a fresh process, plain in every round.
#
#   bash scripts/bench_defaults.sh                       # MT-bench and code, batch 1
#   PROMPTS=code ROUNDS=3 NUM_PROMPTS=16 bash scripts/bench_defaults.sh
#   BATCH_SIZES=1,2,4,8,16 bash scripts/bench_defaults.sh
# Outputs: results/bench/defaults-<prompts>-b<batch sizes>/ (bench.json, bench.md, runs/),
# then `python scripts/update_readme_results.py` writes the README blocks from them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
methods="${METHODS:-plain,ngram,suffix,chimera}"
batch_sizes="${BATCH_SIZES:-1}"
for prompts in ${PROMPTS:-mtbench code}; do
  output="$here/results/bench/defaults-$prompts-b${batch_sizes//,/-}"
  "$py" -m vllm_chimera.commands.bench --target smollm2 \
    --draft "$here/vllm_chimera/drafts/smollm2-chimera" --methods "$methods" \
    --prompts "$prompts" --num-prompts "${NUM_PROMPTS:-8}" --max-tokens "${MAX_TOKENS:-128}" \
    --batch-sizes "$batch_sizes" --temperature 0 --rounds "${ROUNDS:-2}" --output "$output" \
    ${EXTRA:-} 2>&1 | tee -a "$output.log"
done
