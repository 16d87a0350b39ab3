#!/usr/bin/env bash
# Train the Chimera draft for SmolLM2-135M-Instruct and the paper's two ablations on the same
# data and budget (the ablations reuse the cached target hidden states).
#
#   bash scripts/train_smollm2.sh                       # chimera, no-trigram, no-context
#   bash scripts/train_smollm2.sh chimera export        # one run, then ship it (fp16)
#   DATA=self bash scripts/train_smollm2.sh chimera     # on the target's own answers
#
# DATA=dataset (default): ShareGPT conversations with ShareGPT's answers.
# DATA=self: ShareGPT first user turns answered by SmolLM2 itself (greedy, vLLM,
#            scripts/generate_responses.py; generated once, about 20 min on one core).
# Labels are the target's own greedy predictions either way (self-distillation).
#
# One CPU thread per run (OMP_NUM_THREADS=1) so the machine's other core stays free.
# Measured on this 2-core CPU with one thread: caching the target's outputs runs at about
# 270 tokens/s, a K=4 training step at about 200 tokens/s (the four full-vocabulary
# LM-head projections dominate); 300k training tokens: 19 min caching + 25 min per epoch.
# Re-running resumes an interrupted run from its last checkpoint.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
cache="${CHIMERA_CACHE_DIR:-$HOME/.cache/vllm-chimera}"
runs="${CHIMERA_RUNS_DIR:-$cache/runs}"
data="${DATA:-dataset}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

"$py" -m vllm_chimera.training.cli --help >/dev/null  # fail early on a broken install
"$py" -c "from vllm_chimera.training.cli import prepare_main; prepare_main(['target', 'smollm2'])"
"$py" -c "from vllm_chimera.training.cli import prepare_main; prepare_main(['data'])"
sharegpt="$cache/data/sharegpt"
if [ "$data" = self ]; then
  for split in train:1100 validation:64; do
    name="${split%%:*}"; n="${split##*:}"; out="$sharegpt/$name.smollm2-self.jsonl"
    if [ ! -f "$out" ]; then
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$sharegpt/$name.jsonl" --num-prompts "$n" --max-tokens 384 --output "$out.tmp"
      mv "$out.tmp" "$out"
    fi
  done
  data_flags=(--train-data "$sharegpt/train.smollm2-self.jsonl"
              --val-data "$sharegpt/validation.smollm2-self.jsonl")
  suffix=-self
else
  data_flags=()
  suffix=
fi

common=(--target smollm2 --num-heads 4 --max-length 512 --train-tokens 300000 --val-tokens 20000
        --epochs 1 --batch-size 4 --micro-batch-size 2 --lr 1e-3 --warmup-ratio 0.05
        --save-every 25 --eval-every 100 --num-threads 1 --seed 0 "${data_flags[@]}")

run() {  # run NAME [extra flags]: train, then copy the small outputs into results/training/NAME
  local name="$1$suffix"; shift
  "$py" -m vllm_chimera.training.cli "${common[@]}" --output-dir "$runs/smollm2-$name" "$@"
  mkdir -p "$here/results/training/$name"
  cp "$runs/smollm2-$name"/{metrics.json,log.jsonl,loss_curve.png} "$here/results/training/$name/"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(chimera no-trigram no-context)
for stage in "${stages[@]}"; do
  case "$stage" in
    chimera) run chimera-k4 ;;
    no-trigram) run no-trigram-k4 --no-trigram-encoder ;;
    no-context) run no-context-k4 --no-context-encoder ;;
    export)  # the shipped draft: the chimera run's weights in fp16 (19 MB instead of 38 MB)
      "$py" -c "import sys; from vllm_chimera.training.checkpointing import export_draft; export_draft(*sys.argv[1:])" \
        "$runs/smollm2-chimera-k4$suffix/draft" "$here/drafts/smollm2-chimera-k4" ;;
    *) echo "unknown stage $stage (chimera, no-trigram, no-context, export)" >&2; exit 2 ;;
  esac
done
