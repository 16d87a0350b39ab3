#!/usr/bin/env bash
# Reproduce the shipped SmolLM2-135M-Instruct draft from its recipe file:
#
#   bash scripts/train_smollm2.sh                   # every stage of recipes/smollm2-chimera.toml
#   bash scripts/train_smollm2.sh --ship            # ... then write it over vllm_chimera/drafts/smollm2-chimera
#   RECIPE=recipes/smollm2-same-budget.toml bash scripts/train_smollm2.sh   # another recipe
#   bash scripts/train_smollm2.sh --stage more --dry-run                    # chimera-train recipe's flags
#
# Resumable: rerun the same command after an interruption. The runs go to
# $CHIMERA_RUNS_DIR/NAME/NN-STAGE (default ~/.cache/vllm-chimera/runs). Each finished run's
# metrics.json, log.jsonl and loss_curve.png are copied to results/training/NAME/STAGE/.
# THREADS=N: torch threads (default: every core). How the answers the recipes train on were
# generated: docs/training.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
recipe="${RECIPE:-$here/recipes/smollm2-chimera.toml}"
threads="${THREADS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
bin="$(dirname "$py")"

"$bin/chimera-prepare" target smollm2
"$bin/chimera-train" recipe "$recipe" --runs-dir "$runs" --num-threads "$threads" "$@"

name="$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["name"])' "$recipe")"
for run in "$runs/$name"/*/; do
  [ -f "$run/metrics.json" ] || continue
  stage="$(basename "$run")"; out="$here/results/training/$name/${stage#*-}"
  mkdir -p "$out" && cp "$run"/{metrics.json,log.jsonl,loss_curve.png} "$out/"
done
