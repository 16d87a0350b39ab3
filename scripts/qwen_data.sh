#!/usr/bin/env bash
# Training data for the Qwen2.5-Coder-0.5B-Instruct draft (issue 38, part 2): the one command
# that starts or continues the whole job. Idempotent and resumable: rerun it and it carries
# on where it stopped (each stage skips what is done, answers are appended chunk by chunk).
#
#   nohup nice -n 19 bash scripts/qwen_data.sh > results/training/qwen-data/run.log 2>&1 &
#
# Stages (outputs in <cache>/data/qwen/, cache = $CHIMERA_CACHE_DIR or ~/.cache/vllm-chimera):
#   1. prompts/code.jsonl  code requests built from the standard library's and installed
#      packages' functions and classes (python -m vllm_chimera.prepare.code_prompts train:
#      complete / explain / fix an injected bug / write tests / annotate / refactor; never
#      from the held-out benchmark's sources, prepare/data/code_bench.jsonl)
#   2. prompts/self.jsonl  SELF_PROMPTS (1536) attempts at prompts the target writes itself
#      (scripts/generate_prompts.py --openers code: ten of sixteen open as a code request),
#      SELF_STEP (256) more per round: stages 2-5 repeat until all attempts are made, so
#      answers start early
#   3. prompts/mix.jsonl   code, self, code, ShareGPT first turn, repeated (50/25/25) until a
#      source runs out (scripts/mix_prompts.py; growing a source only extends the mix)
#   4. answers.jsonl       the target's greedy answers to the mix (scripts/generate_responses.py,
#      MAX_TOKENS (512) new tokens, BATCH (64) sequences at a time, vLLM's default compile
#      mode, written every CHUNK (128); answers.summary.json in the results folder follows
#      every chunk)
#   5. results/training/qwen-data/summary.json: counts, tokens, sha256 of every file, and
#      gzipped copies under results/training/qwen-data/data/ of those under 5 MB
# All prompt and answer files are restored from those copies when the cache lacks them, so a
# fresh machine continues the committed data rather than regenerating it. Every prompt is
# kept clear of MT-bench and HumanEval (13-word overlap; HumanEval's function names).
# SELF_PROMPTS=3072 extends the self-written prompts (and with them the mix) later.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Everything runs inside main: bash has read the whole file before it starts, so editing
# this script while a job runs cannot change the running job.
main() {

  target="$cache/targets/qwen2.5-coder-0.5b"
  data="${DATA_DIR:-$cache/data/qwen}"  # DATA_DIR, RESULTS_DIR, NUM_ANSWERS: for a smoke run
  results="${RESULTS_DIR:-$here/results/training/qwen-data}"
  shipped="$results/data"
  SELF_PROMPTS="${SELF_PROMPTS:-1536}"
  SELF_STEP="${SELF_STEP:-256}"
  NUM_ANSWERS="${NUM_ANSWERS:-1000000}"
  MAX_TOKENS="${MAX_TOKENS:-512}"
  BATCH="${BATCH:-64}"
  CHUNK="${CHUNK:-128}"  # answers per write: what a kill can lose
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  mkdir -p "$data/prompts" "$results"

  if [ ! -f "$target/config.json" ]; then
    echo "no Qwen2.5-Coder target at $target: run chimera-prepare target qwen2.5-coder-0.5b" >&2
    exit 1
  fi
  if [ ! -f "$cache/data/sharegpt/train.jsonl" ]; then
    "$py" -m vllm_chimera.commands.prepare data
  fi

  summarise() {
    "$py" "$here/scripts/qwen_data_summary.py" --data "$data" --results "$results"
  }
  self_attempts() {  # attempts made so far at self-written prompts (0 before the first)
    [ -f "$1" ] || { echo 0; return; }
    "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["attempts"])' "$1"
  }
  restore() {  # restore <cache file> <name in $shipped>: the committed copy, if the cache has none
    if [ ! -f "$1" ] && [ -f "$shipped/$2.gz" ]; then
      echo "restoring $1 from $shipped/$2.gz"
      gunzip -c "$shipped/$2.gz" > "$1.tmp" && mv "$1.tmp" "$1"
      [ ! -f "$shipped/$2.summary.json" ] || cp "$shipped/$2.summary.json" "$1.summary.json"
    fi
  }
  restore "$data/prompts/code.jsonl" code.jsonl
  restore "$data/prompts/self.jsonl" self.jsonl
  restore "$data/answers.jsonl" answers.jsonl
  [ -f "$results/answers.summary.json" ] || [ ! -f "$shipped/answers.jsonl.gz" ] \
    || { echo "answers restored without their summary: tokens of earlier runs unknown" >&2; }

  echo "== $(date '+%F %T') stage 1: code prompts"
  if [ ! -f "$data/prompts/code.jsonl" ]; then
    "$py" -m vllm_chimera.prepare.code_prompts train --tokenizer "$target" \
      --output "$data/prompts/code.jsonl"
  else
    echo "$(wc -l < "$data/prompts/code.jsonl") code prompts already in $data/prompts/code.jsonl"
  fi

  # Stages 2-4 in rounds of SELF_STEP (256) more self-prompt attempts, so that answers start
  # early and every round leaves answered data behind; the last round (or a rerun once all
  # SELF_PROMPTS attempts are made) answers whatever of the mix is left.
  while :; do
    local have want
    have="$(self_attempts "$data/prompts/self.jsonl.summary.json")"
    want=$(( have + SELF_STEP ))
    [ "$want" -le "$SELF_PROMPTS" ] || want="$SELF_PROMPTS"
    echo "== $(date '+%F %T') stage 2: self-written prompts ($want of $SELF_PROMPTS attempts)"
    "$py" "$here/scripts/generate_prompts.py" --target "$target" --openers code --humaneval \
      --num-prompts "$want" --max-tokens 256 --chunk-size 128 --output "$data/prompts/self.jsonl"

    echo "== $(date '+%F %T') stage 3: the mix"
    "$py" "$here/scripts/mix_prompts.py" --tokenizer "$target" --output "$data/prompts/mix.jsonl" \
      --source code="$data/prompts/code.jsonl" --source self="$data/prompts/self.jsonl" \
      --source sharegpt="$cache/data/sharegpt/train.jsonl" --pattern code,self,code,sharegpt \
      --max-prompt-tokens 768
    summarise

    echo "== $(date '+%F %T') stage 4: answers"
    "$py" "$here/scripts/generate_responses.py" --target "$target" --prompts "$data/prompts/mix.jsonl" \
      --output "$data/answers.jsonl" --num-prompts "$NUM_ANSWERS" --max-prompt-tokens 768 \
      --max-tokens "$MAX_TOKENS" --max-num-seqs "$BATCH" --chunk-size "$CHUNK" --kv-cache-gib 3 \
      --keep-fields kind,meta --summary "$results/answers.summary.json"
    echo "== $(date '+%F %T') stage 5: summary"
    summarise
    [ "$want" -lt "$SELF_PROMPTS" ] || break
  done
  echo "== $(date '+%F %T') done"
}

main "$@"
