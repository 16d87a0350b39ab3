#!/usr/bin/env bash
# Session orchestration (2026-12-03): stop stage varied-data after 768 extra answers, ship
# the answers, cache the new slice, continue the shipped draft on it (parallel and
# sequential heads side by side, one core each).
set -uo pipefail
cd /work/main
extra=/root/.cache/vllm-chimera/data/sharegpt/train.smollm2-self-extra.jsonl
until [ -f "$extra" ] && [ "$(wc -l < "$extra")" -ge 768 ]; do sleep 10; done
pkill -TERM -f generate_responses.py; sleep 5; pkill -KILL -f generate_responses.py
pkill -f "train_smollm2.sh varied-data"
echo "$(date) generation stopped at $(wc -l < "$extra") extra answers"
bash scripts/train_smollm2.sh ship-data
echo "$(date) shipped"
export RECIPE=v2 DATA=new EPOCHS=2 INIT=shipped
THREADS=2 bash scripts/train_smollm2.sh cache
echo "$(date) cached"
bash scripts/train_smollm2.sh chimera > /tmp/chain/parallel.log 2>&1 &
SEQUENTIAL=1 bash scripts/train_smollm2.sh chimera > /tmp/chain/sequential.log 2>&1 &
wait
echo "$(date) trained"
