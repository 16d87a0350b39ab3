#!/usr/bin/env bash
# Chimera against its two ablations and its two vLLM peers, all trained from scratch on the
# same data for the same number of steps (issue 14, item 3), then measured inside vLLM on
# the 80 MT-bench first turns (K=4, greedy, 256 tokens) in one run of
# scripts/measure_acceptance.py, every greedy output checked against plain vLLM's.
#
#   RECIPE=v2 DATA=unseen EPOCHS=1 THREADS=2 bash scripts/compare_same_budget.sh
#   ... train      only the six runs (each resumes from its checkpoint if interrupted)
#   ... measure    only the vLLM measurement (OUTPUT=results/training/acceptance-same-budget-...)
#
# The six runs (train_smollm2.sh stages, so the same settings and names as there):
# chimera (the paper's parallel heads), chimera with sequential heads (SEQUENTIAL=1, the
# shipped design), no-trigram, no-context, medusa, eagle. The Chimera drafts and the
# ablations are measured without the context lookup (method chimera-nolookup): Medusa and
# EAGLE have none, and this compares the drafts themselves.
# DATA, EPOCHS, RECIPE and THREADS are train_smollm2.sh's; the cache must hold DATA
# (bash scripts/train_smollm2.sh cache with the same DATA first, or it is filled here).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
: "${DATA:?set DATA (train_smollm2.sh data sets, e.g. unseen)}" "${EPOCHS:?set EPOCHS}"
recipe="${RECIPE:-v2}"
train="$here/scripts/train_smollm2.sh"
# The run names train_smollm2.sh gives these settings (INIT and LR must be unset).
[ -z "${INIT:-}${LR:-}" ] || { echo "compare_same_budget.sh trains from scratch at the default lr: unset INIT and LR" >&2; exit 2; }
suffix="$(RECIPE="$recipe" bash "$train" run-suffix | sed -n 's/^run-suffix: //p')"
output="${OUTPUT:-$here/results/training/acceptance-same-budget$suffix}"

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(train measure)
for stage in "${stages[@]}"; do
  case "$stage" in
    train)
      RECIPE="$recipe" bash "$train" cache chimera no-trigram no-context medusa eagle
      RECIPE="$recipe" SEQUENTIAL=1 bash "$train" chimera ;;
    measure)
      draft() { echo "$runs/smollm2-$1$suffix/draft"; }
      for name in chimera-k4 chimera-k4-seq no-trigram-k4 no-context-k4 medusa-k4 eagle-k4; do
        [ -f "$(draft "$name")/config.json" ] || { echo "missing $(draft "$name"): run stage train" >&2; exit 2; }
      done
      "$py" "$here/scripts/measure_acceptance.py" --target smollm2 --num-tokens 4 \
        --draft "chimera=chimera-nolookup:$(draft chimera-k4)" \
        --draft "chimera-seq=chimera-nolookup:$(draft chimera-k4-seq)" \
        --draft "no-trigram=chimera-nolookup:$(draft no-trigram-k4)" \
        --draft "no-context=chimera-nolookup:$(draft no-context-k4)" \
        --draft "medusa=medusa:$(draft medusa-k4)" \
        --draft "eagle=eagle:$(draft eagle-k4)" \
        --output "$output" ;;
    *) echo "unknown stage $stage (train, measure)" >&2; exit 2 ;;
  esac
done
