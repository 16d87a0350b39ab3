#!/usr/bin/env bash
# The test command of the README and of CI (.ci/run): set up, then run the suite with an
# empty, temporary per-user state, so that no test can lean on what an earlier command
# left in the user's caches (a prepared target, a data split, a compiled kernel).
#
#   bash scripts/test.sh                 # the whole default suite
#   bash scripts/test.sh -m 'not slow'   # extra arguments go to pytest
#   CHIMERA_KEEP_TEST_STATE=1 bash scripts/test.sh ...   # keep the folder afterwards (debugging)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"

state="$(mktemp -d -t chimera-test-state.XXXXXX)"
if [ "${CHIMERA_KEEP_TEST_STATE:-0}" != "1" ]; then
  trap 'rm -rf "$state"' EXIT
fi
# Every per-user cache the project, vLLM, torch, Triton and Hugging Face read or write.
export CHIMERA_CACHE_DIR="$state/vllm-chimera"
export XDG_CACHE_HOME="$state/xdg-cache"
export VLLM_CACHE_ROOT="$state/vllm"
export TORCHINDUCTOR_CACHE_DIR="$state/torchinductor"
export TRITON_CACHE_DIR="$state/triton"
export HF_HOME="$state/huggingface"
export MPLCONFIGDIR="$state/matplotlib"
echo "test state (empty): $state"
cd "$here"
.venv/bin/python -m pytest "$@"
