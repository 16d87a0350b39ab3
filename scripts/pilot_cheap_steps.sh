#!/usr/bin/env bash
# Issue 14's "cheaper steps" and "first heads" levers, compared at EQUAL CPU-second budgets by
# held-out learning curves: the setup of the issue's pilot table (the first 320 of the shipped
# target answers, --draft-vocab-size 8192, 4 sequences per step, one thread), each variant with
# as many steps as fit the budget (its cosine schedule ends there), validated along the way.
#
#   bash scripts/pilot_cheap_steps.sh                 # data cache baseline subset25 subset25-heads report
#   bash scripts/pilot_cheap_steps.sh baseline report # some stages
#   PILOT=bf16 bash scripts/pilot_cheap_steps.sh data cache subset25 subset25-bf16 report
#                                                     # bf16 autocast on a CPU with AMX, beside
#                                                     # fp32 on the same machine (own folder)
#   PILOT=sequential bash scripts/pilot_cheap_steps.sh data cache subset25 subset25-seq report
#                                                     # Hydra-style sequential heads beside the
#                                                     # paper's parallel ones (--sequential-heads)
#
# Stages: data (the 320 answers, restored from results/training/data), cache (the target's
# outputs over them and the 64 held-out answers, one thread), one stage per variant, report
# (table.md and curves.png). Run the variants one after another, never two at once: the CPU
# seconds of one thread are the budget. Re-running resumes an interrupted variant from its
# checkpoint and skips finished ones. Per-step costs behind the step counts (this 2-core AMD
# EPYC, one thread): see results/training/recipe-pilots/cheap-steps/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
sharegpt="$cache/data/sharegpt"
train="$sharegpt/train.smollm2-self-320.jsonl"
val="$sharegpt/validation.smollm2-self.jsonl"
pilot="${PILOT:-cheap-steps}"  # one folder per pilot: CPU seconds compare within one machine
out="$runs/recipe-pilots/$pilot"
results="$here/results/training/recipe-pilots/$pilot"
# The budget is in steps per variant, from the CPU seconds per step measured on 12 steps here
# (README): 2.53 s full, 1.10 s with the loss on a quarter of the positions; ~560 s each.
# STEPS_BASELINE full steps, STEPS_SUBSET steps with the loss on a quarter of the positions.
steps_baseline="${STEPS_BASELINE:-220}"
steps_subset="${STEPS_SUBSET:-500}"
# bf16 autocast with the subset loss: 0.28 s against 0.47 s per micro-batch of 2 with two
# threads on this AMX machine (1.7x), so ~1.7x the steps of subset25 at the same budget.
steps_bf16="${STEPS_BF16:-850}"
common=(--target smollm2 --num-heads 4 --max-length 512 --val-tokens 20000
        --train-data "$train" --val-data "$val" --draft-vocab-size 8192
        --batch-size 4 --micro-batch-size 2 --lr 1e-3 --warmup-ratio 0.05
        --save-every 20 --num-threads 1 --seed 0 --no-progress)

data() {
  mkdir -p "$sharegpt"
  if [ ! -f "$val" ]; then
    gunzip -c "$here/results/training/data/validation.smollm2-self.jsonl.gz" > "$val.tmp" && mv "$val.tmp" "$val"
  fi
  if [ ! -f "$train" ]; then
    # (not gunzip | head: under pipefail, gunzip's SIGPIPE would fail the stage)
    "$py" -c "import gzip, itertools, sys; sys.stdout.writelines(itertools.islice(gzip.open(sys.argv[1], 'rt'), 320))" \
      "$here/results/training/data/train.smollm2-self.jsonl.gz" > "$train.tmp"
    mv "$train.tmp" "$train"
  fi
  echo "data: $(wc -l < "$train") training answers, $(wc -l < "$val") held out"
}

cache() {
  "$py" -m vllm_chimera.commands.train "${common[@]}" --output-dir "$out/cache" --cache-only
  # (the variants' caches are fp32 alike: bf16 changes the draft's arithmetic only)
}

# variant NAME STEPS EVAL_EVERY [flags]: 320 sequences = 80 steps per epoch
variant() {
  local name="$1" steps="$2" every="$3"; shift 3
  if [ -f "$results/$name/metrics.json" ] && grep -q '"finished": true' "$results/$name/metrics.json"; then
    echo "$name: done already ($results/$name)"; return
  fi
  local epochs
  epochs="$("$py" -c "print($steps / 80)")"
  "$py" -m vllm_chimera.commands.train "${common[@]}" --epochs "$epochs" --eval-every "$every" \
    --output-dir "$out/$name" "$@"
  mkdir -p "$results/$name"
  cp "$out/$name/metrics.json" "$out/$name/log.jsonl" "$out/$name/loss_curve.png" "$results/$name/"
}

report() {
  "$py" - "$results" <<'EOF'
import json, sys
from pathlib import Path
from vllm_chimera.training.plot import plot_validation_curves, validation_table

root = Path(sys.argv[1])
names = [n for n in ("baseline", "subset25", "subset25-heads", "subset25-bf16", "subset25-seq")
         if (root / n / "log.jsonl").is_file()]
runs = {n: [json.loads(l) for l in (root / n / "log.jsonl").read_text().splitlines()] for n in names}
plot_validation_curves(runs, root / "curves.png", heads=(0, 1))
(root / "table.md").write_text(validation_table(runs) + "\n")
print((root / "table.md").read_text())
EOF
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(data cache baseline subset25 subset25-heads report)
for stage in "${stages[@]}"; do
  case "$stage" in
    data) data ;;
    cache) cache ;;
    baseline) variant baseline "$steps_baseline" 20 ;;
    subset25) variant subset25 "$steps_subset" 50 --loss-positions-fraction 0.25 ;;
    subset25-heads) variant subset25-heads "$steps_subset" 50 --loss-positions-fraction 0.25 \
                      --head-weights 1,0.6,0.2,0.1 ;;
    subset25-bf16) variant subset25-bf16 "$steps_bf16" 85 --loss-positions-fraction 0.25 \
                     --autocast bf16 ;;
    subset25-seq) variant subset25-seq "$steps_subset" 50 --loss-positions-fraction 0.25 \
                    --sequential-heads ;;
    report) report ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
