#!/usr/bin/env bash
# Token tree vs chain inside vLLM (issue 13): the shipped SmolLM2 draft, the context lookup off
# (heads only, so the tree and the chains draft from the same heads), 80 MT-bench first turns
# x 128 tokens, greedy, batch 1/4/16, one chimera-bench run:
#   plain, chimera-nolookup:1/2/4 (chains, K fixed), chimera-tree-nolookup (the tree below,
#   with the draft's step-aside K schedule: it drafts where that schedule's K > 0).
# The tree: the most likely NODES-node tree (best_paths) from the per-head top-k accuracies
# `chimera-bench --measure-tree` stored in the draft (results/bench/smollm2-tree-measure/).
#
#   bash scripts/bench_tree.sh                  # NODES=8
#   NODES=4 OUTPUT=results/bench/smollm2-tree4 bash scripts/bench_tree.sh
# Resumes: finished methods are kept in OUTPUT/runs/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
draft="$here/vllm_chimera/drafts/smollm2-chimera"
output="${OUTPUT:-$here/results/bench/smollm2-tree}"
tree="$("$py" - "$draft" "${NODES:-8}" <<'PY'
import json, sys
from vllm_chimera.measurements import DeviceMeasurements, load_measurements
from vllm_chimera.tree import best_paths
accuracies = load_measurements(sys.argv[1]).get("cpu", DeviceMeasurements()).head_top_k_accuracies
if not accuracies:
    raise SystemExit("the draft has no head_top_k_accuracies on cpu: run chimera-bench --measure-tree --save-schedule")
print(json.dumps([list(p) for p in best_paths(accuracies, int(sys.argv[2]))]))
PY
)"
echo "tree: $tree"
mkdir -p "$(dirname "$output")"
"$py" -c "from vllm_chimera.commands.bench import bench_main; raise SystemExit(bench_main())" --target smollm2 \
  --draft "$draft" --tree "$tree" --temperature 0 \
  --methods "${METHODS:-plain,chimera-nolookup:1,chimera-nolookup:2,chimera-nolookup:4,chimera-tree-nolookup}" \
  --num-prompts "${NUM_PROMPTS:-80}" --max-tokens 128 --batch-sizes "${BATCH_SIZES:-1,4,16}" \
  --output "$output" 2>&1 | tee -a "$output.log"
