#!/usr/bin/env bash
# Chimera against its two ablations and its two vLLM peers, all trained from scratch on the
# same data for the same number of steps (issue 14, item 3), then measured inside vLLM on
# the 80 MT-bench first turns (K=4, greedy, 256 tokens) in one run of
# scripts/measure_acceptance.py, every greedy output checked against plain vLLM's.
#
#   bash scripts/compare_same_budget.sh
#   ... train      only the six runs (recipes/smollm2-same-budget.toml; resumable)
#   ... measure    only the vLLM measurement (OUTPUT=results/training/acceptance-same-budget-...;
#                  SKIP="eagle" leaves named drafts out, e.g. a run not trained yet)
#
# The six runs are that recipe's stages (1.08M tokens of the target's answers, 1 epoch):
# chimera (the paper's parallel heads), chimera with sequential heads (the shipped design),
# no-trigram, no-context, medusa, eagle. The Chimera drafts and the ablations are measured
# without the context lookup (method chimera-nolookup): Medusa and EAGLE have none, and
# this compares the drafts themselves. THREADS as scripts/train_smollm2.sh's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
recipe="$here/recipes/smollm2-same-budget.toml"
output="${OUTPUT:-$here/results/training/acceptance-same-budget-v2-e1-unseen768}"

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(train measure)
for stage in "${stages[@]}"; do
  case "$stage" in
    train)
      RECIPE="$recipe" bash "$here/scripts/train_smollm2.sh" ;;
    measure)
      # name=method:run; SKIP="eagle ..." leaves those out (said in the output, never silently)
      drafts=(chimera=chimera-nolookup:01-chimera chimera-seq=chimera-nolookup:02-chimera-seq
              no-trigram=chimera-nolookup:03-no-trigram no-context=chimera-nolookup:04-no-context
              medusa=medusa:05-medusa eagle=eagle:06-eagle)
      flags=()
      for entry in "${drafts[@]}"; do
        name="${entry%%=*}"; method_run="${entry#*=}"; dir="$runs/smollm2-same-budget/${method_run#*:}/draft"
        if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "SKIP: $name not measured"; continue; fi
        [ -f "$dir/config.json" ] || { echo "missing $dir: run stage train (or SKIP=\"$name\")" >&2; exit 2; }
        flags+=(--draft "$name=${method_run%%:*}:$dir")
      done
      "$py" "$here/scripts/measure_acceptance.py" --target smollm2 --num-tokens 4 "${flags[@]}" \
        --output "$output" ;;
    *) echo "unknown stage $stage (train, measure)" >&2; exit 2 ;;
  esac
done
