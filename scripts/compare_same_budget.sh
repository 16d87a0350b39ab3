#!/usr/bin/env bash
# Chimera against its two ablations and its two vLLM peers, all trained from scratch on the
# same data for the same number of steps (issue 14, item 3), then measured inside vLLM on
# the 80 MT-bench first turns (K=4, greedy, 256 tokens) in one run of
# scripts/measure_acceptance.py, every greedy output checked against plain vLLM's.
#
#   RECIPE=v2 DATA=unseen EPOCHS=1 THREADS=2 bash scripts/compare_same_budget.sh
#   ... train      only the six runs (each resumes from its checkpoint if interrupted)
#   ... measure    only the vLLM measurement (OUTPUT=results/training/acceptance-same-budget-...;
#                  SKIP="eagle" leaves named drafts out, e.g. a run not trained yet)
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
      # name=method:run; SKIP="eagle ..." leaves those out (said in the output, never silently)
      drafts=(chimera=chimera-nolookup:chimera-k4 chimera-seq=chimera-nolookup:chimera-k4-seq
              no-trigram=chimera-nolookup:no-trigram-k4 no-context=chimera-nolookup:no-context-k4
              medusa=medusa:medusa-k4 eagle=eagle:eagle-k4)
      flags=()
      for entry in "${drafts[@]}"; do
        name="${entry%%=*}"; method_run="${entry#*=}"; dir="$runs/smollm2-${method_run#*:}$suffix/draft"
        if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "SKIP: $name not measured"; continue; fi
        [ -f "$dir/config.json" ] || { echo "missing $dir: run stage train (or SKIP=\"$name\")" >&2; exit 2; }
        flags+=(--draft "$name=${method_run%%:*}:$dir")
      done
      "$py" "$here/scripts/measure_acceptance.py" --target smollm2 --num-tokens 4 "${flags[@]}" \
        --output "$output" ;;
    *) echo "unknown stage $stage (train, measure)" >&2; exit 2 ;;
  esac
done
