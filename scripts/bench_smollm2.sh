#!/usr/bin/env bash
# The benchmark README quotes: SmolLM2-135M-Instruct, MT-bench first turns, every method
# vLLM offers side by side in one run (chimera-bench, one engine per method, fresh process).
#
#   bash scripts/bench_smollm2.sh                  # full: 80 prompts x 128 tokens, batch 1/4/16
#   QUICK=1 bash scripts/bench_smollm2.sh          # a few minutes: 8 prompts x 32 tokens
#   METHODS=plain,chimera NUM_PROMPTS=40 OUTPUT=results/bench/smollm2-step-aside \
#       bash scripts/bench_smollm2.sh               # Chimera with its defaults (the schedule)
#   ROUNDS=3 ...                                    # every method 3 times, round after round
#       (the same method moves 10-25% between processes here: rows = the median round)
#
# Methods: plain, n-gram, vLLM's Medusa and EAGLE with the drafts trained on the same data
# and budget as Chimera (RECIPE=recipes/smollm2-same-budget.toml bash scripts/train_smollm2.sh;
# K=4; EAGLE also at K=1, its cheapest),
# and Chimera at K = 1 and 4 (the shipped draft), from which the step-aside schedule (the
# best K per batch size, 0 where none beats plain) is derived (bench.json:
# step_aside_schedule). Greedy rows are checked token for token against plain decoding.
# An interrupted run resumes: finished methods are kept in OUTPUT/runs/.
#
# On a GPU machine (after CHIMERA_GPU=1 bash scripts/setup.sh):
#   EXTRA="--dtype bfloat16 --no-step-times" bash scripts/bench_smollm2.sh   (CUDA graphs: vLLM's default)
# (--no-step-times: the per-step timing synchronises the GPU around every timed call; in
# bfloat16 greedy outputs may differ from plain decoding's in near-ties, which the table shows.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
methods="${METHODS:-plain,ngram,medusa,eagle:1,eagle,chimera:1,chimera:4}"
output="${OUTPUT:-$here/results/bench/smollm2}"
size=(--num-prompts "${NUM_PROMPTS:-80}" --max-tokens 128 --batch-sizes 1,4,16)
[ -z "${QUICK:-}" ] || { size=(--quick); output="${OUTPUT:-$here/results/bench/smollm2-quick}"; }

peer_drafts=()  # the peers' drafts, only for the methods asked for (plain,chimera needs none)
for kind in medusa eagle; do
  [[ ",$methods," =~ ,$kind[,:] ]] || continue
  draft="$(ls -d "$runs"/smollm2-same-budget/*-"$kind"/draft 2>/dev/null | tail -1)"
  [ -n "$draft" ] && [ -f "$draft/config.json" ] || {
    echo "no $kind draft in $runs/smollm2-same-budget/NN-$kind/draft: run" \
         "RECIPE=recipes/smollm2-same-budget.toml bash scripts/train_smollm2.sh --stage $kind" >&2
    exit 1; }
  peer_drafts+=(--$kind-draft "$draft")
done
if [[ ",$methods," =~ ,suffix[,:] ]]; then  # vLLM's suffix decoding: arctic-inference, built aside
  export PYTHONPATH="$(bash "$here/scripts/build_arctic_suffix.sh")${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$(dirname "$output")"
"$py" -c "from vllm_chimera.commands.bench import bench_main; raise SystemExit(bench_main())" --target smollm2 \
  --draft "$here/vllm_chimera/drafts/smollm2-chimera" "${peer_drafts[@]}" \
  --methods "$methods" "${size[@]}" --rounds "${ROUNDS:-1}" --output "$output" ${EXTRA:-} 2>&1 | tee -a "$output.log"
